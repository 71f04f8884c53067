"""Typed run configuration: dataclass sections, YAML files, `section.key=value` overrides.

Every key is declared once, here, with its type and (where it matters) its allowed values or range.
Anything else a user writes -- an unknown key, a wrong type, an out-of-range value -- becomes a
`UserError` naming the key and, for unknown keys, the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from abdist.config_checks import validate
from abdist.config_methods import AutoBalanceConfig, SelMixConfig
from abdist.config_values import check_range, coerce, describe_key, opt, suggest
from abdist.errors import UserError


@dataclass
class DataConfig:
    source: str = opt("digits", choices=("digits", "shards"), help="where the data comes from")
    root: str = opt("", help="shards: directory written by `abdist prepare`")
    in_memory: bool = opt(True, help="shards: decode everything into RAM (small datasets)")
    profile: str = opt("exp", choices=("exp", "step"), help="long-tail profile")
    imbalance_ratio: float = opt(10.0, lo=1.0, help="rho = n_max / n_min")
    minority_fraction: float = opt(0.5, lo=0.0, hi=1.0, help="step profile: minority share")
    val: float = opt(0.2, lo=0.0, lo_open=True, help="val fraction (<1) or count per class")
    test_per_class: int = opt(50, lo=1, help="balanced test samples per class (digits)")
    seed: int = opt(0, lo=0, help="seed of the subsample and split")
    workers: int = opt(2, lo=0, help="streaming: loader worker processes per rank")
    shuffle_buffer: int = opt(1000, lo=0, help="streaming: samples each worker shuffles among")
    bad_data: str = opt(
        "skip",
        choices=("skip", "error"),
        help="shards, in memory and streamed: a sample that does not decode is skipped and "
        "counted, or stops the run (damaged shard files always stop it)",
    )
    max_bad_fraction: float = opt(
        0.01,
        lo=0.0,
        hi=1.0,
        help="shards: stop when more than this share of a split is skipped as bad "
        "(0: not one; 1: no limit)",
    )
    augment_pad: int = opt(1, lo=0, help="random-shift augmentation in pixels (0 = off)")
    augment_flip: bool = opt(False, help="random horizontal flip")
    augment_ops: list = opt(
        [],
        help="class-aware RandAugment-style chain: ops among rotate, translate, brightness, "
        "contrast, hflip, cutout ([] = no chain); see abdist/data/augment_chain.py",
    )
    augment_num_ops: int = opt(
        2, lo=1, help="chain: distinct ops per augmented sample (at most all of augment_ops)"
    )
    augment_prob: float = opt(
        1.0,
        lo=0.0,
        hi=1.0,
        help="chain: share of each class's training samples it runs on (AutoBalance: aug)",
    )
    augment_magnitude: float = opt(
        0.5,
        lo=0.0,
        hi=1.0,
        help="chain: strength in [0, 1], 1 = RandAugment's maximum (AutoBalance: aug_mag)",
    )
    augment_lag: int = opt(
        4,
        lo=0,
        help="chain: batch b uses the per-class table as it stood after batch b-1-lag, so "
        "loader workers may run lag batches ahead (see abdist/data/augment_table.py)",
    )


@dataclass
class ModelConfig:
    name: str = opt("small_cnn", help="small_cnn, resnet8/20/32/44/56, or tv:<torchvision name>")
    head: str = opt(
        "linear", choices=("linear", "cosine"), help="classifier head (cosine: for ldam's scale)"
    )
    init_from: str = opt(
        "",
        help="fine-tune: start from the weights a finished run tested (its run directory) or of "
        "one checkpoint file (RUN/checkpoints/epoch-NNNNNN.pt); optimiser and schedule start "
        "fresh (empty = random init)",
    )


@dataclass
class LossConfig:
    name: str = opt(
        "ce",
        choices=("ce", "la", "balanced_softmax", "ldam", "ldam_drw", "cdt", "vs", "focal"),
        help="loss preset (README: Losses); AutoBalance starts from it",
    )
    tau: float = opt(1.0, help="logit-adjustment strength (la, vs)")
    gamma: float = opt(0.0, lo=0.0, help="cdt/vs exponent, focal gamma")
    ldam_max_margin: float = opt(0.5, lo=0.0, help="ldam: margin of the rarest class")
    ldam_scale: float = opt(30.0, lo=0.0, lo_open=True, help="ldam: logit scale s")
    drw_epoch: int = opt(160, lo=0, help="ldam_drw: epoch at which re-weighting starts")
    drw_beta: float = opt(0.9999, lo=0.0, hi=1.0, help="ldam_drw: class-balanced weight beta")
    sample_weights: str = opt(
        "none",
        choices=("none", "class_balanced", "group_balanced"),
        help="erm: per-sample weights 1/n(class) or 1/n(group, class), mean 1 over train",
    )


@dataclass
class MethodConfig:
    name: str = opt(
        "erm", help="training method: a registered one (built in: erm, autobalance, selmix)"
    )


@dataclass
class OptimConfig:
    name: str = opt("sgd", choices=("sgd", "adamw"), help="optimiser of the network weights")
    lr: float = opt(0.1, lo=0.0, lo_open=True, help="base learning rate (the peak after warm-up)")
    momentum: float = opt(0.9, lo=0.0, hi=1.0, help="sgd: momentum")
    nesterov: bool = opt(False, help="sgd: Nesterov momentum")
    weight_decay: float = opt(5e-4, lo=0.0, help="weight decay (also in the AutoBalance Hessian)")
    schedule: str = opt(
        "cosine",
        choices=("cosine", "step", "constant"),
        help="lr after warm-up: cosine to 0, step (x gamma at milestones), constant",
    )
    warmup_epochs: float = opt(0.0, lo=0.0, help="linear lr warm-up, in epochs (may be fractional)")
    milestones: list = opt([], help="step schedule: epochs at which lr *= gamma")
    gamma: float = opt(0.1, lo=0.0, lo_open=True, help="step schedule decay factor")


@dataclass
class TrainConfig:
    name: str = opt("run", help="run name; the default output dir is runs/<name>")
    epochs: int = opt(30, lo=1, help="epochs per phase (AutoBalance: search and retrain each)")
    batch_size: int = opt(64, lo=1, help="the GLOBAL batch: each of W ranks takes batch_size/W")
    eval_batch_size: int = opt(512, lo=1, help="batch size of validation and test passes")
    grad_accum: int = opt(1, lo=1, help="micro-batches per optimiser step")
    precision: str = opt("fp32", choices=("fp32", "bf16"), help="bf16: autocast forward passes")
    seed: int = opt(0, lo=0, help="seed of initialisation, batch order and augmentation")
    deterministic: bool = opt(True, help="torch deterministic algorithms")
    threads: int = opt(
        0, lo=0, help="torch CPU threads of the node, split among its ranks (0 = torch default)"
    )
    select: str = opt("last", choices=("last", "best_val"), help="which weights to test")
    merge_val: bool = opt(False, help="train on train+val (no validation metrics)")
    keep_checkpoints: int = opt(2, lo=1, help="how many of the latest checkpoints to keep")
    many_shot_min: int = opt(100, lo=0, help="many-shot: train count > this")
    positive_class: int = opt(
        1, lo=0, help="group data: the class whose TPR the equal-opportunity gap compares"
    )
    few_shot_max: int = opt(20, lo=0, help="few-shot: train count < this")
    device: str = opt(
        "auto", choices=("auto", "cpu", "cuda"), help="auto: a GPU when one is visible, else cpu"
    )


@dataclass
class DistConfig:
    # Where the ranks are (torchrun env, a Slurm srun task, one process) is detected, not
    # configured: see abdist/engine/dist.py. train.batch_size is the GLOBAL batch.
    backend: str = opt(
        "none",
        choices=("none", "ddp", "deepspeed"),
        help="none: one process; ddp: DistributedDataParallel; deepspeed: ZeRO (pip extra)",
    )
    zero_stage: int = opt(0, lo=0, hi=2, help="deepspeed: ZeRO stage 0, 1 or 2")
    sync_bn: bool = opt(
        False, help="BatchNorm statistics over the global batch (ddp/deepspeed, >1 rank)"
    )
    hyper_shard: str = opt(
        "val",
        choices=("none", "val", "train_val"),
        help="hyper step batches split across ranks: none (exact for every objective, W x the "
        "validation work), val only (exact for sample-mean objectives), or train too (1/W the "
        "work, a mean of per-rank estimates)",
    )
    timeout_s: float = opt(
        600.0, lo=0.0, lo_open=True, help="a rank waiting on a dead peer gives up after this"
    )


@dataclass
class TrackingConfig:
    backend: str = opt(
        "jsonl", choices=("jsonl", "wandb", "none"), help="wandb: log.jsonl + Weights & Biases"
    )
    progress: str = opt("auto", choices=("auto", "always", "never"), help="progress bars")
    project: str = opt("abdist", help="wandb project")
    entity: str = opt("", help="wandb entity (team/user; empty = your default)")
    mode: str = opt(
        "offline",
        choices=("offline", "online", "disabled"),
        help="wandb: offline writes files only (`wandb sync` them later); online needs a login",
    )
    dir: str = opt("", help="wandb: where its files go (empty = the run directory)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    autobalance: AutoBalanceConfig = field(default_factory=AutoBalanceConfig)
    selmix: SelMixConfig = field(default_factory=SelMixConfig)
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


def _suggest_key(dotted: str) -> str:
    """The closest valid key, old names included (a near-miss of `method.tune` suggests its new
    name, `autobalance.tune`)."""
    close = difflib.get_close_matches(dotted, [*all_keys(), *ALIASES], n=1, cutoff=0.5)
    return f" (did you mean '{ALIASES.get(close[0], close[0])}'?)" if close else ""


def _field_type(section_obj, name: str):
    hints = typing.get_type_hints(type(section_obj))
    return hints[name]


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
    value = coerce(given, value, _field_type(section_obj, name), where)
    check_range(given, value, dict(names[name].metadata), where)
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
