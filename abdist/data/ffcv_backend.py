"""FFCV as an optional backend: the :class:`FFCVSplit` reader (files: abdist/data/ffcv_files.py).

Needs the ``ffcv`` extra (``ffcv==1.0.2``, built from source against Debian's ``pkg-config``,
``libopencv-dev`` and ``libturbojpeg0-dev``; ``docker/install.sh`` installs all of it with
``ABDIST_WITH_FFCV=1``). Nothing here imports ffcv until it is used, and a missing ffcv is one
:class:`~abdist.errors.UserError` line saying how to install it.

Reading
-------
:class:`FFCVSplit` has the ``TensorSplit`` surface (``len``, ``num_batches``, ``batches``) with
the same per-rank semantics as :class:`abdist.data.loader.ShardSplit`:

- training (``shuffle=True``): one permutation of the split drawn from a seed taken from
  ``generator`` (so it must be in the same state on every rank), extended by further
  permutations to ``world_size * num_batches * B`` samples (or cut to it with ``drop_last``);
  rank ``r`` takes positions ``r, r + W, r + 2W, ...``. Every rank yields exactly
  ``num_batches(B, drop_last)`` full batches; every sample is drawn once per epoch plus fewer than
  ``W * B`` repeats (spread over ranks) to fill the last batches.
- evaluation (``shuffle=False``): rank ``r`` reads the contiguous positions
  ``[N r / W, N (r + 1) / W)`` in file order, each sample exactly once over all ranks, the last
  batch short (``drop_last`` drops it).

The rank's order is handed to FFCV's ``Loader`` as a fixed traversal order; ``distributed=True``
is NOT used: FFCV then builds a ``DistributedSampler`` from ``torch.distributed`` (which must be
initialised), pads evaluation with repeated samples (some counted twice), draws its order from
its own seed rather than our generator, and refuses ``QUASI_RANDOM``. FFCV's other known limit,
``drop_last=False`` failing on a short last batch in ops with preallocated shapes
(libffcv/ffcv#388), is avoided too: the Loader always runs with ``drop_last=True`` on an order
padded to whole batches (with repeats of the last sample), and the padding is cut off the last
batch here. Each kind of pass (train/eval, batch size, length) gets one Loader, built at its first
use: building one compiles its pipeline (numba, about a second), and it is reused after that.

Augmentation, and the threads FFCV and torch share: abdist/data/ffcv_pipeline.py.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from abdist.data.augment import split_augment
from abdist.data.ffcv_parts import LoaderSettings, Part, assemble, open_part, start_part
from abdist.data.ffcv_pipeline import cpu_count
from abdist.data.manifest import (
    image_settings,
    manifest_cell_counts,
    manifest_class_counts,
    manifest_num_groups,
    read_manifest,
)
from abdist.data.planning import (
    check_batch_size,
    epoch_batches,
    local_batch,
    resolve_rank,
    seed_from,
)
from abdist.errors import UserError

__all__ = ["FFCVSplit"]


# --------------------------------------------------------------------------- reading


class FFCVSplit:
    """One split of an FFCV-format directory, served per rank (see the module docstring).

    Args:
        root: the prepared directory (``manifest.json`` + ``{split}.beton``).
        split: ``"train"``, ``"val"``, ``"test"``, or parts end to end (``"train+val"``, a
            retrain's data: abdist/data/ffcv_parts.py).
        rank, world_size: this process's place; default to ``torch.distributed``'s if it is
            initialised, else 0 and 1.
        num_workers: FFCV decoding threads (None: this process's CPUs).
        eval_transform: ``eval_transform(x) -> x`` on the same kind of batch, for evaluation.
        mean, std: per-channel normalisation on the [0, 1] scale (default: manifest, else 0.5).
        image_size: output side (default: the manifest's ``image.size``; needed if that is null).
        os_cache: FFCV's page cache mode (True: the OS page cache, via mmap).
        batches_ahead: batches FFCV prepares ahead.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int | None = None,
        eval_transform: Callable[[Tensor], Tensor] | None = None,
        mean: list[float] | float | None = None,
        std: list[float] | float | None = None,
        image_size: int | None = None,
        os_cache: bool = True,
        batches_ahead: int = 3,
    ) -> None:
        root = Path(root)
        manifest = read_manifest(root)
        self.rank, self.world_size = resolve_rank(rank, world_size)
        if num_workers is None:
            num_workers = cpu_count()
        for name, value, low in (
            ("num_workers", num_workers, 1),
            ("batches_ahead", batches_ahead, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
        channels, size, num_classes, mean, std = image_settings(
            root, manifest, image_size=image_size, mean=mean, std=std
        )

        self.root, self.split, self.manifest = root, split, manifest
        self.num_workers, self.os_cache, self.batches_ahead = num_workers, os_cache, batches_ahead
        self.eval_transform = eval_transform
        self._channels, self._size = channels, int(size)
        self._mean, self._std = mean, std
        self._settings = LoaderSettings(
            channels, self._size, mean, std, eval_transform, num_workers, os_cache, batches_ahead
        )
        self._num_classes = num_classes
        self._num_groups = manifest_num_groups(manifest)
        # "train+val": the parts end to end, the later parts' sample ids after the earlier ones'
        # (as the WebDataset split numbers them).
        self._parts: list[Part] = []
        for name in split.split("+"):
            offset = sum(part.n for part in self._parts)
            self._parts.append(open_part(root, manifest, name, self._size, offset))
        self._n = sum(part.n for part in self._parts)

    # --- metadata

    def __len__(self) -> int:
        """Samples in the split (all ranks together)."""
        return self._n

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self._num_classes

    @property
    def class_names(self) -> list[str]:
        """Class names from the manifest."""
        return list(self.manifest.get("class_names") or range(self.num_classes))

    @property
    def class_counts(self) -> list[int]:
        """Samples per class in this split, from the manifest."""
        return manifest_class_counts(self.manifest, self.split, self.num_classes)

    @property
    def num_groups(self) -> int | None:
        """Number of groups (prepared with ``--groups``), else None."""
        return self._num_groups

    def cell_counts(self) -> list[list[int]] | None:
        """Samples per (group, class) in this split, from the manifest; None without groups."""
        if self._num_groups is None:
            return None
        return manifest_cell_counts(self.manifest, self.split, self.num_classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the batches."""
        return self._channels, self._size, self._size

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean used for normalisation ([0, 1] scale)."""
        return self._mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel std used for normalisation ([0, 1] scale)."""
        return self._std

    @property
    def bad_sample_counts(self) -> dict[str, int]:
        """Always zero: FFCV files are checked whole (sha256), not skipped sample by sample."""
        return {"total": 0}

    # --- counts

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """Batches per rank in a training epoch of GLOBAL batches of ``batch_size`` (each rank
        takes ``batch_size / world_size``): ``ceil`` (``floor`` with drop_last) of
        ``len / batch_size``; the same on every rank."""
        local_batch(batch_size, self.world_size)
        return epoch_batches(self._n, batch_size, drop_last)

    def eval_num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """Batches this rank yields in an evaluation pass."""
        check_batch_size(batch_size)
        a, b = self._eval_range()
        return (b - a) // batch_size if drop_last else math.ceil((b - a) / batch_size)

    def _eval_range(self, rank: int | None = None, world_size: int | None = None):
        n = self._n
        r = self.rank if rank is None else rank
        w = self.world_size if world_size is None else world_size
        return n * r // w, n * (r + 1) // w

    def shard(self, rank: int, world_size: int) -> FFCVSplit:
        """This split as served to ``rank`` of ``world_size`` (the ``TensorSplit.shard``
        surface); ``self`` when that is its own place."""
        rank, world_size = resolve_rank(rank, world_size)
        if (rank, world_size) == (self.rank, self.world_size):
            return self
        view = copy.copy(self)  # shares the compiled loaders
        view.rank, view.world_size = rank, world_size
        return view

    # --- iteration

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        augment: Callable | None = None,
        with_ids: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        max_batches: int | None = None,
        with_groups: bool = False,
        first_batch: int | None = None,
    ) -> Iterator[tuple[Tensor, ...]]:
        """Yield ``(x, y)`` for one pass on this rank, then ``idx`` (the sample ids) with
        ``with_ids`` and ``g`` (the group ids; prepared with ``--groups``) with ``with_groups``,
        in ``ShardSplit.batches``' order.

        ``shuffle=True``: a training epoch of exactly :meth:`num_batches` full batches of
        ``batch_size / world_size`` samples (``batch_size`` is the GLOBAL batch), ordered and
        augmented from one seed drawn from ``generator`` (torch's global RNG if None).
        ``shuffle=False``: an evaluation pass, each sample exactly once across ranks, in batches
        of ``batch_size``. ``augment`` and ``first_batch`` as for ``ShardSplit.batches``: a
        ``TrainAugment``'s class-aware chain runs in FFCV's loader thread (on [0, 1] pixels,
        batch ``first_batch + k`` for the pass's ``k``-th), its crop/flip here; any other callable
        ``augment(x, y, generator, batch)`` runs here. ``rank`` / ``world_size`` serve another
        place than the split's own for this pass; ``max_batches`` stops after that many batches.
        """
        if with_groups and self._num_groups is None:
            raise UserError(
                f"{self.root}: this directory was prepared without --groups and carries no "
                "group ids (re-run abdist prepare with --groups CSV)"
            )
        check_batch_size(batch_size)
        rank, world_size = resolve_rank(
            self.rank if rank is None else rank,
            self.world_size if world_size is None else world_size,
        )
        if shuffle:
            seed = seed_from(generator)
            n_batches = epoch_batches(self._n, batch_size, drop_last)
            batch_size = local_batch(batch_size, world_size)
            if n_batches == 0:
                return
            total = world_size * n_batches * batch_size
            rng = np.random.default_rng(seed)
            reps = math.ceil(total / self._n)
            stream = np.concatenate([rng.permutation(self._n) for _ in range(reps)])[:total]
            order = stream[rank::world_size]
            keep_last = batch_size
        else:
            seed = 0
            a, b = self._eval_range(rank, world_size)
            n = b - a
            if drop_last:
                n -= n % batch_size
            if n == 0:
                return
            n_batches = math.ceil(n / batch_size)
            order = np.arange(a, a + n, dtype=np.int64)
            # Whole batches only (FFCV's drop_last=False breaks on an odd last batch): pad with
            # the last sample, and cut the padding off the last batch below.
            pad = n_batches * batch_size - n
            order = np.concatenate([order, np.full(pad, order[-1], dtype=np.int64)])
            keep_last = batch_size - pad
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        yield from self._pass(
            order,
            batch_size,
            n_batches,
            keep_last,
            seed,
            rank,
            world_size,
            shuffle,
            augment,
            generator,
            first_batch,
            with_ids,
            with_groups,
        )

    def gather(
        self,
        positions,
        batch_size: int,
        *,
        augment: Callable | None = None,
        generator: torch.Generator | None = None,
        first_batch: int | None = None,
        seed: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(x, y)`` of the split's samples at ``positions`` (0 .. len-1, in that order, repeats
        allowed), in batches of ``batch_size`` (the last may be short), through the training
        pipeline: random access for a method that draws its own samples (SelMix, by class).
        ``augment``, ``generator`` and ``first_batch`` as for a training pass of :meth:`batches`;
        ``seed`` seeds the loader thread's augmentation. Served to this split's own rank."""
        check_batch_size(batch_size)
        order = np.asarray(positions, dtype=np.int64)
        if len(order) == 0:
            return
        if order.min() < 0 or order.max() >= self._n:
            raise UserError(
                f"positions must lie in [0, {self._n}), got {order.min()}..{order.max()}"
            )
        n_batches = math.ceil(len(order) / batch_size)
        pad = n_batches * batch_size - len(order)
        order = np.concatenate([order, np.full(pad, order[-1], dtype=np.int64)])
        yield from self._pass(
            order,
            batch_size,
            n_batches,
            batch_size - pad,
            seed,
            self.rank,
            self.world_size,
            True,
            augment,
            generator,
            first_batch,
            False,
            False,
        )

    @property
    def labels(self) -> Tensor:
        """int64 [len]: every sample's label, by position in the split."""
        return torch.cat([part.labels for part in self._parts])

    def _pass(self, order, batch_size, n_batches, keep_last, seed, rank, world_size, shuffle,
              augment, generator, first_batch, with_ids, with_groups):  # fmt: skip
        """Run the FFCV passes of `order` (whole batches; the last keeps `keep_last`)."""
        chain, _, hook = split_augment(augment, self._num_classes)
        if not shuffle:
            chain = hook = None
        threads = torch.get_num_threads()  # before FFCV's iter() changes it
        # Which part each position of the pass reads from (a sorted search over the parts' ends).
        ends = np.cumsum([part.n for part in self._parts])
        which = np.searchsorted(ends, order, side="right")
        last = math.ceil(len(order) / batch_size) - 1  # the batch that may hold padding
        streams: list = []
        try:
            for p, part in enumerate(self._parts):
                streams.append(start_part(
                    p, part, self._settings, order, train=shuffle, batch_size=batch_size,
                    seed=seed, rank=rank, world_size=world_size, chain=chain,
                    first_batch=first_batch, groups=self._num_groups is not None,
                ))  # fmt: skip
            for k in range(n_batches):
                parts = which[k * batch_size : (k + 1) * batch_size]
                x, y, idx, g = assemble(streams, parts)
                if k == 0:  # FFCV's threads have set torch's thread count by now: restore it
                    torch.set_num_threads(threads)
                if k == last and keep_last < batch_size:
                    x, y, idx = x[:keep_last], y[:keep_last], idx[:keep_last]
                    g = None if g is None else g[:keep_last]
                if hook is not None:
                    x = hook(x, y, generator, None if first_batch is None else first_batch + k)
                extra = [idx] if with_ids else []
                if with_groups:
                    extra.append(g)
                yield (x, y, *extra)
        finally:
            for stream in streams:
                if stream is not None:
                    stream.close()
            torch.set_num_threads(threads)

    def __repr__(self) -> str:
        return (
            f"FFCVSplit({str(self.root)!r}, {self.split!r}, rank={self.rank}, "
            f"world_size={self.world_size}, num_workers={self.num_workers}, samples={len(self)})"
        )
