"""`abdist launch slurm` against a REAL single-node Slurm cluster with accounting.

A session fixture starts munged, a private MariaDB, slurmdbd, slurmctld and slurmd with
launch/slurm/start.sh (installing the Debian packages when missing), and stops them again at the
end when it started them. Needs root and apt (or the packages already installed): skipped with the
reason otherwise. Select with `pytest -m slurm`; every test has its own run dir, hence its own
submitit folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit.core.utils

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slurm

START = REPO / "launch" / "slurm" / "start.sh"
STOP = REPO / "launch" / "slurm" / "stop.sh"
STATUS = REPO / "launch" / "slurm" / "status.sh"
FAST = ["train.epochs=3", "train.threads=1", "tracking.progress=never"]


def _skip_reason() -> str | None:
    if sys.platform != "linux":
        return "Slurm tests need Linux"
    if os.geteuid() != 0:
        return "Slurm tests need root (start.sh runs munged/slurmctld/slurmd/slurmdbd/mariadbd)"
    have = all(shutil.which(b, path="/usr/sbin:/usr/bin:/sbin") for b in ("slurmctld", "slurmdbd"))
    if not have and shutil.which("apt-get") is None:
        return "Slurm packages are not installed and there is no apt-get to install them"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    was_running = subprocess.run(["bash", STATUS], capture_output=True).returncode == 0
    r = subprocess.run(["bash", START], capture_output=True, text=True, timeout=900)
    if r.returncode == 3:  # start.sh: cannot run here (packages not installable, ...)
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"cannot start a Slurm cluster here: {last}")
    assert r.returncode == 0, f"launch/slurm/start.sh failed:\n{r.stderr}"
    conf = r.stdout.strip().rsplit("export SLURM_CONF=", 1)[-1]
    assert Path(conf).is_file(), r.stdout
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", conf)
    mp.setenv("OMP_NUM_THREADS", "1")
    # sbatch exports this environment to the jobs: they import this checkout's abdist.
    mp.setenv("PYTHONPATH", str(REPO))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        mp.delenv(var, raising=False)
    yield conf
    mp.undo()
    if not was_running:
        subprocess.run(["bash", STOP], capture_output=True, timeout=300)


def _ddp_backend() -> str | None:
    """The DDP backend name once the distributed engine offers it (else None: 1-task tests)."""
    from abdist.config import DistConfig

    field = {f.name: f for f in dataclasses.fields(DistConfig)}["backend"]
    choices = field.metadata.get("choices") or ()
    return "ddp" if "ddp" in choices else None


def _launch_api(ce_config, out, overrides, **opts):
    from abdist.config import load_config
    from abdist.launcher import LaunchOptions, submit

    cfg = load_config(ce_config, overrides)
    return submit(cfg, out, LaunchOptions(cluster="slurm", **opts))


def test_cluster_has_accounting(slurm_cluster):
    # submitit needs sacct: without accounting a killed job would never count as done.
    r = subprocess.run(["sacct", "-n", "-X", "-o", "JobID"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True)
    assert int(r.stdout.split()[0]) >= 2  # 2-task jobs fit (CPUs advertised via config_overrides)


def test_two_task_job_gets_torch_distributed_env(slurm_cluster, tmp_path):
    """2 Slurm tasks: submitit's env export gives ranks 0/1 and a real gloo all_reduce works."""
    from abdist.launcher import LaunchOptions, make_executor, probe_task

    ex = make_executor(tmp_path / "submitit", LaunchOptions(tasks_per_node=2), "abdist-probe")
    job = ex.submit(probe_task)
    results = job.results()
    assert sorted(r["RANK"] for r in results) == ["0", "1"]
    assert {r["WORLD_SIZE"] for r in results} == {"2"}
    assert {r["MASTER_PORT"] for r in results} == {results[0]["MASTER_PORT"]}
    assert [r["all_reduce_sum"] for r in results] == [3.0, 3.0]  # 1 + 2 on both ranks


