"""SelMix under torchrun (gloo, CPU): 2 ranks derive exactly 1 rank's P from the same model, each
refresh sends one all-reduce of integer statistics (and a digest of P), the ranks end with
identical parameters, and a SIGKILLed 2-rank fine-tune resumes to the same bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from abdist.models import create_model
from tests.conftest import REPO, kill_job, run_cli

HELPER = REPO / "tests" / "dist_helper.py"
LA = REPO / "configs" / "digits_lt" / "la.yaml"
SELMIX = REPO / "configs" / "digits_lt" / "selmix.yaml"
K = 10
# eval_batch_size=1: each validation sample's features come from a forward of its own, so
# they are the same bits however the samples are split over ranks (a batched forward may round
# a sample differently with other batch-mates); the sums over samples are exact by design.
ARGS = ["tracking.progress=never", "train.threads=1", "train.epochs=3", "dist.backend=ddp",
        "selmix.refresh_interval=5", "train.eval_batch_size=1"]  # fmt: skip


def torchrun(nproc, out, *overrides, env=None, popen=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(HELPER), "train", str(SELMIX), "--out", str(out),
           *ARGS, *overrides]  # fmt: skip
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    if popen:
        return subprocess.Popen(cmd, env=full, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    r = subprocess.run(cmd, env=full, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("selmix_dist")
    la = tmp / "la"
    r = run_cli("train", LA, "--out", la, "tracking.progress=never", "train.threads=1")
    assert r.returncode == 0, r.stderr
    init = f"model.init_from={la}"
    torchrun(1, tmp / "one", init, env={"ABDIST_TEST_RECORD": str(tmp / "rec1")})
    torchrun(2, tmp / "two", init, env={"ABDIST_TEST_RECORD": str(tmp / "rec2"),
                                        "ABDIST_TEST_PARAMS": str(tmp / "params")})  # fmt: skip
    rec = lambda d, r: json.loads((tmp / d / f"rank{r}.json").read_text())  # noqa: E731
    return {
        "tmp": tmp,
        "init": init,
        "one": rec("rec1", 0),
        "two": [rec("rec2", r) for r in (0, 1)],
    }


def test_two_ranks_derive_one_rank_s_p_exactly_from_the_same_model(runs):
    one, (r0, r1) = runs["one"]["selmix"], runs["two"]
    assert r0["selmix"][0]["step"] == 0 and len(r0["selmix"]) > 2
    assert r0["selmix"][0]["P"] == one[0]["P"]  # the initial model: bit for bit
    assert r0["selmix"] == r1["selmix"]  # and the ranks agree at every refresh


def test_each_refresh_sends_one_all_reduce_of_integers_and_a_digest(runs):
    d = create_model("small_cnn", num_classes=K, in_channels=1, image_size=8).feature_dim
    for rec in runs["two"]:
        calls = [c for c in rec["calls"] if c["hyper"]]
        refreshes = len(rec["selmix"])
        reduces = [c for c in calls if c["op"] == "all_reduce"]
        # One per refresh, plus the initial model's test pass (the "before" figure).
        assert len(reduces) == refreshes + 1
        assert all(c["numel"] == K * d + K + 2 * K * K and c["dtype"] == "torch.int64"
                   for c in reduces)  # fmt: skip
        digests = [c for c in calls if c["op"] == "all_gather_object"]
        assert len(digests) == refreshes
        assert len(calls) == len(reduces) + len(digests)  # nothing else crosses the wire


def test_ranks_end_with_identical_parameters(runs):
    params = [torch.load(runs["tmp"] / "params" / f"rank{r}.pt") for r in (0, 1)]
    assert params[0].keys() == params[1].keys()
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])


def test_a_sigkilled_two_rank_fine_tune_resumes_to_the_same_bytes(runs):
    out = runs["tmp"] / "killed"
    proc = torchrun(2, out, runs["init"], popen=True)
    deadline = time.monotonic() + 180
    while not (out / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "ended before a checkpoint"
        time.sleep(0.01)
    kill_job(proc)
    assert not (out / "metrics.json").exists(), "killed too late: the run had finished"
    r = torchrun(2, out, runs["init"])
    assert "resuming" in r.stdout
    for name in ("metrics.json", "selmix.json"):
        assert (out / name).read_bytes() == (runs["tmp"] / "two" / name).read_bytes(), name
