"""Atomic checkpoints with a `latest` pointer, so a killed run always resumes from a whole file.

Layout under <run>/checkpoints/: `epoch-000007.pt` files and a text file `latest` naming the newest.
The pointer is rewritten only after the checkpoint itself has been renamed into place.

With several ranks only rank 0 writes (`writer=True`): the epoch file holds what every rank
shares (model, optimiser, schedule, alpha) plus the RNG state of EVERY rank (gathered first), so
each rank can continue its own random stream. DeepSpeed's per-rank optimiser partitions live in
`deepspeed/epoch-000007/`, written by all ranks before rank 0 writes the epoch file that names
them, and pruned with it.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from abdist.io import atomic_write, write_text


def rng_state() -> dict[str, Any]:
    """Every RNG the loop may draw from, so a resumed run continues the same random stream."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointDir:
    """The checkpoints of one training phase.

    Loading never silently loses a run: `load_newest()` takes the newest checkpoint that reads
    back whole (its sha256 sidecar, written with it, is checked first) and reports every newer
    one it had to skip, so the trainer can say so; a damaged or missing `latest` pointer only
    means the directory is scanned instead.
    """

    def __init__(self, root: str | Path, keep: int = 2, writer: bool = True):
        self.root = Path(root)
        self.keep = keep
        self.writer = writer

    def save(self, epoch: int, state: dict[str, Any]) -> Path:
        path = self.root / f"epoch-{epoch:06d}.pt"
        if not self.writer:
            return path
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getbuffer()
        atomic_write(path, lambda f: f.write(data), mode="wb")
        # The sidecar follows the file it describes: a kill between the two leaves a checkpoint
        # without one, which is read unverified (as checkpoints written before sidecars existed).
        write_text(sidecar_path(path), hashlib.sha256(data).hexdigest() + "\n")
        write_text(self.root / "latest", path.name + "\n")
        self._prune()
        return path

    def files(self) -> list[Path]:
        """Every epoch checkpoint on disk, newest first."""
        return sorted(self.root.glob("epoch-*.pt"), reverse=True)

    def latest(self) -> Path | None:
        """The file the `latest` pointer names, if the pointer is readable and the file exists."""
        pointer = self.root / "latest"
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        path = self.root / name
        ok = _CHECKPOINT_NAME.fullmatch(name) and path.is_file()
        return path if ok else None

    def load_newest(self) -> tuple[dict[str, Any] | None, Path | None, list[str]]:
        """(state, its path, problems): the newest readable checkpoint, and a line for each
        newer one skipped (unreadable, checksum mismatch, or named by `latest` but missing)."""
        problems = []
        pointer = self.root / "latest"
        named = self.latest()
        if pointer.exists() and named is None:
            try:
                name = pointer.read_text().strip()
            except (OSError, UnicodeDecodeError):
                name = ""
            if _CHECKPOINT_NAME.fullmatch(name):
                problems.append(f"{pointer} names {name}, which is missing")
            else:
                problems.append(f"{pointer} does not name a checkpoint (damaged pointer)")
        candidates = self.files()
        if named is not None and candidates and named != candidates[0]:
            # The pointer is rewritten after each save, so a newer file than the one it names
            # was never completed as far as the pointer knows: trust the pointer's.
            candidates = [p for p in candidates if p <= named]
        for path in candidates:
            try:
                state = self.load(path)
            except CheckpointUnreadable as exc:
                problems.append(str(exc))
                continue
            return state, path, problems
        return None, None, problems

    def load(self, path: Path) -> dict[str, Any]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CheckpointUnreadable(f"{path} cannot be read ({exc.strerror})") from None
        sidecar = sidecar_path(path)
        if sidecar.is_file():
            want = sidecar.read_text().strip()
            if hashlib.sha256(data).hexdigest() != want:
                raise CheckpointUnreadable(
                    f"{path} is damaged (sha256 differs from {sidecar.name})"
                )
        try:
            # weights_only=False: the state holds RNG tuples and optimiser dicts we wrote ourselves.
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 -- a damaged file fails in many different ways
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointUnreadable(f"{path} is damaged ({reason[:120]})") from None
        if not isinstance(state, dict) or "epoch" not in state:
            raise CheckpointUnreadable(f"{path} is not an abdist checkpoint")
        return state

    def load_latest(self) -> dict[str, Any] | None:
        """The newest readable checkpoint's state (None without one); see `load_newest`."""
        return self.load_newest()[0]

    def _prune(self) -> None:
        files = sorted(self.root.glob("epoch-*.pt"))
        for old in files[: max(0, len(files) - self.keep)]:
            old.unlink(missing_ok=True)
            sidecar_path(old).unlink(missing_ok=True)
            shutil.rmtree(self.root / "deepspeed" / old.stem, ignore_errors=True)


class CheckpointUnreadable(Exception):
    """One checkpoint file that cannot be used (the caller falls back or reports it)."""


_CHECKPOINT_NAME = re.compile(r"epoch-\d{6}\.pt")


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")