def test_two_task_training_job(slurm_cluster, ce_config, tmp_path):
    backend = _ddp_backend()
    if backend is None:
        pytest.skip("dist.backend offers no 'ddp' yet: a 2-task training job needs it")
    out = tmp_path / "ddp"
    [s] = _launch_api(ce_config, out, [*FAST, f"dist.backend={backend}"], tasks_per_node=2)
    results = s.job.results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 for r in results)
    metrics = json.loads((out / "metrics.json").read_text())
    rank0 = next(r for r in results if r["rank"] == 0)
    assert rank0["metrics"]["balanced_error"] == metrics["balanced_error"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 3


def test_one_task_training_job_via_cli(slurm_cluster, ce_config, tmp_path):
    out = tmp_path / "one"
    r = run_cli("launch", "slurm", ce_config, "--out", out, "--wait", *FAST, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "submitted job" in r.stdout and "_log.out" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{100 * metrics['accuracy']:.2f}" in r.stdout  # the results table
    record = json.loads((out / "launch.json").read_text())
    assert record["jobs"][0]["run_dir"] == str(out.resolve())
    assert Path(record["jobs"][0]["stdout"]).is_file()
    assert str(out.resolve()) in record["folder"]  # submitit's folder lives under the run dir


def test_seed_array(slurm_cluster, ce_config, tmp_path):
    out = tmp_path / "arr"
    r = run_cli(
        "launch", "slurm", ce_config, "--out", out, "--array", "seeds=0,1", "--wait", *FAST,
        timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "job array" in r.stdout
    import yaml

    seen = {}
    for seed in (0, 1):
        d = out / f"seed_{seed}"
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert cfg["train"]["seed"] == seed
        seen[seed] = json.loads((d / "metrics.json").read_text())
        assert f"digits_lt_ce/seed_{seed}" in r.stdout  # one table row per point
    ids = [j["job_id"] for j in json.loads((out / "launch.json").read_text())["jobs"]]
    assert len(ids) == 2 and ids[0].split("_")[0] == ids[1].split("_")[0]  # one Slurm array
    first = [
        json.loads((out / f"seed_{s}" / "log.jsonl").read_text().splitlines()[0]) for s in (0, 1)
    ]
    assert first[0]["train_loss"] != first[1]["train_loss"]  # different seeds really trained


def test_failing_job_reports_the_remote_error_in_one_line(slurm_cluster, ce_config, tmp_path):
    out = tmp_path / "fail"
    missing = tmp_path / "no-shards"
    r = run_cli(
        "launch", "slurm", ce_config, "--out", out, "--wait", *FAST,
        "data.source=shards", f"data.root={missing}", timeout=600,
    )  # fmt: skip
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "failed" in lines[0] and str(missing) in lines[0]  # the remote UserError's text
    assert "_log.err" in lines[0]  # where the full log is


def test_failing_job_raises_failed_job_error(slurm_cluster, ce_config, tmp_path):
    import submitit

    missing = tmp_path / "no-shards"
    [s] = _launch_api(
        ce_config, tmp_path / "fail", [*FAST, "data.source=shards", f"data.root={missing}"]
    )
    with pytest.raises(submitit.core.utils.FailedJobError) as info:
        s.job.result()
    assert "UserError" in str(info.value) and str(missing) in str(info.value)


def test_preempted_job_requeues_and_matches_uninterrupted_run(slurm_cluster, ce_config, tmp_path):
    # Small batches make epochs slow enough (~0.5 s) to interrupt mid-run.
    overrides = ["train.epochs=12", "train.batch_size=8", "train.threads=1",
                 "tracking.progress=never"]  # fmt: skip
    ref_dir = tmp_path / "reference"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    reference = subprocess.Popen(
        [sys.executable, "-m", "abdist", "train", str(ce_config), "--out", str(ref_dir),
         *overrides],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for attempt in range(2):
        out = tmp_path / f"preempted{attempt}"
        # timeout_min >= 60: with short limits submitit counts the signal as a timeout.
        [s] = _launch_api(ce_config, out, overrides, time_min=60)
        log = out / "log.jsonl"
        deadline = time.time() + 300
        while not (log.is_file() and log.read_text().strip()):  # at least one epoch checkpointed
            assert time.time() < deadline, "the job never logged an epoch"
            assert not s.job.done(), "the job finished before it could be interrupted"
            time.sleep(0.1)
        s.job._interrupt()  # preemption: SIGTERM, then submitit's USR2 -> checkpoint() -> requeue
        try:
            result = s.job.result()
            break
        except submitit.core.utils.FailedJobError as exc:
            # Known upstream race (seen 1 run in ~5 here): Slurm's requeue SIGTERMs the job's
            # processes, including the `scontrol requeue` that submitit is still waiting on.
            # Only that failure gets one more try; anything else fails the test.
            if attempt or "'scontrol', 'requeue'" not in str(exc):
                raise
    assert result["restarts"] == 1  # it really ran twice
    assert (
        "this job is preempted"
        in Path(s.job.paths.stderr).read_text() + Path(s.job.paths.stdout).read_text()
    )
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err
    got = json.loads((out / "metrics.json").read_text())
    want = json.loads((ref_dir / "metrics.json").read_text())
    assert got == want
    assert len(log.read_text().splitlines()) == 12
