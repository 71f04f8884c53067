"""Where a run's numbers go: a JSONL log per epoch (always safe to append) and progress bars
(a bar per epoch with the running loss, then one line per epoch that stays on screen)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from abdist.io import write_text


class JsonlLogger:
    """Appends one JSON object per line (one write per record, so a kill tears at most the last)."""

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
        keep = [line for line, rec in self.records() if rec.get("epoch", 0) <= epoch]
        write_text(self.path, "".join(line + "\n" for line in keep))

    def records(self) -> list[tuple[str, dict[str, Any]]]:
        """(line, record) for every whole record; a line torn by a kill mid-write is dropped."""
        if self.path is None or not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append((line, rec))
        return out


_open: Any = None  # the tqdm bar on screen, if any: a new epoch's bar replaces it


def _enabled(mode: str) -> bool:
    return mode == "always" or (mode == "auto" and sys.stderr.isatty())


def epoch_line(desc: str, record: dict[str, Any]) -> str:
    """One epoch as one line, e.g. `epoch 3/30  train loss 0.4123  val bal. err 12.34 %  4.2 s`.

    Fields missing from `record` (no validation split when training on train+val) are left out.
    """
    parts = [desc]
    if isinstance(record.get("train_loss"), (int, float)):
        parts.append(f"train loss {record['train_loss']:.4f}")
    if isinstance(record.get("val_balanced_error"), (int, float)):
        parts.append(f"val bal. err {100.0 * record['val_balanced_error']:.2f} %")
    if isinstance(record.get("seconds"), (int, float)):
        parts.append(f"{record['seconds']:.1f} s")
    return "  ".join(parts)


class Progress:
    """An epoch's batches: iterate it like the batches themselves.

    Enabled (see `progress`), it draws a tqdm bar on stderr whose postfix is the running training
    loss (`set_loss`), says what the epoch does after the last batch (`set_phase`, e.g. while
    evaluating), and `close(record)` replaces the bar with one line that stays on screen
    (`epoch_line`). Disabled, every method is a no-op and nothing is printed.
    """

    def __init__(self, iterable: Iterable, *, total: int | None, desc: str, mode: str = "auto"):
        global _open
        self.iterable, self.desc = iterable, desc
        self.enabled = _enabled(mode)
        self.bar = None
        if self.enabled:
            if _open is not None:  # the previous epoch's bar, if nobody closed it
                _open.close()
            self.bar = _open = tqdm(
                total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr
            )

    def __iter__(self) -> Iterator:
        if self.bar is None:
            yield from self.iterable
            return
        # Updated by hand (not tqdm(iterable)) so the bar stays open after the last batch, for
        # `set_phase` during evaluation, until `close`.
        try:
            for item in self.iterable:
                yield item
                if self.bar is not None:
                    self.bar.update(1)
        except BaseException:  # e.g. Ctrl-C in the data loader: no half-drawn bar left behind
            self.close()
            raise

    def set_loss(self, value: float) -> None:
        """Show `value` (the epoch's running training loss) next to the bar."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {value:.4f}", refresh=False)

    def set_phase(self, text: str) -> None:
        """Say what happens now that the batches are done, e.g. "evaluating"."""
        if self.bar is not None:
            self.bar.set_description_str(f"{self.desc} {text}", refresh=True)

    def close(self, record: dict[str, Any] | None = None) -> None:
        """Remove the bar; with `record` (the epoch's log record), print its `epoch_line`."""
        global _open
        if self.bar is None:
            return
        self.bar.close()
        if _open is self.bar:
            _open = None
        self.bar = None
        if record is not None:
            tqdm.write(epoch_line(self.desc, record), file=sys.stderr)


def progress(iterable: Iterable, *, total: int | None, desc: str, mode: str = "auto") -> Progress:
    """The batches of an epoch, with a bar when asked for, or on a terminal in 'auto' mode.

    `mode` is `tracking.progress`: `always`, `auto` (only when stderr is a terminal) or `never`
    (nothing printed). See `Progress` for the running loss and the per-epoch line.
    """
    return Progress(iterable, total=total, desc=desc, mode=mode)
