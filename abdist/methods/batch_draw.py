"""The seeded, rank-sharded draw of k batches that methods take outside the training stream.

AutoBalance's hyper step draws k train and k validation batches; a method that refreshes
validation statistics or takes a held-out batch per step needs the same thing. The draw depends on
(seed, step) only, so a resumed run draws the same batches, and it is the same on every rank: with
`rank`/`world_size` each rank keeps its slice of every batch, so the ranks' slices together are
the batches one process would draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Drawn:
    """The drawn batches, concatenated: inputs, labels and groups (when asked); None throughout
    when this rank's slices are empty."""

    x: Tensor | None
    y: Tensor | None
    groups: Tensor | None


def draw_seed(seed: int, step: int) -> int:
    return seed * 7919 + step


def draw_batches(
    split,
    *,
    batch_size: int,
    k: int,
    seed: int,
    step: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    with_groups: bool = False,
) -> Drawn:
    """`k` shuffled batches of `batch_size` (fewer if the split is smaller), unaugmented, in the
    order of one generator seeded by (seed, step)."""
    gen = torch.Generator().manual_seed(draw_seed(seed, step))
    xs, ys, gs = [], [], []
    for batch in split.batches(
        batch_size,
        shuffle=True,
        generator=gen,
        drop_last=len(split) >= batch_size,
        rank=rank,
        world_size=world_size,
        max_batches=k,
        with_groups=with_groups,
    ):
        x, y = batch[0], batch[1]
        xs.append(x)
        ys.append(y)
        gs.append(batch[2] if with_groups else None)
    cat = (lambda t: torch.cat(t).to(device)) if xs else lambda t: None  # noqa: E731
    return Drawn(cat(xs), cat(ys), cat(gs) if with_groups else None)
