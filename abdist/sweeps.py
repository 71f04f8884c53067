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
import itertools
import json
import math
import os
import random
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from abdist.config import Config, all_keys, load_config, set_key, suggest
from abdist.errors import UserError
from abdist.metrics import GROUP_SCALAR_METRICS, SCALAR_METRICS

METHODS = ("grid", "random", "bayes")
SPEC_KEYS = (
    "name",
    "method",
    "metric",
    "parameters",
    "count",
    "seed",
    "description",
    "early_terminate",
    "run_cap",
    "project",
    "entity",
)
DISTRIBUTIONS = (
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform_values",
    "q_log_uniform_values",
    "inv_log_uniform_values",
    "normal",
    "q_normal",
    "log_normal",
    "q_log_normal",
)
LOCAL_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "log_uniform_values")
PARAM_KEYS = ("value", "values", "distribution", "min", "max", "mu", "sigma", "q", "probabilities")
# Numbers a trial produces: metrics.json's and log.jsonl's.
METRICS = (
    *SCALAR_METRICS,
    *GROUP_SCALAR_METRICS,
    "val_accuracy",
    "val_balanced_error",
    "val_worst_class_recall",
    "val_equal_opportunity_gap",
    "train_loss",
)


def _closest(word: str, options) -> str:
    return suggest(word, list(options))


# --- the spec -------------------------------------------------------------------------------------


