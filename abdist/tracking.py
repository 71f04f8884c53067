"""Where a run's numbers go: a JSONL log per epoch (always safe to append) and progress bars."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from abdist.io import write_text


class JsonlLogger:
    """Appends one JSON object per line; each line is flushed and fsynced as it is written."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None

    def log(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, epoch: int) -> None:
        """Keep records of epochs 1..`epoch`; later ones came from a killed run that resumes."""
        if self.path is None or not self.path.is_file():
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= epoch
        ]
        write_text(self.path, "".join(line + "\n" for line in keep))


def progress(iterable: Iterable, *, total: int | None, desc: str, mode: str = "auto"):
    """A tqdm bar when asked for, or on a terminal in 'auto' mode; otherwise the bare iterable."""
    enabled = mode == "always" or (mode == "auto" and sys.stderr.isatty())
    if not enabled:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
