"""Typed run configuration: dataclass sections, YAML files, `section.key=value` overrides.

Every key is declared once, here, with its type and (where it matters) its allowed values or range.
Anything else a user writes -- an unknown key, a wrong type, an out-of-range value -- becomes a
`UserError` naming the key and, for unknown keys, the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from abdist.errors import UserError


def _opt(default, *, choices=None, lo=None, hi=None, lo_open=False, help=""):
    """A field with validation metadata (`choices`, inclusive `lo`/`hi`, `lo_open` for lo < x)."""
    meta = {"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "help": help}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    source: str = _opt("digits", choices=("digits", "shards"), help="where the data comes from")
    root: str = _opt("", help="shards: directory written by `abdist prepare`")
    in_memory: bool = _opt(True, help="shards: decode everything into RAM (small datasets)")
    profile: str = _opt("exp", choices=("exp", "step"), help="long-tail profile")
    imbalance_ratio: float = _opt(10.0, lo=1.0, help="rho = n_max / n_min")
    minority_fraction: float = _opt(0.5, lo=0.0, hi=1.0, help="step profile: minority share")
    val: float = _opt(0.2, lo=0.0, lo_open=True, help="val fraction (<1) or count per class")
    test_per_class: int = _opt(50, lo=1, help="balanced test samples per class (digits)")
    seed: int = _opt(0, lo=0, help="seed of the subsample and split")
    workers: int = _opt(2, lo=0, help="streaming: loader worker processes per rank")
    shuffle_buffer: int = _opt(1000, lo=0, help="streaming: samples each worker shuffles among")
    bad_data: str = _opt(
        "skip",
        choices=("skip", "error"),
        help="shards, in memory and streamed: a sample that does not decode is skipped and "
        "counted, or stops the run (damaged shard files always stop it)",
    )
    max_bad_fraction: float = _opt(
        0.01,
        lo=0.0,
        hi=1.0,
        help="shards: stop when more than this share of a split is skipped as bad "
        "(0: not one; 1: no limit)",
    )
    augment_pad: int = _opt(1, lo=0, help="random-shift augmentation in pixels (0 = off)")
    augment_flip: bool = _opt(False, help="random horizontal flip")
    augment_prob: float = _opt(
        1.0, lo=0.0, hi=1.0, help="share of training samples augmented (AutoBalance can tune it)"
    )


@dataclass
class ModelConfig:
    name: str = _opt("small_cnn", help="small_cnn, resnet8/20/32/44/56, or tv:<torchvision name>")
    head: str = _opt(
        "linear", choices=("linear", "cosine"), help="classifier head (cosine: for ldam's scale)"
    )
    init_from: str = _opt(
        "",
        help="fine-tune: start from the weights a finished run tested (its run directory) or of "
        "one checkpoint file (RUN/checkpoints/epoch-NNNNNN.pt); optimiser and schedule start "
        "fresh (empty = random init)",
    )


@dataclass
class LossConfig:
    name: str = _opt(
        "ce",
        choices=("ce", "la", "balanced_softmax", "ldam", "ldam_drw", "cdt", "vs", "focal"),
        help="loss preset (README: Losses); AutoBalance starts from it",
    )
    tau: float = _opt(1.0, help="logit-adjustment strength (la, vs)")
    gamma: float = _opt(0.0, lo=0.0, help="cdt/vs exponent, focal gamma")
    ldam_max_margin: float = _opt(0.5, lo=0.0, help="ldam: margin of the rarest class")
    ldam_scale: float = _opt(30.0, lo=0.0, lo_open=True, help="ldam: logit scale s")
    drw_epoch: int = _opt(160, lo=0, help="ldam_drw: epoch at which re-weighting starts")
    drw_beta: float = _opt(0.9999, lo=0.0, hi=1.0, help="ldam_drw: class-balanced weight beta")


@dataclass
class MethodConfig:
    name: str = _opt("erm", help="training method: a registered one (built in: erm, autobalance)")


@dataclass
class AutoBalanceConfig:
    """`autobalance.*` (method.name=autobalance). Until 0.1 these keys sat in `method.*`;
    those names still load (ALIASES), so older config files and run directories resume."""

    # AutoBalance: the loss preset in `loss` is the initialisation (ce: neutral, la: l = tau*log pi,
    # cdt: delta ~ (n/n_max)^gamma, vs: both); these keys say what is tuned and how.
    tune: list = _opt(["l", "delta"], help="subset of w, l, delta, aug")
    dictionary: str = _opt(
        "per_class",
        choices=("per_class", "buckets", "interp"),
        help="frequency dictionary: per class, buckets by log-frequency, interp over rank",
    )
    dictionary_size: int = _opt(0, lo=0, help="K for buckets/interp (0 = number of classes)")
    hypergrad: str = _opt(
        "cg", choices=("exact", "cg", "neumann"), help="inverse-Hessian solve of the hypergradient"
    )
    scope: str = _opt(
        "head",
        choices=("head", "full"),
        help="hypergradient through the head only, or every weight",
    )
    solver_iterations: int = _opt(50, lo=1, help="CG/Neumann iterations (head: cheap)")
    damping: float = _opt(0.0, lo=0.0, help="extra lambda*I in the Hessian solve")
    curvature: str = _opt(
        "auto",
        choices=("auto", "hessian", "gauss_newton"),
        help="H in the solve; auto: hessian for scope=head, gauss_newton (PSD) for scope=full",
    )
    objective: str = _opt(
        "balanced_ce",
        choices=("balanced_ce", "worst_class", "blend", "equal_opportunity_gap"),
        help="validation objective the loss parameters are tuned for",
    )
    temperature: float = _opt(0.1, lo=0.0, lo_open=True, help="worst_class / EO soft-max T")
    blend_beta: float = _opt(
        0.5, lo=0.0, hi=1.0, help="blend, equal_opportunity_gap: weight of plain CE"
    )
    warmup_epochs: int = _opt(5, lo=0, help="epochs of plain training before hyper steps")
    hyper_interval: int = _opt(20, lo=1, help="a hyper step every k optimiser steps")
    hyper_batches: int = _opt(2, lo=1, help="train and val batches per hyper step")
    upper_optim: str = _opt(
        "adam", choices=("sgd", "adam"), help="optimiser of the loss parameters"
    )
    upper_lr: float = _opt(0.05, lo=0.0, lo_open=True, help="learning rate of the loss parameters")
    upper_momentum: float = _opt(0.9, lo=0.0, hi=1.0, help="upper_optim=sgd: momentum")
    clip: float = _opt(1.0, lo=0.0, help="max norm of the hypergradient (0 = off)")
    aug_init: float = _opt(0.5, lo=0.0, hi=1.0, help="initial per-class augmentation prob.")
    per_group: bool = _opt(
        False, help="w, l, delta per (group, class) cell (in-memory data with groups; not aug)"
    )
    retrain: bool = _opt(True, help="after the search, retrain on train+val with the found loss")


@dataclass
class OptimConfig:
    name: str = _opt("sgd", choices=("sgd", "adamw"), help="optimiser of the network weights")
    lr: float = _opt(0.1, lo=0.0, lo_open=True, help="base learning rate (the peak after warm-up)")
    momentum: float = _opt(0.9, lo=0.0, hi=1.0, help="sgd: momentum")
    nesterov: bool = _opt(False, help="sgd: Nesterov momentum")
    weight_decay: float = _opt(5e-4, lo=0.0, help="weight decay (also in the AutoBalance Hessian)")
    schedule: str = _opt(
        "cosine",
        choices=("cosine", "step", "constant"),
        help="lr after warm-up: cosine to 0, step (x gamma at milestones), constant",
    )
    warmup_epochs: float = _opt(
        0.0, lo=0.0, help="linear lr warm-up, in epochs (may be fractional)"
    )
    milestones: list = _opt([], help="step schedule: epochs at which lr *= gamma")
    gamma: float = _opt(0.1, lo=0.0, lo_open=True, help="step schedule decay factor")


@dataclass
class TrainConfig:
    name: str = _opt("run", help="run name; the default output dir is runs/<name>")
    epochs: int = _opt(30, lo=1, help="epochs per phase (AutoBalance: search and retrain each)")
    batch_size: int = _opt(64, lo=1, help="the GLOBAL batch: each of W ranks takes batch_size/W")
    eval_batch_size: int = _opt(512, lo=1, help="batch size of validation and test passes")
    grad_accum: int = _opt(1, lo=1, help="micro-batches per optimiser step")
    precision: str = _opt("fp32", choices=("fp32", "bf16"), help="bf16: autocast forward passes")
    seed: int = _opt(0, lo=0, help="seed of initialisation, batch order and augmentation")
    deterministic: bool = _opt(True, help="torch deterministic algorithms")
    threads: int = _opt(
        0, lo=0, help="torch CPU threads of the node, split among its ranks (0 = torch default)"
    )
    select: str = _opt("last", choices=("last", "best_val"), help="which weights to test")
    merge_val: bool = _opt(False, help="train on train+val (no validation metrics)")
    keep_checkpoints: int = _opt(2, lo=1, help="how many of the latest checkpoints to keep")
    many_shot_min: int = _opt(100, lo=0, help="many-shot: train count > this")
    positive_class: int = _opt(
        1, lo=0, help="group data: the class whose TPR the equal-opportunity gap compares"
    )
    few_shot_max: int = _opt(20, lo=0, help="few-shot: train count < this")
    device: str = _opt(
        "auto", choices=("auto", "cpu", "cuda"), help="auto: a GPU when one is visible, else cpu"
    )


@dataclass
class DistConfig:
    # Where the ranks are (torchrun env, a Slurm srun task, one process) is detected, not
    # configured: see abdist/engine/dist.py. train.batch_size is the GLOBAL batch.
    backend: str = _opt(
        "none",
        choices=("none", "ddp", "deepspeed"),
        help="none: one process; ddp: DistributedDataParallel; deepspeed: ZeRO (pip extra)",
    )
    zero_stage: int = _opt(0, lo=0, hi=2, help="deepspeed: ZeRO stage 0, 1 or 2")
    sync_bn: bool = _opt(
        False, help="BatchNorm statistics over the global batch (ddp/deepspeed, >1 rank)"
    )
    hyper_shard: str = _opt(
        "val",
        choices=("none", "val", "train_val"),
        help="hyper step batches split across ranks: none (exact for every objective, W x the "
        "validation work), val only (exact for sample-mean objectives), or train too (1/W the "
        "work, a mean of per-rank estimates)",
    )
    timeout_s: float = _opt(
        600.0, lo=0.0, lo_open=True, help="a rank waiting on a dead peer gives up after this"
    )


@dataclass
class TrackingConfig:
    backend: str = _opt(
        "jsonl", choices=("jsonl", "wandb", "none"), help="wandb: log.jsonl + Weights & Biases"
    )
    progress: str = _opt("auto", choices=("auto", "always", "never"), help="progress bars")
    project: str = _opt("abdist", help="wandb project")
    entity: str = _opt("", help="wandb entity (team/user; empty = your default)")
    mode: str = _opt(
        "offline",
        choices=("offline", "online", "disabled"),
        help="wandb: offline writes files only (`wandb sync` them later); online needs a login",
    )
    dir: str = _opt("", help="wandb: where its files go (empty = the run directory)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    autobalance: AutoBalanceConfig = field(default_factory=AutoBalanceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))

# Old key -> its name now. Every config file and run directory (config.yaml) written before a key
# moved still loads under its old name; `abdist config` and new run directories use the new one.
ALIASES = {
    f"method.{f.name}": f"autobalance.{f.name}" for f in dataclasses.fields(AutoBalanceConfig)
}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. 'optim.lr'."""
    cfg = Config()
    return [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(cfg, s))]


