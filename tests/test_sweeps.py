"""Sweeps: spec validation, deterministic grid/random expansion, a real 2-trial local sweep, the
W&B definition, the W&B-agent glue (with a stand-in for the server) and the rank broadcast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from abdist.config import load_config
from abdist.errors import UserError
from abdist.sweeps import grid_points, local_trials, validate_spec
from tests.conftest import REPO, run_cli

CE = REPO / "configs" / "digits_lt" / "ce.yaml"


def _spec(**over):
    spec = {
        "method": "grid",
        "metric": {"name": "balanced_error", "goal": "minimize"},
        "parameters": {"optim.lr": {"values": [0.05, 0.1]}, "train.epochs": {"value": 2}},
    }
    spec.update(over)
    return spec


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_local_grid_sweep_end_to_end(tmp_path):
    spec = _write(tmp_path / "lr.yaml", _spec())
    out = tmp_path / "sweep"
    r = run_cli(
        "agent", CE, "--local", spec, "--out", out, "train.threads=1", "tracking.progress=never"
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [t["trial"] for t in summary["trials"]] == ["trial_000", "trial_001"]
    for t, lr in zip(summary["trials"], (0.05, 0.1)):
        d = out / t["trial"]
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert cfg["optim"]["lr"] == lr and cfg["train"]["epochs"] == 2
        metrics = json.loads((d / "metrics.json").read_text())
        assert t["metric"] == metrics["balanced_error"]
        assert t["params"] == {"optim.lr": lr, "train.epochs": 2}
        assert len((d / "log.jsonl").read_text().splitlines()) == 2
    assert "trial_000" in r.stdout and "trial_001" in r.stdout and "balanced_error" in r.stdout
    assert (out / "summary.tsv").read_text().count("\n") == 3


def test_grid_expansion_is_ordered_and_complete():
    cfg = load_config(CE)
    spec = validate_spec(
        _spec(
            parameters={
                "optim.lr": {"values": [0.1, 0.01]},
                "loss.name": {"values": ["ce", "la", "focal"]},
                "train.seed": {"value": 3},
            }
        ),
        cfg,
    )
    points = grid_points(spec)
    assert len(points) == 6
    assert points[0] == {"optim.lr": 0.1, "loss.name": "ce", "train.seed": 3}
    assert points[1] == {"optim.lr": 0.1, "loss.name": "la", "train.seed": 3}
    assert points[3] == {"optim.lr": 0.01, "loss.name": "ce", "train.seed": 3}
    assert local_trials(spec) == points and local_trials(spec, count=4) == points[:4]


def test_random_sampling_is_deterministic_and_in_range():
    cfg = load_config(CE)
    params = {
        "optim.lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-1},
        "loss.tau": {"min": 0.5, "max": 2.0},
        "train.epochs": {"min": 2, "max": 5},
        "loss.name": {"values": ["ce", "la"]},
    }
    spec = validate_spec(_spec(method="random", parameters=params, count=8, seed=7), cfg)
    a, b = local_trials(spec), local_trials(dict(spec))
    assert a == b and len(a) == 8
    assert local_trials({**spec, "seed": 8}) != a
    for p in a:
        assert 1e-3 <= p["optim.lr"] <= 1e-1 and 0.5 <= p["loss.tau"] <= 2.0
        assert isinstance(p["train.epochs"], int) and 2 <= p["train.epochs"] <= 5
        assert p["loss.name"] in ("ce", "la")
    assert len({p["optim.lr"] for p in a}) == 8  # really sampled
    with pytest.raises(UserError, match="count"):
        local_trials({**spec, "count": None})
    with pytest.raises(UserError, match="W&B server"):
        local_trials({**spec, "method": "bayes"})


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"parameters": {"optim.lrr": {"values": [0.1]}}}, "did you mean 'optim.lr'"),
        ({"parameters": {"optimlr": {"values": [0.1]}}}, "unknown parameter 'optimlr'"),
        ({"parameters": {"optim.lr": {"values": ["fast"]}}}, "'optim.lr' must be float"),
        ({"parameters": {"loss.name": {"values": ["cee"]}}}, "did you mean 'ce'"),
        ({"metric": {"name": "balanced_eror"}}, "did you mean 'balanced_error'"),
        ({"method": "gird"}, "did you mean 'grid'"),
        ({"parameters": {"loss.tau": {"min": 0.5, "max": 2.0}}}, "grid search needs"),
        ({"paramters": {}}, "did you mean 'parameters'"),
    ],
)
def test_bad_spec_is_one_line_error(tmp_path, change, expect):
    spec = _write(tmp_path / "bad.yaml", _spec(**change))
    for args in (("sweep", CE, spec, "--out", tmp_path / "o"), ("agent", CE, "--local", spec)):
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr
        assert expect in lines[0], lines[0]


def test_sweep_writes_wandb_definition_invoking_abdist_agent(tmp_path):
    spec = _write(tmp_path / "lr.yaml", _spec(count=2))
    r = run_cli("sweep", CE, spec, "--out", tmp_path / "def")
    assert r.returncode == 0, r.stderr
    definition = yaml.safe_load((tmp_path / "def" / "sweep.yaml").read_text())
    assert definition["method"] == "grid" and definition["metric"]["name"] == "balanced_error"
    assert definition["parameters"]["optim.lr"] == {"values": [0.05, 0.1]}
    assert definition["run_cap"] == 2 and "count" not in definition
    cmd = definition["command"]
    assert cmd[:5] == ["${env}", "${interpreter}", "-m", "abdist", "agent"]
    assert cmd[5] == str(CE) and "--trial" in cmd and cmd[-1] == "${args_no_hyphens}"
    assert "wandb sweep" in r.stdout


def test_no_sweep_id_and_no_local_is_one_line(tmp_path):
    r = run_cli("agent", CE)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "SWEEP_ID" in r.stderr


# W&B's agent needs a server: stand in for `wandb.agent` with one that hands each trial an offline
# run carrying the sweep's parameters, exactly what the trial function then sees.
FAKE_AGENT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import wandb
    from abdist.config import load_config
    from abdist import sweeps
    out = Path(sys.argv[1])
    trials = [{"optim.lr": 0.05, "loss.tau": 1.5}, {"optim.lr": 0.1, "loss.tau": 0.5}]
    def fake_agent(sweep_id, function, count=None, project=None, entity=None):
        for params in trials[:count]:
            wandb.init(mode="offline", config=params)
            function()
    wandb.agent = fake_agent
    seen = []
    def runner(cfg, overrides, run_dir):
        trial = sweeps.trial_config(cfg, overrides)
        seen.append([str(run_dir), trial.optim.lr, trial.loss.tau])
        return {"balanced_error": trial.optim.lr * 2, "accuracy": 0.5}
    cfg = load_config(sys.argv[2])
    sweeps.run_agent(cfg, "ent/proj/abc123", out, count=2, runner=runner)
    print("SEEN", json.dumps(seen))
    """
)


