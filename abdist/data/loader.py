"""Per-rank loader over WebDataset-format shards: the ``TensorSplit`` surface, for data on disk.

:class:`ShardSplit` reads a split written as ``<split>-NNNNNN.tar`` shards plus ``manifest.json``
(format ``abdist-shards/1``) and serves it through the same three calls the trainer uses on an
in-memory :class:`~abdist.data.memory.TensorSplit`: ``len(split)``, ``num_batches`` and
``batches``. Each rank builds its own ``ShardSplit(rank=r, world_size=W_r, num_workers=W)``.

How samples are split over ranks and workers, for training epochs and evaluation passes, is
abdist/data/planning.py's docstring; in short: every rank yields the same number of full training
batches, and an evaluation pass yields every sample exactly once across ranks and workers.

Images and bad data
    Decoding, normalisation and the bad-sample rules (``bad_data``, ``max_bad_fraction``, counts
    and warnings) are abdist/data/samples.py's; which damage to a shard file is caught, and when,
    is abdist/data/manifest.py's. A damaged shard is always a one-line error, never skipped.

Why not ``webdataset.WebDataset``
    The shards are plain WebDataset tars (``webdataset`` reads them; tests write them with its
    ``TarWriter``), but the reader here is its own: WebDataset's splitters assign whole shards,
    which cannot give exact evaluation or equal training batches with fewer (or unevenly sized)
    shards than slots, and its ``tarfile``-based member iteration alone cost ~130 us per CIFAR
    sample here (four times the JPEG decode); the small header parser in
    abdist/data/tar_reader.py does ~25 us and knows the shard and key of every error. Members
    are grouped into samples by WebDataset's key rule (the basename up to its first dot).
    ``bench/loader.py`` has the measurements.

The stages live in their own modules: the manifest (abdist/data/manifest.py), the tar reader
(tar_reader.py), sample decoding and the bad-data rules (samples.py), the slot plan
(planning.py) and the worker pass (stream_worker.py); this module is the split they serve.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from abdist.data.augment import split_augment
from abdist.data.manifest import (
    image_settings,
    manifest_cell_counts,
    manifest_class_counts,
    manifest_num_groups,
    read_manifest,
    split_shards,
)
from abdist.data.planning import (
    check_batch_size,
    epoch_batches,
    local_batch,
    rank_coverage,
    resolve_rank,
    seed_from,
    slot_range,
)
from abdist.data.samples import (
    BadSampleLedger,
    PassBadLimit,
    check_read_options,
    preload_decoders,
)
from abdist.data.stream_worker import StreamPass, StreamSource
from abdist.errors import UserError

__all__ = ["ShardSplit"]


# --- the public split ---------------------------------------------------------------------------


class ShardSplit:
    """One split of a shard directory, served per rank (see the module docstring).

    Args:
        root: the shard directory (``manifest.json`` + ``<split>-NNNNNN.tar``).
        split: ``"train"``, ``"val"`` or ``"test"`` (any split the manifest lists).
        rank, world_size: this process's place; default to ``torch.distributed``'s if it is
            initialised, else 0 and 1.
        num_workers: DataLoader worker processes (0: read in this process).
        shuffle_buffer: encoded samples each training slot holds for shuffling (0 or 1: none).
        eval_transform: ``eval_transform(x) -> x`` on the same kind of batch, for evaluation
            passes (e.g. ``torchvision.transforms.v2.CenterCrop``); None: none.
        bad_data: ``"skip"`` (count, warn, go on) or ``"error"`` (raise a one-line UserError).
        max_bad_fraction: stop a pass with a one-line UserError when more than this share of
            the samples this rank reads in it are bad (skipped); None: no limit. The trainer
            passes ``data.max_bad_fraction``.
        mean, std: per-channel normalisation on the [0, 1] scale (default: manifest, else 0.5).
        image_size: output side (default: the manifest's ``image.size``; needed if that is null).
        decoder: ``"torchvision"`` (fast, PIL fallback) or ``"pil"``.
        prefetch_factor: batches each worker prepares ahead.
        multiprocessing_context: e.g. ``"spawn"``; default: torch's.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        eval_transform: Callable[[Tensor], Tensor] | None = None,
        bad_data: str = "skip",
        max_bad_fraction: float | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        image_size: int | None = None,
        decoder: str = "torchvision",
        prefetch_factor: int = 2,
        multiprocessing_context: str | None = None,
    ) -> None:
        root = Path(root)
        manifest = read_manifest(root)
        rank, world_size = resolve_rank(rank, world_size)
        for name, value, low in (
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
        check_read_options(bad_data, max_bad_fraction, decoder)

        shards = split_shards(root, manifest, split)  # "train+val": end to end, checked
        channels, size, num_classes, mean, std = image_settings(
            root, manifest, image_size=image_size, mean=mean, std=std
        )

        self.root, self.split, self.manifest = root, split, manifest
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.max_bad_fraction = max_bad_fraction
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self._src = StreamSource(
            split=split,
            shards=tuple(shards),
            num_classes=num_classes,
            channels=channels,
            height=int(size),
            width=int(size),
            mean=mean,
            std=std,
            eval_transform=eval_transform,
            bad_data=bad_data,
            decoder=decoder,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            num_groups=manifest_num_groups(manifest),
        )
        preload_decoders(decoder)
        self._bad = BadSampleLedger()  # shared with shard() views: one split, one tally

    # --- metadata

    def __len__(self) -> int:
        """Samples in the split (all ranks together), as the manifest says."""
        return self._src.num_samples

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self._src.num_classes

    @property
    def class_names(self) -> list[str]:
        """Class names from the manifest."""
        return list(self.manifest.get("class_names") or range(self.num_classes))

    @property
    def class_counts(self) -> list[int]:
        """Samples per class in this split (summed over the parts of "train+val"), from the
        manifest."""
        return manifest_class_counts(self.manifest, self.split, self.num_classes)

    @property
    def num_groups(self) -> int | None:
        """Number of groups (shards prepared with ``--groups``), else None."""
        return self._src.num_groups

    def cell_counts(self) -> list[list[int]] | None:
        """Samples per (group, class) in this split (summed over "a+b"), from the manifest."""
        if self.num_groups is None:
            return None
        return manifest_cell_counts(self.manifest, self.split, self.num_classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the batches."""
        return self._src.channels, self._src.height, self._src.width

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean used for normalisation ([0, 1] scale)."""
        return self._src.mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel std used for normalisation ([0, 1] scale)."""
        return self._src.std

    # --- counts

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """Batches per rank in a training epoch of GLOBAL batches of ``batch_size`` (each rank
        takes ``batch_size / world_size`` of each): ``ceil`` (``floor`` with drop_last) of
        ``len / batch_size``; the same on every rank."""
        local_batch(batch_size, self.world_size)
        return epoch_batches(len(self), batch_size, drop_last)

    def eval_num_batches(self, batch_size: int) -> int:
        """Batches this rank yields in an evaluation pass (fewer if bad samples are skipped)."""
        check_batch_size(batch_size)
        total = 0
        for worker in range(self._src.slots_per_rank):
            a, b, _ = slot_range(
                self._src, train=False, batch_size=batch_size, n_batches=0, worker=worker
            )
            total += math.ceil((b - a) / batch_size)
        return total

    @property
    def bad_sample_counts(self) -> dict[str, int]:
        """Bad samples met by this rank so far, by reason, plus ``"total"`` (all workers, all
        passes; a sample counts once per pass). Sum over ranks for the run's figure."""
        return self._bad.counts

    @property
    def bad_samples(self) -> list[dict[str, Any]]:
        """The most recent bad samples (up to 100): reason, shard, key, detail, count."""
        return list(self._bad.recent)

    # --- iteration

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        augment: Callable[..., Tensor] | None = None,
        with_ids: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        max_batches: int | None = None,
        with_groups: bool = False,
        first_batch: int | None = None,
    ) -> Iterator[tuple[Tensor, ...]]:
        """Yield ``(x, y)`` for one pass on this rank, then ``idx`` (the sample indices) with
        ``with_ids`` and ``g`` (the group ids; shards prepared with ``--groups``) with
        ``with_groups``: ``(x, y, idx, g)`` with both.

        ``shuffle=True``: a training epoch of exactly :meth:`num_batches` full batches of
        ``batch_size / world_size`` samples (``batch_size`` is the GLOBAL batch, as for
        ``TensorSplit``), ordered and augmented from one seed drawn from ``generator`` (torch's
        global RNG if None). ``shuffle=False``: an evaluation pass, each sample exactly once
        across ranks and workers, in batches of ``batch_size`` per worker (``drop_last`` drops
        each worker's short last batch).

        ``augment`` (training passes): a :class:`~abdist.data.augment.TrainAugment` runs
        whole in the workers: its class-aware chain on [0, 1] pixels before normalisation, its
        base crop/flip on the normalised batch, drawn from a generator seeded by the pass seed
        (itself from ``generator``), the rank and the batch's index; any other callable
        ``augment(x, y, generator, batch)`` runs here, drawing from ``generator``.
        ``first_batch`` is the run-wide index of the pass's first batch (batch ``first_batch + k``
        is the pass's ``k``-th), which the chain's table lookup needs.

        ``rank`` / ``world_size`` serve another place than the split's own for this pass (e.g.
        ``rank=0, world_size=1``: the whole stream, the same on every rank). ``max_batches``
        stops after that many batches: such a partial pass (a few batches for a hyper step) is
        read in this process, without starting workers.
        """
        if with_groups and self.num_groups is None:
            raise UserError(
                f"{self.root}: these shards were prepared without --groups and carry no group ids "
                "(re-run abdist prepare with --groups CSV)"
            )
        check_batch_size(batch_size)
        src = self._src
        if (rank, world_size) != (None, None):
            rank, world_size = resolve_rank(
                self.rank if rank is None else rank,
                self.world_size if world_size is None else world_size,
            )
            src = replace(src, rank=rank, world_size=world_size)
        workers = self.num_workers
        if max_batches is not None:
            if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
                raise UserError(f"max_batches must be a positive integer, got {max_batches!r}")
            workers = 0
            src = replace(src, num_workers=0)
        if shuffle:
            seed = seed_from(generator)
            size = local_batch(batch_size, src.world_size)
            n_batches = epoch_batches(src.num_samples, batch_size, drop_last)
        else:
            seed, n_batches, size = 0, 0, batch_size
        chain, base, hook = split_augment(augment, self.num_classes, base_in_loader=True)
        if not shuffle:
            chain = base = hook = None
        data = StreamPass(
            src,
            train=shuffle,
            batch_size=size,
            n_batches=n_batches,
            seed=seed,
            chain=chain,
            base=base,
            first_batch=first_batch,
        )
        items = data.items(workers, self.prefetch_factor, self.multiprocessing_context)
        yielded, error = 0, None
        # max_bad_fraction: of the samples this rank's slots read in this pass (their ranges
        # partition the split over ranks), checked as the bad-sample records arrive.
        where = (
            f" read by rank {src.rank}/{src.world_size} in this pass" if src.world_size > 1 else ""
        )
        limit = PassBadLimit(
            self.split, rank_coverage(src, shuffle, size, n_batches), self.max_bad_fraction, where
        )
        try:
            for kind, payload, records in items:
                self._bad.note(records)
                limit.add(records)
                if kind == "error":
                    error = payload
                    break
                if kind != "batch":
                    continue
                x, meta, index = payload
                y, idx, g = torch.from_numpy(meta).unbind(0)
                if not shuffle and drop_last and len(y) < batch_size:
                    continue
                batch = None if first_batch is None else first_batch + yielded
                if shuffle and index != (yielded if batch is None else batch):
                    raise RuntimeError(f"batch {index} arrived as the pass's batch {yielded}")
                if hook is not None:
                    x = hook(x, y, generator, batch)
                yielded += 1
                yield (x, y, *((idx,) if with_ids else ()), *((g,) if with_groups else ()))
                if yielded == max_batches:
                    return
        finally:
            # Drop the DataLoader iterator now, which stops its workers at once; a traceback
            # holding this frame would otherwise keep them alive until some later garbage
            # collection, whose shutdown then blocks (seconds per worker) at a random moment.
            items = None  # noqa: F841
        if error is not None:
            raise UserError(error)
        if shuffle and yielded != n_batches:  # the equal-batches promise; a bug if it breaks
            raise RuntimeError(f"rank {src.rank} produced {yielded} of {n_batches} batches")

    def shard(self, rank: int, world_size: int) -> ShardSplit:
        """This split as served to ``rank`` of ``world_size`` (the ``TensorSplit.shard``
        surface): the evaluation passes of the ranks' shards together visit every sample once.
        Returns ``self`` when that is the split's own place."""
        rank, world_size = resolve_rank(rank, world_size)
        if (rank, world_size) == (self.rank, self.world_size):
            return self
        view = copy.copy(self)  # shares the bad-sample counters: one split, one tally
        view.rank, view.world_size = rank, world_size
        view._src = replace(self._src, rank=rank, world_size=world_size)
        return view

    def __repr__(self) -> str:
        return (
            f"ShardSplit({str(self.root)!r}, {self.split!r}, rank={self.rank}, "
            f"world_size={self.world_size}, num_workers={self.num_workers}, samples={len(self)}, "
            f"shards={len(self._src.shards)})"
        )
