"""In-memory datasets: the small batch interface the trainer consumes.

A split that fits in (CPU or GPU) memory is served by slicing tensors directly, which is both the
fastest path for small benchmarks (digits, CIFAR) and the reference the sharded loader must match:
``__len__``, ``num_batches`` and ``batches`` are the whole surface.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from abdist.data.planning import check_batch_size
from abdist.errors import UserError

# augment(x, y, generator, batch) -> x: a batch-level transform drawing its randomness from
# `generator`; y (the labels) and batch (the run-wide batch index) serve the class-aware chain
# (abdist/data/augment.py).
Augment = Callable[[Tensor, Tensor, "torch.Generator | None", "int | None"], Tensor]


@dataclass
class TensorSplit:
    """One split held in memory.

    ``images`` is ``[N, C, H, W]`` float32, already normalised; ``labels`` is ``[N]`` int64;
    ``groups`` is an optional ``[N]`` int64 group attribute (for fairness objectives); ``ids``
    optional ``[N]`` int64 sample ids, unique within the split and the same in every epoch and
    on every rank (None: the row numbers 0..N-1). Shards loaded in memory carry the ids the
    streamed reader yields, so a method keyed by sample id sees the same ids either way.
    """

    images: Tensor
    labels: Tensor
    groups: Tensor | None = None
    ids: Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise UserError(f"images must be [N, C, H, W], got shape {tuple(self.images.shape)}")
        n = self.images.shape[0]
        if self.labels.shape != (n,):
            raise UserError(
                f"labels must be [N] with N={n} to match images, got {tuple(self.labels.shape)}"
            )
        if self.groups is not None and self.groups.shape != (n,):
            raise UserError(
                f"groups must be [N] with N={n} to match images, got {tuple(self.groups.shape)}"
            )
        if self.ids is not None and self.ids.shape != (n,):
            raise UserError(
                f"ids must be [N] with N={n} to match images, got {tuple(self.ids.shape)}"
            )

    @property
    def sample_ids(self) -> Tensor:
        """The split's sample ids ``[N]`` (the row numbers unless given)."""
        if self.ids is not None:
            return self.ids
        return torch.arange(len(self.labels), device=self.labels.device)

    @property
    def id_count(self) -> int:
        """Size of the id space: 1 + the largest id (the ids of a split appended after this one
        start here, as "train+val" numbers val's samples after train's)."""
        ids = self.sample_ids
        return int(ids.max()) + 1 if len(ids) else 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """Number of batches one epoch of :meth:`batches` yields."""
        check_batch_size(batch_size)
        n = len(self)
        return n // batch_size if drop_last else math.ceil(n / batch_size)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        augment: Augment | None = None,
        rank: int = 0,
        world_size: int = 1,
        max_batches: int | None = None,
        with_groups: bool = False,
        with_ids: bool = False,
        first_batch: int | None = None,
    ) -> Iterator[tuple[Tensor, ...]]:
        """Yield ``(x, y)`` batches covering the split once, then ``ids`` (the sample ids) with
        ``with_ids`` and ``g`` (the group ids; the split must carry groups) with ``with_groups``:
        ``(x, y, ids, g)`` with both, the order ``ShardSplit.batches`` yields them in.

        The order (and the augmentation randomness, via ``augment(x, y, generator, batch)``)
        comes only from ``generator`` (and, for the class-aware chain, the batch index
        ``first_batch + k`` of the pass's ``k``-th batch), so the same generator state
        reproduces the same batches; with ``generator=None`` torch's global RNG is used. Without
        ``drop_last`` the last batch may be smaller and every sample appears exactly once.

        Several ranks (``world_size > 1``): ``batch_size`` is the GLOBAL batch. Every rank draws
        the same permutation (pass generators in the same state, e.g. seeded by (seed, epoch)),
        cuts it into the same global batches, and yields its own contiguous slice
        ``[rank·n/W, (rank+1)·n/W)`` of each one: disjoint across ranks, the same number of batches
        on every rank, and ``batch_size / world_size`` samples each when it divides. The
        augmentation is drawn for the whole global batch and then sliced, so its randomness (and
        hence the run) does not depend on the number of ranks; that costs W× the (cheap) tensor
        augmentation per rank, and is what makes 2 ranks × B/2 reproduce 1 rank × B.
        """
        _check_rank(rank, world_size)
        if with_groups and self.groups is None:
            raise UserError(
                "this data has no group ids; group-aware training needs shards prepared with "
                "--groups CSV"
            )
        n_batches = self.num_batches(batch_size, drop_last)
        if max_batches is not None:  # a partial pass (a hyper step's few batches)
            n_batches = min(n_batches, max_batches)
        n = len(self)
        if shuffle:
            # randperm on the generator's own device keeps CPU and CUDA generators both usable.
            device = generator.device if generator is not None else torch.device("cpu")
            order = torch.randperm(n, generator=generator, device=device).to(self.images.device)
        else:
            order = None
        ids = self.sample_ids if with_ids else None  # once per pass, not per batch
        for b in range(n_batches):
            start, stop = b * batch_size, min((b + 1) * batch_size, n)
            lo, hi = _rank_slice(stop - start, rank, world_size)
            if augment is None:  # only this rank's samples are ever gathered
                start, stop, lo, hi = start + lo, start + hi, 0, hi - lo
            idx = slice(start, stop) if order is None else order[start:stop]
            x, y = self.images[idx], self.labels[idx]
            extra = [ids[idx]] if with_ids else []
            if with_groups:
                extra.append(self.groups[idx])
            if augment is not None:
                batch = None if first_batch is None else first_batch + b
                x = augment(x, y, generator, batch)[lo:hi]
                y, extra = y[lo:hi], [t[lo:hi] for t in extra]
            yield (x, y, *extra)

    def shard(self, rank: int, world_size: int) -> TensorSplit:
        """This rank's contiguous slice of the split, for evaluation: every sample is in exactly
        one rank's shard (no padding, no duplicates), so per-rank confusion matrices sum to the
        exact one. Shards differ in size by at most one sample."""
        _check_rank(rank, world_size)
        lo, hi = _rank_slice(len(self), rank, world_size)
        groups = None if self.groups is None else self.groups[lo:hi]
        return TensorSplit(self.images[lo:hi], self.labels[lo:hi], groups, self.sample_ids[lo:hi])


