"""Weights & Biases tracking: `tracking.backend=wandb`, offline by default.

The trainer talks to a tracker through three calls (`make_tracker` gives it one):

    tracker = make_tracker(cfg, run_dir, rank=dist.rank)   # after the checkpoint is loaded
    tracker.log(record)                                    # every epoch, next to log.jsonl
    tracker.log_summary(metrics, alpha, report_files=None) # once, after metrics.json is written
    tracker.finish()                                       # always (finally:), exit_code=1 on error

Only rank 0 logs; every other rank (and every backend but `wandb`) gets a `NullTracker`.

What lands in W&B: the resolved config; per-epoch records (x axis: `epoch`, so a resumed run that
re-logs an epoch is fine); the final test metrics in the summary; a per-class table (count,
training frequency, recall) and the learned loss parameters against frequency (`alpha` table plus
one scatter plot per parameter); the report PNGs (per-class recall, loss parameters).

Offline by default and nothing outside the run directory: unless `tracking.mode=online`, W&B runs
with WANDB_MODE=offline (no network at all; `wandb sync RUN/wandb/offline-run-*` uploads later),
and WANDB_DIR, WANDB_CACHE_DIR, WANDB_CONFIG_DIR, WANDB_DATA_DIR point under `tracking.dir`
(default: the run directory) unless the user set them; `finish()` restores the environment.
A requeued or resumed run continues the same W&B run (its id is kept in RUN/.wandb_run_id).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from abdist.errors import UserError
from abdist.metrics import GROUP_SCALAR_METRICS, SCALAR_METRICS

SUMMARY_KEYS = (*SCALAR_METRICS, *GROUP_SCALAR_METRICS, "selected_epoch")
ALPHA_KEYS = ("w", "l", "delta", "margin", "aug")


class NullTracker:
    """Tracks nothing: other ranks, and backends other than wandb (log.jsonl is the trainer's)."""

    active = False

    def log(self, record: dict[str, Any]) -> None:
        pass

    def log_summary(self, metrics, alpha=None, report_files=None) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def current_rank() -> int:
    """This process's rank: the process group's if one exists, else RANK / SLURM_PROCID, else 0."""
    tdist = sys.modules.get("torch.distributed")  # never import torch just to ask
    if tdist is not None and tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank()
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def wandb_env(cfg, run_dir: str | Path) -> dict[str, str]:
    """The WANDB_* variables a run sets: mode from the config, every directory under the run."""
    base = Path(cfg.tracking.dir or run_dir).resolve()
    env = {"WANDB_MODE": cfg.tracking.mode, "WANDB_DIR": str(base)}
    for var, sub in (
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_DATA_DIR", "data"),
    ):
        # An explicit user setting wins (e.g. a shared cache, or the config dir holding a login).
        env[var] = os.environ.get(var) or str(base / "wandb" / f".{sub}")
    return env


class WandbTracker:
    """A W&B run for one training phase; see the module docstring."""

    active = True

    def __init__(self, cfg, run_dir: str | Path, *, job_type: str | None = None):
        try:
            import wandb
        except ImportError:
            raise UserError(
                "tracking.backend=wandb needs the wandb package: pip install wandb"
            ) from None
        self._wandb = wandb
        self.run_dir = Path(run_dir)
        self._saved_env: dict[str, str | None] = {}
        env = wandb_env(cfg, self.run_dir)
        for key, value in env.items():
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            Path(env[key]).mkdir(parents=True, exist_ok=True)

        phase = self.run_dir.name if self.run_dir.name in ("search", "retrain") else None
        if wandb.run is not None:
            # A sweep agent (abdist agent) already started this trial's run: log into it.
            self.run, self.owned = wandb.run, False
            self.run.config.update({"abdist": cfg.to_dict()}, allow_val_change=True)
        else:
            self.run = wandb.init(
                project=cfg.tracking.project or None,
                entity=cfg.tracking.entity or None,
                name=cfg.train.name + (f"/{phase}" if phase else ""),
                group=cfg.train.name if phase else None,
                job_type=job_type or phase or "train",
                config=cfg.to_dict(),
                dir=env["WANDB_DIR"],
                mode=cfg.tracking.mode,
                id=self._run_id(),
                resume="allow",
            )
            self.owned = True
        # History is indexed by epoch, not by wandb's own step counter: a resumed run that logs
        # an epoch again after a requeue does not trip over "step must increase".
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")

    def _run_id(self) -> str:
        path = self.run_dir / ".wandb_run_id"
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        run_id = secrets.token_hex(4)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
        return run_id

    def log(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if _is_number(v)})

    def log_summary(
        self,
        metrics: dict[str, Any],
        alpha: dict[str, Any] | None = None,
        report_files: list[str | Path] | None = None,
    ) -> None:
        """Final metrics (summary), per-class and alpha tables/plots, and the report PNGs.

        `report_files=None` draws them here (abdist.report.plot_runs into RUN/report).
        """
        wandb = self._wandb
        for key in SUMMARY_KEYS:
            if _is_number(metrics.get(key)):
                self.run.summary[key] = metrics[key]
        for key, value in (metrics.get("search") or {}).items():
            if _is_number(value):
                self.run.summary[f"search/{key}"] = value
        payload: dict[str, Any] = {}
        counts = metrics.get("class_counts") or (alpha or {}).get("class_counts") or []
        total = sum(counts) or 1
        names = metrics.get("class_names") or [str(i) for i in range(len(counts))]
        recall = metrics.get("per_class_recall") or []
        if counts and len(recall) == len(counts):
            payload["per_class"] = wandb.Table(
                columns=["class", "name", "train_count", "frequency", "recall"],
                data=[
                    [i, str(names[i]), counts[i], counts[i] / total, recall[i]]
                    for i in range(len(counts))
                ],
            )
            payload["per_class_recall"] = wandb.plot.scatter(
                payload["per_class"], "train_count", "recall", title="recall vs training count"
            )
        if alpha:
            acounts = alpha.get("class_counts") or counts
            keys = [
                k
                for k in ALPHA_KEYS
                if isinstance(alpha.get(k), list) and len(alpha[k]) == len(acounts)
            ]
            if acounts and keys:
                atotal = sum(acounts) or 1
                table = wandb.Table(
                    columns=["class", "train_count", "frequency", *keys],
                    data=[
                        [i, acounts[i], acounts[i] / atotal, *(alpha[k][i] for k in keys)]
                        for i in range(len(acounts))
                    ],
                )
                payload["alpha"] = table
                for k in keys:
                    payload[f"alpha_vs_frequency/{k}"] = wandb.plot.scatter(
                        table, "frequency", k, title=f"{k} vs training frequency"
                    )
        if report_files is None:
            report_files = self._draw_report(metrics, alpha)
        for path in report_files or []:
            path = Path(path)
            if path.is_file() and path.suffix.lower() == ".png":
                payload[f"report/{path.stem}"] = wandb.Image(str(path))
        if payload:
            self.run.log(payload)

    def _draw_report(self, metrics: dict, alpha: dict | None) -> list[Path]:
        from abdist.report import plot_runs

        run = {"name": metrics.get("name") or self.run_dir.name, "metrics": metrics}
        run["alpha"] = alpha
        return plot_runs([run], self.run_dir / "report")

    def finish(self, exit_code: int = 0) -> None:
        try:
            if self.owned:
                self.run.finish(exit_code=exit_code)
        finally:
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self._saved_env = {}


