"""Per-sample training weights from the training split's counts (`loss.sample_weights`).

    class_balanced   w_i ∝ 1 / n(y_i)               (every class weighs the same in total)
    group_balanced   w_i ∝ 1 / n(g_i, y_i)          (every (group, class) cell weighs the same:
                                                     the group-balanced reweighting baseline)

Weights are scaled so that their mean over the training split is exactly 1: the loss keeps the
scale of plain cross-entropy (the learning rate means the same), and because a weighted batch
loss is then a plain mean of w_i·ℓ_i — not Σwℓ/Σw, whose denominator differs per rank — the mean
of the ranks' local losses is the global batch's loss: 2 ranks × B/2 train as 1 rank × B.
Empty cells get weight 0 (no sample is ever looked up there).
"""

from __future__ import annotations

import torch
from torch import Tensor

from abdist.errors import UserError

RULES = ("none", "class_balanced", "group_balanced")


class SampleWeights:
    """A per-cell weight table and the lookup that turns a batch's (y, g) into its weights."""

    def __init__(self, rule: str, table: Tensor, num_classes: int) -> None:
        self.rule, self.table, self.num_classes = rule, table, num_classes

    @property
    def needs_groups(self) -> bool:
        return self.rule == "group_balanced"

    @classmethod
    def build(cls, rule: str, data) -> SampleWeights | None:
        """The table for `rule` over `data.train` (None for "none"); a one-line error when the
        data cannot give it (group_balanced on data without groups)."""
        if rule == "none":
            return None
        if rule not in RULES:
            raise UserError(f"loss.sample_weights must be one of {', '.join(RULES)}, got {rule!r}")
        if rule == "class_balanced":
            counts = torch.tensor(data.class_counts, dtype=torch.float64)
        else:
            cells = data.cell_counts() if data.num_groups is not None else None
            if cells is None:
                raise UserError(
                    "loss.sample_weights=group_balanced needs group ids on the training split "
                    "(prepare the shards with --groups CSV)"
                )
            counts = torch.tensor(cells, dtype=torch.float64).flatten()  # [G * C], g-major
        return cls(rule, balanced_table(counts), data.num_classes)

    def __call__(self, y: Tensor, groups: Tensor | None = None) -> Tensor:
        """float32 weights [B] of a batch with labels `y` (and group ids for group_balanced)."""
        cell = y.long()
        if self.needs_groups:
            cell = groups.long() * self.num_classes + cell
        return self.table.to(y.device)[cell]


def balanced_table(counts: Tensor) -> Tensor:
    """w_c = N / (M · n_c) for the M non-empty cells (0 for empty ones): Σ_c n_c·w_c = N."""
    nonempty = counts > 0
    total, m = counts.sum(), nonempty.sum()
    table = torch.where(nonempty, total / (m * counts.clamp_min(1)), torch.zeros_like(counts))
    return table.float()


def sample_weights_for(method, cfg, data) -> SampleWeights | None:
    """The batch weigher the training loop uses for `method` (None: batches carry no weights).
    `loss.sample_weights` set for a method that does not list "weights" in its `needs` is a
    one-line error, not a silently ignored key."""
    rule = cfg.loss.sample_weights
    if "weights" not in method.needs:
        if rule != "none":
            raise UserError(
                f"method.name={method.name} does not use per-sample weights; "
                f"unset loss.sample_weights (it is {rule!r}) or use method.name=erm"
            )
        return None
    return SampleWeights.build(rule, data)