def describe_key(meta: dict) -> str:
    """A field's meaning and allowed values, e.g. 'lr schedule ...; one of cosine, step'."""
    parts = [meta["help"]] if meta.get("help") else []
    if meta.get("choices"):
        parts.append("one of " + ", ".join(map(str, meta["choices"])))
    bounds = []
    if meta.get("lo") is not None:
        bounds.append(f"{'>' if meta.get('lo_open') else '>='} {meta['lo']}")
    if meta.get("hi") is not None:
        bounds.append(f"<= {meta['hi']}")
    if bounds:
        parts.append(" and ".join(bounds))
    return "; ".join(parts)


def explain_yaml(cfg: Config) -> str:
    """`cfg` as YAML (what `to_yaml` writes) with each key's meaning as a trailing comment."""
    lines = [
        "# every key: its value, what it means and what it accepts (`abdist config --explain`)"
    ]
    body = []
    for s in SECTIONS:
        section = getattr(cfg, s)
        body.append((f"{s}:", ""))
        for f in dataclasses.fields(section):
            value = yaml.safe_dump(
                getattr(section, f.name), default_flow_style=True, width=float("inf")
            )
            value = value.removesuffix("\n").removesuffix("\n...").strip()
            text = "\n".join("    " + ln for ln in value.splitlines())
            text = f"  {f.name}: {value}" if "\n" not in value else f"  {f.name}:\n{text}"
            body.append((text, describe_key(f.metadata)))
    col = min(40, max(len(k) for k, _ in body if "\n" not in k) + 2)
    for text, comment in body:
        if not comment:
            lines.append(text)
        elif "\n" in text:  # a value YAML spreads over several lines: the comment goes above
            lines += [f"  # {comment}", text]
        else:
            lines.append(f"{text.ljust(col)}# {comment}")
    return "\n".join(lines) + "\n"


def suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _suggest_key(dotted: str) -> str:
    """The closest valid key, old names included (a near-miss of `method.tune` suggests its new
    name, `autobalance.tune`)."""
    close = difflib.get_close_matches(dotted, [*all_keys(), *ALIASES], n=1, cutoff=0.5)
    return f" (did you mean '{ALIASES.get(close[0], close[0])}'?)" if close else ""


def _field_type(section_obj, name: str):
    hints = typing.get_type_hints(type(section_obj))
    return hints[name]


def _coerce(key: str, value: Any, typ, where: str) -> Any:
    """Check `value` against the declared type; ints are accepted where floats are expected."""
    origin = typing.get_origin(typ)
    if origin in (list,) or typ is list:
        if value is None:
            return []
        if not isinstance(value, list):
            value = [value]
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0], where)
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(
        f"{where}: '{key}' must be {typ.__name__}, got {value!r} ({type(value).__name__})"
    )


def _check_range(key: str, value: Any, meta: dict, where: str) -> None:
    choices, lo, hi = meta.get("choices"), meta.get("lo"), meta.get("hi")
    if choices is not None and value not in choices:
        hint = suggest(str(value), list(choices))
        raise UserError(
            f"{where}: '{key}' must be one of {', '.join(choices)}; got {value!r}{hint}"
        )
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
            op = ">" if meta.get("lo_open") else ">="
            raise UserError(f"{where}: '{key}' must be {op} {lo}; got {value}")
        if hi is not None and value > hi:
            raise UserError(f"{where}: '{key}' must be <= {hi}; got {value}")


