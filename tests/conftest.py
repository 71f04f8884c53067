import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Small, fast settings shared by the tests that train on digits-LT.
FAST = ["train.epochs=3", "train.threads=1", "tracking.progress=never"]


def run_cli(*args, cwd=None, timeout=300):
    """Run `python -m abdist ...` as a real subprocess; returns CompletedProcess (text)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "abdist", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=timeout,
    )


def kill_at_first_checkpoint(*args, checkpoints: Path, timeout: float = 120) -> None:
    """Start `python -m abdist ARGS...`, SIGKILL it as soon as `checkpoints/latest` exists (a
    run killed mid-training, as a preempted job is), and wait for it to be gone."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "abdist", *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + timeout
    while not (checkpoints / "latest").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before a checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie holds no files any more


def kill_job(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL a launcher and everything under it, as the cluster kills a preempted job, and wait
    until all of it is gone. torchrun starts each worker in its own session, so killing the
    launcher's process group alone leaves the workers (and their loader workers) running."""
    tree = process_tree(proc.pid)
    for pid in tree:
        for kill in (os.killpg, os.kill):  # the group too: children forked after the listing
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    proc.wait()
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in tree):
        assert time.monotonic() < deadline, f"still alive after SIGKILL: {tree}"
        time.sleep(0.01)


@pytest.fixture
def ce_config():
    return REPO / "configs" / "digits_lt" / "ce.yaml"
