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

import random
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
    def __init__(self, root: str | Path, keep: int = 2, writer: bool = True):
        self.root = Path(root)
        self.keep = keep
        self.writer = writer

    def save(self, epoch: int, state: dict[str, Any]) -> Path:
        path = self.root / f"epoch-{epoch:06d}.pt"
        if not self.writer:
            return path
        atomic_write(path, lambda f: torch.save(state, f), mode="wb")
        write_text(self.root / "latest", path.name + "\n")
        self._prune()
        return path

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_file() else None

    def load_latest(self) -> dict[str, Any] | None:
        path = self.latest()
        if path is None:
            return None
        # weights_only=False: the state holds RNG tuples and optimiser dicts we wrote ourselves.
        return torch.load(path, map_location="cpu", weights_only=False)

    def _prune(self) -> None:
        files = sorted(self.root.glob("epoch-*.pt"))
        for old in files[: max(0, len(files) - self.keep)]:
            old.unlink(missing_ok=True)
            shutil.rmtree(self.root / "deepspeed" / old.stem, ignore_errors=True)
