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


@pytest.fixture
def ce_config():
    return REPO / "configs" / "digits_lt" / "ce.yaml"
