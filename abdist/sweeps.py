"""Hyper-parameter sweeps: W&B sweep definitions, a W&B agent, and a local runner without a server.

A sweep spec is a W&B sweep config whose parameter names are abdist config keys:

    name: lr_tau                 # optional; the default output dir is runs/sweeps/<name>
    method: grid                 # grid | random | bayes (bayes: W&B server only)
    metric: {name: balanced_error, goal: minimize}
    count: 4                     # optional: at most this many trials (random needs it)
    seed: 0                      # optional: the local runner's random-search seed
    parameters:
      optim.lr: {values: [0.05, 0.1]}
      loss.tau: {min: 0.5, max: 2.0}                     # uniform (ints: int_uniform)
      optim.weight_decay: {distribution: log_uniform_values, min: 1.0e-5, max: 1.0e-3}
      train.epochs: {value: 20}

- `abdist sweep CONFIG SPEC` validates every key and value against the config (one line naming
  the closest key on a typo) and writes OUT/sweep.yaml, the W&B definition: its `command` runs
  `abdist agent CONFIG --trial ...` for `wandb agent`; `abdist agent CONFIG SWEEP_ID` is the
  in-process agent (and the one to use under torchrun / Slurm with several ranks).
- `abdist agent CONFIG SWEEP_ID`: rank 0 runs `wandb.agent`; each trial's parameters are broadcast
  to every rank (torch.distributed, when a process group exists) before anything is built.
- `abdist agent CONFIG --local SPEC`: the same spec, no server: grid (all points, in order) or
  random (seeded); trial i trains in OUT/trial_{i:03d}; OUT/summary.json + summary.tsv list
  trial, parameters and metric, and the table is printed (best marked *).

The metric is read from the trial's metrics.json (test metrics: accuracy, balanced_error, ...),
else from the last line of its log.jsonl (val_balanced_error, train_loss, ...).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

from abdist.config import Config, all_keys, load_config, set_key
from abdist.errors import UserError
from abdist.sweep_spec import (  # noqa: F401  (re-exported: the sweep API in one place)
    METRICS,
    default_out,
    grid_points,
    load_spec,
    local_trials,
    sample_point,
    sweep_definition,
    validate_spec,
    write_sweep,
)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (torch.distributed broadcast_object_list); a no-op
    without a process group."""
    tdist = sys.modules.get("torch.distributed")
    if tdist is None or not tdist.is_available() or not tdist.is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def _rank() -> int:
    from abdist.wandb_tracking import current_rank

    return current_rank()


def _init_process_group(cfg: Config) -> None:
    """With several ranks, start the process group before the first trial (the engine's
    init_dist is idempotent and reuses it), so trial parameters can be broadcast."""
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    if cfg.dist.backend != "none" and world > 1:
        from abdist.engine.dist import init_dist

        init_dist(cfg)


def trial_config(cfg: Config, overrides: dict[str, Any], where: str = "trial") -> Config:
    trial = copy.deepcopy(cfg)
    for key, value in overrides.items():
        set_key(trial, key, value, where=where)
    from abdist.config_checks import validate

    validate(trial)
    return trial


def read_metric(run_dir: Path, metrics: dict | None, name: str) -> float | None:
    if metrics and isinstance(metrics.get(name), (int, float)):
        return metrics[name]
    log = run_dir / "log.jsonl"
    if log.is_file():
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        if lines:
            value = json.loads(lines[-1]).get(name)
            if isinstance(value, (int, float)):
                return value
    return None


def _run_trial(cfg: Config, overrides: dict, run_dir: Path) -> dict:
    from abdist.engine.recipe import run

    trial = trial_config(cfg, overrides, where=f"trial {run_dir.name}")
    return run(trial, run_dir)


