"""Per-class augmentation strengths that change during training, read deterministically.

AutoBalance updates, per class ``y``, how often (``p_y``) and how strongly (``m_y``) the training
images of that class are augmented, while loader worker processes are producing batches ahead of
the training loop. A worker must not use "whatever the table holds when it gets to the batch":
that depends on timing, and a resumed or repeated run would differ. So every value the table ever
held is kept with a label, and the version a batch uses is a function of its index alone.

The rule (``lag`` = ``data.augment_lag``, L):

* Training batches are numbered ``b = 0, 1, 2, ...`` over the whole run, per rank (the same
  numbers on every rank: epoch · batches_per_epoch + position in the epoch).
* A change made while the training loop processes batch ``b`` (e.g. in the hyper step after
  that batch's optimiser step) is labelled ``b``. Changes before training starts are labelled -1.
* Batch ``b`` is augmented with the newest version labelled ``<= b - 1 - L``. With ``L = 0`` a
  hyper step after batch ``b`` changes batch ``b + 1``, as if augmentation ran in the training
  loop; with ``L > 0`` workers may run up to L batches ahead without ever waiting.
* The training loop calls :meth:`AugmentTable.publish` after each batch. A worker that needs
  version ``t`` waits until ``t`` is published (it never guesses), so the rule holds whatever
  the prefetch depth; with ``L >= workers · prefetch_factor`` it never waits in practice.

Storage is shared memory created before any worker starts (fork inherits it, spawn receives it
through torch's shared-memory pickling): a ring of the last ``lag + 4`` versions, enough because a
worker is never more than ``lag + 1`` versions behind the newest. Reads are consistent (a seqlock:
a reader never mixes two versions). There is one writer per table: the training process of its
rank. :meth:`state_dict` holds the ring, so a resumed run looks up exactly what it would have.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from abdist.errors import UserError

BEFORE_TRAINING = -1  # the label of values set before the first batch
NOT_STARTED = -2  # `published` until the training loop announces its first batch


class AugmentTable:
    """Per-class magnitude and probability, each in [0, 1], versioned by batch (module docs)."""

    def __init__(
        self,
        num_classes: int,
        *,
        magnitude: float | Sequence[float] | Tensor = 0.0,
        probability: float | Sequence[float] | Tensor = 0.0,
        lag: int = 0,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
        if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0:
            raise UserError(f"augment lag must be a non-negative integer, got {lag!r}")
        self.lag = lag
        slots = lag + 4
        self._values = torch.zeros(slots, 2, num_classes, dtype=torch.float32).share_memory_()
        self._labels = torch.full((slots,), BEFORE_TRAINING, dtype=torch.int64).share_memory_()
        # [0] versions written, [1] last published batch, [2] seqlock (odd while writing).
        self._state = torch.tensor([0, NOT_STARTED, 0], dtype=torch.int64).share_memory_()
        m, p = self._as_row("magnitude", magnitude), self._as_row("probability", probability)
        self._write(BEFORE_TRAINING, m, p)

    @property
    def num_classes(self) -> int:
        return self._values.shape[2]

    @property
    def published(self) -> int:
        """The last batch the training loop has finished (-1: about to start the first; -2: the
        loop has not started, see :meth:`publish`)."""
        return int(self._state[1])

    def _as_row(self, name: str, value: Any) -> Tensor:
        row = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
        if row.ndim == 0:
            row = row.expand(self.num_classes)
        if row.shape != (self.num_classes,):
            raise UserError(
                f"{name} must be a scalar or have one value per class ({self.num_classes}), "
                f"got shape {tuple(row.shape)}"
            )
        if not torch.isfinite(row).all() or (row < 0).any() or (row > 1).any():
            bad = row[~(torch.isfinite(row) & (row >= 0) & (row <= 1))][0].item()
            raise UserError(f"{name} values must lie in [0, 1], got {bad}")
        return row

    # --- the writer (the training loop of this rank) ------------------------------------------

    def set(
        self,
        *,
        magnitude: float | Sequence[float] | Tensor | None = None,
        probability: float | Sequence[float] | Tensor | None = None,
    ) -> None:
        """Change magnitudes and/or probabilities (a scalar or one value per class), labelled
        with the batch being processed (``published + 1``; -1 before training). Validates
        everything before writing anything; a change to the values already in force is a no-op."""
        m_now, p_now = self.latest()
        m = m_now if magnitude is None else self._as_row("magnitude", magnitude)
        p = p_now if probability is None else self._as_row("probability", probability)
        if torch.equal(m, m_now) and torch.equal(p, p_now):
            return
        published = self.published
        self._write(BEFORE_TRAINING if published == NOT_STARTED else published + 1, m, p)

    def _write(self, label: int, m: Tensor, p: Tensor) -> None:
        count = int(self._state[0])
        newest = (count - 1) % len(self._labels)
        # A second change under the same label replaces the first (nobody can have read it yet:
        # readers only look at labels that are published).
        slot = newest if count and int(self._labels[newest]) == label else count % len(self._labels)
        self._state[2] += 1
        self._values[slot, 0].copy_(m)
        self._values[slot, 1].copy_(p)
        self._labels[slot] = label
        if slot != newest or not count:
            self._state[0] += 1
        self._state[2] += 1

    def publish(self, batch: int) -> None:
        """The training loop finished ``batch``: versions labelled up to it may now be read.
        Called with ``first_batch - 1`` before the loop's first batch (-1 on a fresh start):
        changes from then on are labelled with the batch being processed."""
        self._state[1] = batch

    # --- readers (workers, or the training loop itself) ----------------------------------------

    def _snapshot(self) -> tuple[Tensor, Tensor, int]:
        while True:
            before = int(self._state[2])
            if before % 2 == 0:
                values, labels, count = self._values.clone(), self._labels.clone(), self._state[0]
                count = int(count)
                if int(self._state[2]) == before:
                    return values, labels, count
            time.sleep(0)

    def latest(self) -> tuple[Tensor, Tensor]:
        """The newest ``(magnitude [C], probability [C])``, published or not."""
        values, labels, count = self._snapshot()
        slot = (count - 1) % len(labels)
        return values[slot, 0], values[slot, 1]

    def for_batch(self, batch: int) -> tuple[Tensor, Tensor]:
        """``(magnitude, probability)`` that training batch ``batch`` uses: the newest version
        labelled ``<= batch - 1 - lag``. Waits until the training loop has published that far."""
        want = max(batch - 1 - self.lag, BEFORE_TRAINING)
        pause = 1e-4
        while want > BEFORE_TRAINING and self.published < want:
            time.sleep(pause)
            pause = min(2 * pause, 0.01)
        values, labels, count = self._snapshot()
        live = [s for s in range(min(count, len(labels))) if int(labels[s]) <= want]
        if not live:  # impossible while the reader is within lag + 1 versions of the writer
            raise RuntimeError(f"augment table: batch {batch}'s version left the ring")
        slot = max(live, key=lambda s: int(labels[s]))
        return values[slot, 0], values[slot, 1]

    @property
    def magnitude(self) -> Tensor:
        return self.latest()[0]

    @property
    def probability(self) -> Tensor:
        return self.latest()[1]

    # --- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        values, labels, count = self._snapshot()
        n = min(count, len(labels))
        order = [(count - n + i) % len(labels) for i in range(n)]  # oldest first
        return {
            "labels": [int(labels[s]) for s in order],
            "magnitude": [values[s, 0].tolist() for s in order],
            "probability": [values[s, 1].tolist() for s in order],
            "published": self.published,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (in place: running workers keep seeing this storage)."""
        labels = list(state["labels"])[-len(self._labels) :]
        rows = list(zip(state["magnitude"], state["probability"]))[-len(labels) :]
        checked = [(self._as_row("magnitude", m), self._as_row("probability", p)) for m, p in rows]
        self._state[2] += 1
        self._labels.fill_(BEFORE_TRAINING)
        for slot, (label, (m, p)) in enumerate(zip(labels, checked)):
            self._values[slot, 0].copy_(m)
            self._values[slot, 1].copy_(p)
            self._labels[slot] = int(label)
        self._state[0] = len(labels)
        self._state[1] = int(state["published"])
        self._state[2] += 1

    def __repr__(self) -> str:
        m, p = self.latest()
        return (
            f"AugmentTable(num_classes={self.num_classes}, lag={self.lag}, "
            f"published={self.published}, magnitude={m.tolist()}, probability={p.tolist()})"
        )