def load_spec(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep spec not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: a sweep spec is a mapping (method, metric, parameters)")
    spec.setdefault("name", path.stem)
    return spec


def distribution(key: str, p: dict[str, Any]) -> str:
    """The W&B distribution of one parameter (inferred as W&B does when not given)."""
    if "distribution" in p:
        return p["distribution"]
    if "value" in p:
        return "constant"
    if "values" in p:
        return "categorical"
    if "min" in p and "max" in p:
        ints = all(isinstance(p[k], int) and not isinstance(p[k], bool) for k in ("min", "max"))
        return "int_uniform" if ints else "uniform"
    raise UserError(f"sweep parameter '{key}': give value, values, or min and max")


def validate_spec(spec: dict[str, Any], cfg: Config, where: str = "sweep spec") -> dict:
    """Check a spec against the config; return it normalised. Every problem is one UserError."""
    for key in spec:
        if key not in SPEC_KEYS:
            raise UserError(f"{where}: unknown key '{key}'{_closest(str(key), SPEC_KEYS)}")
    method = spec.get("method")
    if method not in METHODS:
        raise UserError(
            f"{where}: 'method' must be one of {', '.join(METHODS)}; got {method!r}"
            f"{_closest(str(method), METHODS)}"
        )
    metric = spec.get("metric")
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        raise UserError(f"{where}: 'metric' must be {{name: <metric>, goal: minimize|maximize}}")
    if metric["name"] not in METRICS:
        raise UserError(
            f"{where}: unknown metric '{metric['name']}'{_closest(metric['name'], METRICS)}; "
            f"metrics: {', '.join(METRICS)}"
        )
    metric.setdefault("goal", "minimize")
    if metric["goal"] not in ("minimize", "maximize"):
        raise UserError(
            f"{where}: metric goal must be minimize or maximize; got {metric['goal']!r}"
        )
    params = spec.get("parameters")
    if not isinstance(params, dict) or not params:
        raise UserError(f"{where}: 'parameters' must map config keys to value/values/min+max")
    keys = all_keys()
    for key, p in params.items():
        if key not in keys:
            raise UserError(
                f"{where}: unknown parameter '{key}'{_closest(str(key), keys)}; parameters "
                "are abdist config keys (see `abdist config`)"
            )
        if not isinstance(p, dict):
            raise UserError(f"{where}: parameter '{key}' must be a mapping, e.g. {{values: [...]}}")
        for pk in p:
            if pk not in PARAM_KEYS:
                raise UserError(
                    f"{where}: parameter '{key}': unknown field '{pk}'"
                    f"{_closest(str(pk), PARAM_KEYS)}"
                )
        dist = distribution(key, p)
        if dist not in DISTRIBUTIONS:
            raise UserError(
                f"{where}: parameter '{key}': unknown distribution '{dist}'"
                f"{_closest(str(dist), DISTRIBUTIONS)}"
            )
        if dist == "categorical" and (not isinstance(p.get("values"), list) or not p["values"]):
            raise UserError(f"{where}: parameter '{key}': 'values' must be a non-empty list")
        samples = (
            [p["value"]]
            if dist == "constant"
            else p["values"]
            if dist == "categorical"
            else [p[k] for k in ("min", "max") if k in p]
        )
        probe = copy.deepcopy(cfg)
        for value in samples:
            set_key(probe, key, value, where=f"{where}: parameter")
        if "min" in p and "max" in p and p["min"] > p["max"]:
            raise UserError(f"{where}: parameter '{key}': min {p['min']} > max {p['max']}")
        if dist in ("log_uniform_values", "q_log_uniform_values") and p.get("min", 1) <= 0:
            raise UserError(f"{where}: parameter '{key}': {dist} needs min > 0")
    if method == "grid":
        bad = [
            k for k, p in params.items() if distribution(k, p) not in ("constant", "categorical")
        ]
        if bad:
            raise UserError(
                f"{where}: grid search needs value/values for every parameter; "
                f"'{bad[0]}' has a range (use method: random, or list its values)"
            )
    count = spec.get("count")
    if count is not None and (not isinstance(count, int) or count < 1):
        raise UserError(f"{where}: 'count' must be a whole number >= 1; got {count!r}")
    return spec


# --- local expansion -----------------------------------------------------------------------------


def grid_points(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every point of a grid, the first parameter varying slowest (spec order)."""
    params = spec["parameters"]
    axes = [[p["value"]] if "value" in p else list(p["values"]) for p in params.values()]
    return [dict(zip(params, combo)) for combo in itertools.product(*axes)]


def sample_point(spec: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    point = {}
    for key, p in spec["parameters"].items():
        dist = distribution(key, p)
        if dist == "constant":
            point[key] = p["value"]
        elif dist == "categorical":
            point[key] = rng.choice(p["values"])
        elif dist == "int_uniform":
            point[key] = rng.randint(p["min"], p["max"])
        elif dist == "uniform":
            point[key] = rng.uniform(p["min"], p["max"])
        elif dist == "log_uniform_values":
            point[key] = math.exp(rng.uniform(math.log(p["min"]), math.log(p["max"])))
        else:
            raise UserError(
                f"parameter '{key}': distribution {dist} is not supported by --local "
                f"(supported: {', '.join(LOCAL_DISTRIBUTIONS)}); run it with a W&B server"
            )
    return point


def local_trials(spec: dict[str, Any], count: int | None = None) -> list[dict[str, Any]]:
    """The trials `--local` runs: grid points in order, or `count` seeded random samples."""
    count = count or spec.get("count")
    if spec["method"] == "grid":
        points = grid_points(spec)
        return points[:count] if count else points
    if spec["method"] == "random":
        if not count:
            raise UserError("random search needs a trial count: --count N or 'count:' in the spec")
        rng = random.Random(spec.get("seed", 0))
        return [sample_point(spec, rng) for _ in range(count)]
    raise UserError(
        f"method {spec['method']} needs a W&B server (`abdist agent CONFIG SWEEP_ID`); "
        "--local runs grid and random"
    )


# --- writing the W&B definition ----------------------------------------------------------------


def sweep_definition(spec: dict[str, Any], config: str | Path, out: Path) -> dict[str, Any]:
    """The W&B sweep config: the spec plus a `command` that runs one trial via `abdist agent`."""
    definition = {k: v for k, v in spec.items() if k not in ("count", "seed", "project", "entity")}
    if spec.get("count"):
        definition["run_cap"] = spec["count"]
    definition["program"] = "abdist"
    definition["command"] = [
        "${env}",
        "${interpreter}",
        "-m",
        "abdist",
        "agent",
        str(Path(config).resolve()),
        "--trial",
        "--out",
        str(out.resolve()),
        "${args_no_hyphens}",
    ]
    return definition


def default_out(name: str) -> Path:
    return Path("runs") / "sweeps" / str(name)


def write_sweep(config: str, spec_path: str, out: str | None = None) -> str:
    cfg = load_config(config)
    spec = validate_spec(load_spec(spec_path), cfg, where=str(spec_path))
    out_dir = Path(out) if out else default_out(spec["name"])
    out_dir.mkdir(parents=True, exist_ok=True)
    definition = sweep_definition(spec, config, out_dir)
    from abdist.io import write_text

    path = write_text(out_dir / "sweep.yaml", yaml.safe_dump(definition, sort_keys=False))
    project = spec.get("project") or cfg.tracking.project
    entity = f" --entity {spec['entity']}" if spec.get("entity") else ""
    return (
        f"wrote {path} ({len(spec['parameters'])} parameters, method {spec['method']})\n"
        f"create it:   wandb sweep --project {project}{entity} {shlex.quote(str(path))}\n"
        f"then run:    abdist agent {config} <SWEEP_ID> [--count N]\n"
        f"no server:   abdist agent {config} --local {spec_path}"
    )


# --- running trials ------------------------------------------------------------------------------


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