def format_summary(rows: list[dict], params: list[str], metric: str, goal: str) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "—" if v is None else str(v)

    scored = [r for r in rows if isinstance(r["metric"], (int, float))]
    best = None
    if scored:
        pick = min if goal == "minimize" else max
        best = pick(scored, key=lambda r: r["metric"])["trial"]
    header = ["trial", *params, metric]
    table = [header] + [
        [
            r["trial"] + (" *" if r["trial"] == best else ""),
            *(fmt(r["params"].get(p)) for p in params),
            fmt(r["metric"]),
        ]  # fmt: skip
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_local(
    cfg: Config, spec: dict, out_dir: Path, count: int | None = None, *, runner=None, echo=print
) -> list[dict]:
    """Run a spec's trials here, one after the other; return the summary rows.

    Trial parameters are decided on rank 0 and broadcast, so every rank builds the same trial.
    `runner(cfg, overrides, run_dir) -> metrics` defaults to the training recipe (tests swap it).
    """
    runner = runner or _run_trial
    _init_process_group(cfg)
    trials = broadcast_object(local_trials(spec, count) if _rank() == 0 else None)
    metric, goal = spec["metric"]["name"], spec["metric"]["goal"]
    params = list(spec["parameters"])
    rows = []
    main = _rank() == 0
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    for i, overrides in enumerate(trials):
        run_dir = out_dir / f"trial_{i:03d}"
        if main:
            echo(f"trial {i + 1}/{len(trials)}: {run_dir}  " + " ".join(
                f"{k}={v}" for k, v in overrides.items()
            ))  # fmt: skip
        metrics = runner(cfg, overrides, run_dir)
        rows.append(
            {
                "trial": run_dir.name,
                "run_dir": str(run_dir),
                "params": overrides,
                "metric": read_metric(run_dir, metrics, metric),
            }
        )
    if main:
        _write_summary(out_dir, rows, params, metric, goal)
    return rows


def _write_summary(out_dir: Path, rows, params, metric, goal) -> None:
    from abdist.io import write_json, write_text

    write_json(out_dir / "summary.json", {"metric": metric, "goal": goal, "trials": rows})
    tsv = ["\t".join(["trial", *params, metric])] + [
        "\t".join([r["trial"], *(str(r["params"].get(p)) for p in params), str(r["metric"])])
        for r in rows
    ]
    write_text(out_dir / "summary.tsv", "\n".join(tsv) + "\n")


# --- the W&B agent ---------------------------------------------------------------------------


def _wandb_setup(cfg: Config, out_dir: Path):
    """Import wandb and point its files under the sweep directory (agents need the server)."""
    try:
        import wandb
    except ImportError:
        raise UserError("abdist agent with a sweep id needs wandb: pip install wandb") from None
    from abdist.wandb_tracking import wandb_env

    env = wandb_env(cfg, out_dir)
    env["WANDB_MODE"] = "online"  # a sweep's trials come from the W&B server
    os.environ.update(env)
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return wandb


def sweep_params(run_config: Any) -> dict[str, Any]:
    """The abdist overrides in a W&B run's config (keys like 'optim.lr'), others ignored."""
    keys = set(all_keys())
    return {k: v for k, v in dict(run_config).items() if k in keys}


def trial_summary(run_dir: Path, metrics: dict | None) -> dict[str, float]:
    """The numbers a trial reports to its sweep: the last log.jsonl record, then metrics.json's."""
    summary: dict[str, float] = {}
    log = run_dir / "log.jsonl"
    if log.is_file():
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        if lines:
            summary.update(json.loads(lines[-1]))
    summary.update(metrics or {})
    return {
        k: v
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k in METRICS
    }


def run_wandb_trial(cfg: Config, out_dir: Path, *, wandb, runner=None) -> dict:
    """One trial inside a W&B run (started by wandb.agent, `wandb agent`, or here)."""
    runner = runner or _run_trial
    run = wandb.run or wandb.init(project=cfg.tracking.project or None,
                                  entity=cfg.tracking.entity or None)  # fmt: skip
    overrides = sweep_params(run.config)
    broadcast_object(("trial", run.id, overrides))
    run_dir = out_dir / f"trial_{run.id}"
    try:
        metrics = runner(cfg, overrides, run_dir)
        run.summary.update(trial_summary(run_dir, metrics))
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    return metrics


def run_agent(
    cfg: Config, sweep_id: str, out_dir: Path, count: int | None = None, *, runner=None
) -> int:
    """rank 0: wandb.agent; other ranks: run the trials rank 0 broadcasts, until 'stop'."""
    runner = runner or _run_trial
    _init_process_group(cfg)
    if _rank() != 0:
        while True:
            msg = broadcast_object(None)
            if msg[0] == "stop":
                return 0
            runner(cfg, msg[2], out_dir / f"trial_{msg[1]}")
    wandb = _wandb_setup(cfg, out_dir)
    try:
        wandb.agent(
            sweep_id,
            function=lambda: run_wandb_trial(cfg, out_dir, wandb=wandb, runner=runner),
            count=count,
            project=cfg.tracking.project or None,
            entity=cfg.tracking.entity or None,
        )
    finally:
        broadcast_object(("stop",))
    return 0


def agent(
    config: str,
    *,
    sweep_id: str | None = None,
    local_spec: str | None = None,
    count: int | None = None,
    out: str | None = None,
    overrides: list[str] = (),
    trial: bool = False,
) -> int:
    """What `abdist agent` does."""
    cfg = load_config(config, list(overrides))
    if count is not None and count < 1:
        raise UserError("--count must be >= 1")
    if local_spec:
        if sweep_id:
            raise UserError("give a SWEEP_ID or --local SPEC, not both")
        spec = validate_spec(load_spec(local_spec), cfg, where=str(local_spec))
        out_dir = Path(out) if out else default_out(spec["name"])
        rows = run_local(cfg, spec, out_dir, count)
        if _rank() == 0:
            m = spec["metric"]
            print(format_summary(rows, list(spec["parameters"]), m["name"], m["goal"]))
            print(f"wrote {out_dir}/summary.json")
        return 0
    if trial:  # `wandb agent` ran our sweep.yaml command: one trial, overrides on the command line
        out_dir = Path(out) if out else Path("runs") / "sweeps" / "trials"
        wandb = _wandb_setup(cfg, out_dir)
        run_wandb_trial(cfg, out_dir, wandb=wandb)
        return 0
    if not sweep_id:
        raise UserError("give a W&B SWEEP_ID (from `wandb sweep`), or --local SPEC to run here")
    out_dir = Path(out) if out else default_out(sweep_id.split("/")[-1])
    return run_agent(cfg, sweep_id, out_dir, count)
