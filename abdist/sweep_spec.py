"""Sweep specs: reading, validating against the config (one line naming the closest key on a
typo), expanding into trials (grid points, seeded random samples) and writing the W&B sweep
definition (`abdist sweep`). The spec format and the runners are in abdist/sweeps.py."""

from __future__ import annotations

import copy
import itertools
import math
import random
import shlex
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