def _rank_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    return rank * n // world_size, (rank + 1) * n // world_size


def _check_rank(rank: int, world_size: int) -> None:
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


@dataclass
class DataBundle:
    """Train/val/test splits plus the metadata a model and the trainer need."""

    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    class_names: list[str]
    in_channels: int
    image_size: int
    # Per-channel (mean, std) the images were normalised with, on the [0, 1] scale: what the
    # class-aware chain un-normalises by (None: unknown, the chain then refuses).
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``class_names``)."""
        return len(self.class_names)

    @property
    def class_counts(self) -> list[int]:
        """Training samples per class, including zeros for classes absent from train."""
        counts = torch.bincount(self.train.labels.cpu(), minlength=self.num_classes)
        return [int(c) for c in counts]

    @property
    def num_groups(self) -> int | None:
        """1 + the largest group id in any split; None when the data has no groups."""
        ids = [s.groups for s in (self.train, self.val, self.test) if s.groups is not None]
        ids = [g for g in ids if len(g)]
        return max(int(g.max()) for g in ids) + 1 if ids else None

    def cell_counts(self) -> list[list[int]] | None:
        """Training samples per (group, class); None without groups."""
        G, C, train = self.num_groups, self.num_classes, self.train
        if G is None or train.groups is None:
            return None
        cell = train.groups.long() * C + train.labels.long()
        return torch.bincount(cell, minlength=G * C).view(G, C).tolist()

    def with_val_merged(self) -> DataBundle:
        """Train on train+val, with an empty validation split (a retrain phase's data)."""

        def cat(a, b):
            return None if a is None or b is None else torch.cat([a, b])

        t, v = self.train, self.val
        train = TensorSplit(
            cat(t.images, v.images),
            cat(t.labels, v.labels),
            cat(t.groups, v.groups),
            # val's ids after train's: unique in the merged split, as the streamed "train+val".
            torch.cat([t.sample_ids, v.sample_ids + self.train_id_count]),
        )
        empty = TensorSplit(v.images[:0], v.labels[:0], None if v.groups is None else v.groups[:0])
        return dataclasses.replace(self, train=train, val=empty)

    @property
    def train_id_count(self) -> int:
        """Where val's ids start in "train+val": 1 + train's largest id."""
        return self.train.id_count