def make_tracker(cfg, run_dir: str | Path, *, rank: int | None = None, job_type=None):
    """The tracker for this process: W&B on rank 0 when tracking.backend=wandb, else a no-op."""
    if cfg.tracking.backend != "wandb" or cfg.tracking.mode == "disabled":
        return NullTracker()
    if (current_rank() if rank is None else rank) != 0:
        return NullTracker()
    return WandbTracker(cfg, run_dir, job_type=job_type)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --- reading an offline run back (tests, and `wandb sync`-free inspection) ------------------------


def offline_runs(run_dir: str | Path) -> list[Path]:
    """The offline run directories under RUN/wandb (oldest first)."""
    root = Path(run_dir) / "wandb"
    return sorted(p for p in root.glob("offline-run-*") if p.is_dir())


def _records(path: Path) -> Iterator[bytes]:
    """Raw records of a .wandb file (W&B's LevelDB-style log: 32 KiB blocks, 7-byte headers)."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # still being written
            return
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            buf = chunk
        elif kind == 3:  # middle
            buf += chunk
        elif kind == 4:  # last
            yield buf + chunk
        elif kind == 0 and length == 0:  # zero padding up to the next block
            pos += block - pos % block if pos % block else 0


def read_offline_run(run_path: str | Path) -> dict[str, Any]:
    """{'config', 'history' (list of dicts), 'summary', 'finished'} of an offline run directory.

    `finished` is whether the run's exit record is there yet: W&B's service writes the file
    asynchronously, so a reader right after `finish()` may have to poll for it.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    run_path = Path(run_path)
    files = sorted(run_path.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_path}")

    def items(updates) -> dict[str, Any]:
        out = {}
        for item in updates:
            key = item.key or "/".join(item.nested_key)
            try:
                out[key] = json.loads(item.value_json)
            except json.JSONDecodeError:
                out[key] = item.value_json
        return out

    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    finished = False
    for raw in _records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            config.update(items(rec.run.config.update))
        elif kind == "config":
            config.update(items(rec.config.update))
        elif kind == "history":
            history.append(items(rec.history.item))
        elif kind == "summary":
            summary.update(items(rec.summary.update))
        elif kind == "exit":
            finished = True
    return {"config": config, "history": history, "summary": summary, "finished": finished}