def set_key(cfg: Config, dotted: str, value: Any, where: str = "override") -> None:
    """Set `section.key` on cfg after validating it (unknown key -> closest-key suggestion).
    An old key name (ALIASES) sets its new key; messages keep the name the user wrote."""
    given, dotted = dotted, ALIASES.get(dotted, dotted)
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise UserError(
            f"{where}: unknown config key '{given}'{_suggest_key(given)}; "
            "keys look like section.key (see `abdist config`)"
        )
    section, name = parts
    section_obj = getattr(cfg, section)
    names = {f.name: f for f in dataclasses.fields(section_obj)}
    if name not in names:
        raise UserError(f"{where}: unknown config key '{given}'{_suggest_key(given)}")
    value = _coerce(given, value, _field_type(section_obj, name), where)
    _check_range(given, value, dict(names[name].metadata), where)
    setattr(section_obj, name, value)


def _apply_mapping(cfg: Config, data: Any, where: str) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise UserError(
                f"{where}: unknown config section '{section}'"
                f"{suggest(str(section), list(SECTIONS))}; sections: {', '.join(SECTIONS)}"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UserError(f"{where}: section '{section}' must be a mapping of key: value")
        for key, value in values.items():
            set_key(cfg, f"{section}.{key}", value, where)


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=0.1' -> ('optim.lr', 0.1); the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise UserError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _apply_file(cfg: Config, path: Path, seen: tuple[Path, ...] = ()) -> None:
    """Apply a YAML file; a top-level `base: other.yaml` (relative to it) is applied first."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise UserError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{line} is not valid YAML ({exc.__class__.__name__})") from None
    if isinstance(data, dict) and "base" in data:
        data = dict(data)
        _apply_file(cfg, path.parent / str(data.pop("base")), (*seen, path.resolve()))
    _apply_mapping(cfg, data, str(path))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file (after its `base` chain) <- overrides, every step validated."""
    cfg = Config()
    if path is not None:
        _apply_file(cfg, Path(path))
    for text in overrides:
        key, value = parse_override(text)
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


def config_from_dict(data: dict, where: str = "config") -> Config:
    cfg = Config()
    _apply_mapping(cfg, data, where)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a single key cannot express."""
    from abdist import methods  # imported here: the methods themselves import this module

    # A registered method, or one line with a suggestion; then its own cross-key checks.
    methods.get(cfg.method.name).validate(cfg)
    if cfg.data.val >= 1 and cfg.data.val != int(cfg.data.val):
        raise UserError(
            f"'data.val' is a fraction (<1) or a whole count per class; got {cfg.data.val}"
        )
    if cfg.train.few_shot_max > cfg.train.many_shot_min:
        raise UserError(
            "'train.few_shot_max' must not exceed 'train.many_shot_min' "
            f"({cfg.train.few_shot_max} > {cfg.train.many_shot_min})"
        )
    for m in cfg.optim.milestones:
        if not isinstance(m, (int, float)) or isinstance(m, bool) or m < 0:
            raise UserError(f"'optim.milestones' must be a list of epochs >= 0; got {m!r}")
    if cfg.data.source == "digits" and not cfg.data.in_memory:
        raise UserError(
            "'data.in_memory=false' streams prepared shards; data.source=digits is always in "
            "memory (drop the key, or prepare shards and set data.source=shards)"
        )
    if cfg.data.source == "shards" and not cfg.data.root:
        raise UserError("'data.root' must name a shard directory when data.source=shards")
    if cfg.train.merge_val and cfg.train.select == "best_val":
        raise UserError("'train.select=best_val' needs a validation split; unset train.merge_val")
    if cfg.dist.zero_stage and cfg.dist.backend != "deepspeed":
        raise UserError(
            f"'dist.zero_stage={cfg.dist.zero_stage}' needs 'dist.backend=deepspeed' "
            f"(got '{cfg.dist.backend}')"
        )
    if cfg.optim.warmup_epochs > cfg.train.epochs:
        raise UserError(
            f"'optim.warmup_epochs' ({cfg.optim.warmup_epochs}) exceeds "
            f"'train.epochs' ({cfg.train.epochs}): set optim.warmup_epochs={cfg.train.epochs} "
            f"(or less), or train.epochs={math.ceil(cfg.optim.warmup_epochs)} (or more)"
        )


def check_positive_class(cfg: Config, num_classes: int) -> int:
    """`train.positive_class`, checked against the data's number of classes (known only now)."""
    p = cfg.train.positive_class
    if p >= num_classes:
        raise UserError(
            f"'train.positive_class' is {p} but the data has {num_classes} classes "
            f"(0..{num_classes - 1}); set it to the class whose TPR the groups should share"
        )
    return p
