"""A run is never lost: damaged or missing checkpoints, a garbage `latest` pointer, two trainers on
one directory, a failed start, `--out` naming a file. Every case runs the real CLI and checks the
exit code, the one line it prints and that nothing in the run directory was lost.

The reference is one uninterrupted 3-epoch run; a resumed run replays from its checkpoint with
the (seed, epoch)-derived batch order and the saved RNG state, so "nothing lost" is checked as
byte-identical metrics.json.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from abdist.engine.env import detect_env
from abdist.engine.process_group import Dist
from abdist.engine.rundir import lock_run_dir
from abdist.errors import UserError
from tests.conftest import FAST, REPO, run_cli

CE = REPO / "configs" / "digits_lt" / "ce.yaml"


def _one_line_error(r, *needles):
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("abdist: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _train(out, *extra):
    return run_cli("train", CE, "--out", out, *FAST, *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    r = _train(out)
    assert r.returncode == 0, r.stderr
    return out


def _copy(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "metrics.json").unlink()  # as if killed after the last checkpoint, before the test pass
    return out


def _files(run_dir):
    """Every file of the run but the lock (which records who held it last)."""
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}


def _damage_latest(ckpts, how):
    latest = ckpts / (ckpts / "latest").read_text().strip()
    if how == "truncated":
        latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    elif how == "byte_flipped":  # still a loadable zip? The sha256 sidecar catches it either way
        data = bytearray(latest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        latest.write_bytes(bytes(data))
    elif how == "deleted":
        latest.unlink()
    elif how == "garbage_pointer":
        (ckpts / "latest").write_bytes(b"\x00\xffnot a checkpoint name\n")
    return latest


@pytest.mark.parametrize("how", ["truncated", "byte_flipped", "deleted", "garbage_pointer"])
def test_a_bad_latest_checkpoint_falls_back_to_the_previous_one_and_says_so(
    reference, tmp_path, how
):
    out = _copy(reference, tmp_path)
    ckpts = out / "checkpoints"
    bad = _damage_latest(ckpts, how)
    r = _train(out)
    assert r.returncode == 0, r.stderr
    if how == "garbage_pointer":  # the newest file is fine: it is found by scanning
        assert "does not name a checkpoint (damaged pointer)" in r.stderr
        assert "resuming from the newest readable checkpoint epoch-000002.pt" in r.stderr
    else:
        assert bad.name in r.stderr and "epoch-000001.pt (epoch 2)" in r.stderr, r.stderr
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in log] == [1, 2, 3]  # epoch 3 retrained once, not appended
    # Nothing lost: the replayed epoch gives the uninterrupted run's result, byte for byte.
    assert (out / "metrics.json").read_bytes() == (reference / "metrics.json").read_bytes()


@pytest.mark.parametrize("finished", [False, True])
def test_a_run_whose_checkpoints_are_all_gone_is_refused_not_restarted(
    reference, tmp_path, finished
):
    out = _copy(reference, tmp_path)
    if finished:
        shutil.copy(reference / "metrics.json", out / "metrics.json")
    for p in (out / "checkpoints").iterdir():
        p.unlink()
    before = _files(out)
    r = _train(out)
    what = "a finished run" if finished else "3 logged epoch(s)"
    _one_line_error(r, str(out), what, "no readable checkpoint", "another --out")
    assert _files(out) == before  # log.jsonl and metrics.json untouched


def test_every_checkpoint_damaged_is_refused(reference, tmp_path):
    out = _copy(reference, tmp_path)
    for p in (out / "checkpoints").glob("epoch-*.pt"):
        p.write_bytes(b"not a checkpoint")
    log = (out / "log.jsonl").read_bytes()
    r = _train(out)
    _one_line_error(r, "no readable checkpoint", "epoch-000002.pt is damaged")
    assert (out / "log.jsonl").read_bytes() == log


def test_a_torn_last_log_line_is_dropped_on_resume(reference, tmp_path):
    out = _copy(reference, tmp_path)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"epoch": 4, "train_lo')  # killed in the middle of a write
    r = _train(out)
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["epoch"] for x in (out / "log.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]


def test_two_trainers_on_one_run_directory(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "abdist", "train", str(CE), "--out", str(out), *FAST,
         "train.epochs=6"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / ".lock").is_file() or not (out / ".lock").read_text().strip():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = _train(out, "train.epochs=6")
    _one_line_error(second, "is in use by another abdist train", f"pid {first.pid}")
    assert first.wait(timeout=300) == 0, first.communicate()
    log = [json.loads(x)["epoch"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]  # one writer: every epoch once
    # The lock goes with the process: the same command afterwards simply finds a finished run.
    again = _train(out, "train.epochs=6")
    assert again.returncode == 0, again.stderr


# Takes the lock, forks a child that lives on (as a loader worker would), then waits to be killed.
_HOLDER = """
import os, sys, time
from pathlib import Path
import torch
from abdist.engine.env import detect_env
from abdist.engine.process_group import Dist
from abdist.engine.rundir import lock_run_dir
with lock_run_dir(Path(sys.argv[1]), Dist(detect_env({}), "gloo", torch.device("cpu"))):
    child = os.fork()
    if child == 0:
        time.sleep(120)
        os._exit(0)
    print(child, flush=True)
    time.sleep(120)
"""


def test_the_lock_goes_with_rank_0_not_with_its_forked_children(tmp_path):
    """A SIGKILLed rank 0 leaves loader workers behind for a few seconds; the same command
    right away must resume, not be told that the dead process still holds the directory."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", _HOLDER, str(out)]
    holder = subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, env=env)
    child = int(holder.stdout.readline())
    try:
        me = Dist(detect_env({}), "gloo", torch.device("cpu"))
        with pytest.raises(UserError, match="in use by another abdist train"):
            with lock_run_dir(out, me):
                pass
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the forked child is still alive ...
        with lock_run_dir(out, me):  # ... and the directory is free
            pass
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)


def test_a_failed_start_does_not_block_the_corrected_command(tmp_path):
    out = tmp_path / "run"
    bad = _train(out, "data.source=shards", f"data.root={tmp_path / 'missing'}")
    assert bad.returncode == 2, bad.stderr
    assert (out / "config.yaml").is_file()  # written before the data failed to load
    r = _train(out)  # the corrected command: a different config, but nothing had been trained
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["source"] == "digits"
    assert json.loads((out / "metrics.json").read_text())["method"] == "erm/ce"


def test_a_different_config_over_a_trained_run_is_still_refused(reference, tmp_path):
    out = _copy(reference, tmp_path)
    r = _train(out, "optim.lr=0.5")
    _one_line_error(r, "holds a run with a different config", "optim.lr")


def test_out_naming_a_file_is_one_line(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    r = _train(target)
    _one_line_error(r, str(target), "is a file, not a directory")
    assert target.read_text() == "keep me\n"
