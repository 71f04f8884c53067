"""`model.init_from`: start training from the weights of an earlier run (fine-tuning).

`load_init_weights(model, source)` copies weights into a freshly built model, strictly (every
key, every shape), and returns a small record of where they came from. `source` is:

- a checkpoint file (`RUN/checkpoints/epoch-NNNNNN.pt`): the weights after that epoch
  (`state["model"]`, never its `best_weights`);
- a checkpoints directory (`RUN/checkpoints`): its newest checkpoint's weights;
- a finished run directory (it has `metrics.json`): the weights that run TESTED -- its last epoch,
  or with `train.select=best_val` the best epoch's `best_weights`; for an AutoBalance run with a
  retrain phase, that phase's (`RUN/retrain`). A phase directory (`RUN/search`) is a run too.

A run directory whose newest readable checkpoint is not the one its metrics came from (the newest
was damaged after the run) is refused rather than silently loading other weights. DeepSpeed runs
need nothing special: ZeRO stages 0-2 keep whole parameters, and `state["model"]` holds them
(the `deepspeed/` partitions are optimiser state, which a fine-tune starts afresh anyway).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml

from abdist.engine.checkpoint import CheckpointDir, CheckpointUnreadable, sidecar_path
from abdist.errors import UserError

KEY = "model.init_from"


def load_init_weights(model: nn.Module, source: str | Path) -> dict[str, Any]:
    """Load `source`'s weights into `model` (strict); return
    `{"init_from": resolved path of the checkpoint file, "epoch": 1-based epoch of the weights,
    "sha256": of the checkpoint file}`. Every problem is a one-line `UserError`."""
    path = Path(source).expanduser()
    if not str(source).strip():
        raise UserError(f"{KEY} is empty; name a run directory or a checkpoint file")
    if not path.exists():
        raise UserError(
            f"{KEY}: {source} does not exist; name a finished run directory or a checkpoint file "
            "(RUN/checkpoints/epoch-NNNNNN.pt)"
        )
    path = path.resolve()
    if path.is_file():
        state, ckpt = _load_file(path), path
        weights, epoch = state["model"] if "model" in state else None, state["epoch"] + 1
    elif _is_run_dir(path):
        weights, epoch, ckpt, state = _tested_weights(path)
    elif _is_checkpoint_dir(path):
        state, ckpt = _newest(path)
        weights, epoch = state.get("model"), state["epoch"] + 1
    else:
        raise UserError(
            f"{KEY}: {path} is neither a run directory (config.yaml, metrics.json) nor a "
            "checkpoint file; name RUN or RUN/checkpoints/epoch-NNNNNN.pt"
        )
    if not isinstance(weights, dict):
        raise UserError(f"{KEY}: {ckpt} holds no model weights (not an abdist training checkpoint)")
    _check_fits(model, weights, ckpt)
    model.load_state_dict(weights, strict=True)
    return {"init_from": str(ckpt), "epoch": epoch, "sha256": _sha256(ckpt)}


def trained_on_val(checkpoint: str | Path) -> bool:
    """Whether the weights in `checkpoint` (a file `load_init_weights` resolved) were trained on
    the validation split too: a retrain phase (RUN/retrain) or a run with train.merge_val."""
    phase = Path(checkpoint).parent.parent
    train = _read_yaml(phase / "config.yaml").get("train")
    return phase.name == "retrain" or (isinstance(train, dict) and bool(train.get("merge_val")))


# --- resolving the source -----------------------------------------------------------------------


def _load_file(path: Path) -> dict[str, Any]:
    try:
        return CheckpointDir(path.parent).load(path)  # checks the sha256 sidecar first
    except CheckpointUnreadable as exc:
        raise UserError(f"{KEY}: {exc}; point it at another checkpoint or run") from None


def _is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in ("config.yaml", "metrics.json", "log.jsonl"))


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / "latest").exists() or any(path.glob("epoch-*.pt"))


def _newest(root: Path) -> tuple[dict[str, Any], Path]:
    """The newest checkpoint of a checkpoints directory, refused if it had to skip a newer one."""
    ckpts = CheckpointDir(root)
    expected = ckpts.latest() or next(iter(ckpts.files()), None)
    state, path, problems = ckpts.load_newest()
    if state is None:
        why = problems[0] if problems else "no checkpoint in it"
        raise UserError(f"{KEY}: {root} has no readable checkpoint ({why})")
    if path != expected:
        raise UserError(
            f"{KEY}: the newest checkpoint in {root} is unreadable ({problems[-1]}); to start "
            f"from the one before, set {KEY}={path}"
        )
    return state, path


def _tested_weights(run: Path) -> tuple[Any, int, Path, dict[str, Any]]:
    """(weights, 1-based epoch, checkpoint file, its state) of what the run in `run` tested."""
    if not (run / "metrics.json").is_file():
        newest = _newest_file(run)
        hint = f"set {KEY}={newest}" if newest else f"set {KEY} to one of its checkpoint files"
        raise UserError(
            f"{KEY}: {run} has not finished (no metrics.json); finish it (rerun the same command), "
            f"or to fine-tune from a checkpoint of the unfinished run, {hint}"
        )
    phase = run / "retrain" if (run / "retrain").is_dir() else run  # AutoBalance: the retrain
    cfg = _read_yaml(phase / "config.yaml") or _read_yaml(run / "config.yaml")
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    select, epochs = train.get("select", "last"), train.get("epochs")
    ckpts = CheckpointDir(phase / "checkpoints")
    state, path, problems = ckpts.load_newest()
    if state is None:
        why = problems[0] if problems else f"no checkpoint in {ckpts.root}"
        raise UserError(f"{KEY}: {run} has no readable checkpoint left ({why})")
    best = state.get("best") if isinstance(state.get("best"), dict) else {}
    if select == "best_val" and state.get("best_weights") is not None:
        weights, epoch = state["best_weights"], best.get("epoch", -1) + 1
        tested = _selected_epoch(phase) or _selected_epoch(run)
    else:  # the last epoch's (best_val without validation data also tests the last weights)
        weights, epoch, tested = state.get("model"), state["epoch"] + 1, epochs
    if tested is not None and epoch != tested:
        why = f" ({problems[-1]})" if problems else ""
        raise UserError(
            f"{KEY}: {run} tested the weights of epoch {tested}, but its newest readable "
            f"checkpoint {path.name} holds epoch {epoch}'s{why}; to use those, set {KEY}={path}"
        )
    return weights, epoch, path, state


def _newest_file(run: Path) -> Path | None:
    """The newest checkpoint file anywhere in a (possibly multi-phase) run, for a hint."""
    files = [p for d in ("retrain", "search", ".") for p in (run / d / "checkpoints").glob("*.pt")]
    return max(files, key=lambda p: (p.parent.parent.name == "retrain", p.name), default=None)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _selected_epoch(phase: Path) -> int | None:
    try:
        value = json.loads((phase / "metrics.json").read_text()).get("selected_epoch")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def _sha256(path: Path) -> str:
    """The sidecar's digest (`CheckpointDir.load` has just verified it), else the file's."""
    try:
        digest = sidecar_path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        digest = ""
    if len(digest) == 64:
        return digest
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- strict fit ---------------------------------------------------------------------------------


def _check_fits(model: nn.Module, weights: dict[str, Any], source: Path) -> None:
    """One line naming up to 3 missing, unexpected and mis-shaped keys, if any."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [
        f"{k} {_shape(weights[k])} vs model {_shape(own[k])}"
        for k in own
        if k in weights and _shape(weights[k]) != _shape(own[k])
    ]
    parts = [
        f"{what} {_few(keys)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if keys
    ]
    if parts:
        raise UserError(
            f"{KEY}: the weights in {source} do not fit this model ({'; '.join(parts)}); "
            "model.name, model.head and the number of classes must match the source run's"
        )


def _shape(t: Any) -> list[int] | None:
    shape = getattr(t, "shape", None)
    return list(shape) if shape is not None else None


def _few(items: list[str], n: int = 3) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