def test_agent_runs_each_trial_with_its_sweep_parameters(tmp_path):
    out = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-c", FAKE_AGENT, str(out), str(CE)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.split("SEEN ", 1)[1])
    assert [s[1:] for s in seen] == [[0.05, 1.5], [0.1, 0.5]]
    assert all(Path(s[0]).parent == out and Path(s[0]).name.startswith("trial_") for s in seen)
    from abdist.wandb_tracking import offline_runs, read_offline_run

    runs = offline_runs(out)  # the agent pointed W&B's files under the sweep directory
    assert len(runs) == 2
    deadline = time.time() + 30
    while not all(read_offline_run(p)["finished"] for p in runs) and time.time() < deadline:
        time.sleep(0.2)  # W&B's service writes the run files asynchronously
    summaries = sorted(read_offline_run(p)["summary"].get("balanced_error") for p in runs)
    assert summaries == [0.1, 0.2]


BROADCAST = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    from pathlib import Path
    from abdist.config import load_config
    from abdist import sweeps
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    spec = sweeps.validate_spec({
        "method": "random", "count": 3, "seed": 11 + rank,  # ranks disagree unless broadcast
        "metric": {"name": "balanced_error"},
        "parameters": {"optim.lr": {"min": 0.01, "max": 0.1}},
    }, load_config(None))
    got = []
    def runner(cfg, overrides, run_dir):
        got.append([run_dir.name, overrides])
        return {"balanced_error": overrides["optim.lr"]}
    sweeps.run_local(load_config(None), spec, Path(sys.argv[1]), runner=runner, echo=lambda s: 0)
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(got))
    dist.destroy_process_group()
    """
)


def test_trial_parameters_are_broadcast_from_rank_0(tmp_path):
    script = tmp_path / "bcast.py"
    script.write_text(BROADCAST)
    out = tmp_path / "sweep"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rank0 = json.loads((out / "rank0.json").read_text())
    rank1 = json.loads((out / "rank1.json").read_text())
    assert len(rank0) == 3 and rank0 == rank1  # rank 1 ran rank 0's trials, not its own draw
    assert json.loads((out / "summary.json").read_text())["trials"][0]["params"] == rank0[0][1]
