"""The files of an FFCV split and one pass's samples routed over them.

A split is one ``.beton`` file, or several end to end ("train+val", a retrain's data): positions
``0 .. N-1`` of the split number the first file's samples, then the next file's, and the
samples' ids are numbered the same way (the later files' ids after the earlier ones', as the
WebDataset split numbers them). A pass's order over the split's positions is cut into each file's
positions, in order; each file runs its own FFCV pass over its share, and every batch takes the
next samples of the files its positions name (``assemble``). With one file that is the file's own
batch, untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from abdist.data.ffcv_files import FIELDS, require_ffcv
from abdist.data.ffcv_pipeline import build_loader
from abdist.data.manifest import manifest_num_groups
from abdist.errors import UserError


@dataclass
class Part:
    """One ``.beton`` file of the split (one part of "train+val")."""

    name: str
    path: Path | None
    n: int
    id_offset: int
    labels: Tensor  # by position in the file (FFCV's batch indices)
    groups: Tensor  # by the samples' index field (empty without groups)
    fixed: bool  # every image already has the output size
    loaders: dict[tuple, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoaderSettings:
    """What every Loader of a split is built with (abdist/data/ffcv_pipeline.py)."""

    channels: int
    size: int
    mean: tuple
    std: tuple
    eval_transform: Callable | None
    num_workers: int
    os_cache: bool
    batches_ahead: int


def part_loader(part: Part, settings: LoaderSettings, train: bool, batch_size: int, length: int):
    """Part's FFCV Loader for passes of this kind (one per kind: each compiles its pipeline)."""
    key = (train, batch_size, length)
    if key not in part.loaders:
        part.loaders[key] = build_loader(
            part.path,
            labels=part.labels,
            channels=settings.channels,
            size=None if part.fixed else settings.size,
            mean=settings.mean,
            std=settings.std,
            transform=None if train else settings.eval_transform,
            train=train,
            batch_size=batch_size,
            length=length,
            num_workers=settings.num_workers,
            os_cache=settings.os_cache,
            batches_ahead=settings.batches_ahead,
        )
    return part.loaders[key]


def start_part(p, part, settings, order, *, train, batch_size, seed, rank, world_size, chain,
               first_batch, groups) -> PartStream | None:  # fmt: skip
    """Start part ``p``'s FFCV pass over its positions of ``order`` (None if it has none)."""
    start = part.id_offset
    mine = order[(order >= start) & (order < start + part.n)] - start
    if len(mine) == 0:
        return None
    # Whole batches only (FFCV's drop_last=False breaks on an odd last batch): pad with the
    # last sample; the padding is never taken from the stream.
    mine = np.concatenate([mine, np.full(-len(mine) % batch_size, mine[-1], dtype=np.int64)])
    # One Loader per kind of pass, sized for the whole pass (a part's share varies by epoch, a
    # gather's length by call: rounded up to a power of two, so few loaders are built).
    loader, op = part_loader(part, settings, train, batch_size, capacity(len(order), batch_size))
    loader.traversal_order.order = mine.astype(np.int64)
    # The first part keeps the single-file pass's seed and stream (same pixels as before
    # "train+val" existed); later parts draw from their own.
    key = [seed, rank] if p == 0 else [seed, rank, p]
    aug_seed = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])
    op.start_pass(aug_seed >> 1, chain=chain, first_batch=first_batch,
                  stream=rank + p * world_size)  # fmt: skip
    return PartStream(iter(loader), part, groups)


def capacity(length: int, batch_size: int) -> int:
    """The Loader length for a pass of `length` positions: whole batches, the number of batches
    rounded up to a power of two (FFCV takes any shorter order; each length compiles a Loader)."""
    batches = math.ceil(length / batch_size)
    return batch_size * (1 << max(0, batches - 1).bit_length())


def open_part(root: Path, manifest: dict, split: str, size: int, id_offset: int) -> Part:
    splits = manifest["splits"]
    if split not in splits:
        raise UserError(f"{root}: no split '{split}' in the manifest (has: {sorted(splits)})")
    info = splits[split]
    entries = info["shards"]
    if any(not e["name"].endswith(".beton") for e in entries) or len(entries) > 1:
        raise UserError(
            f"{root}: split '{split}' is not in FFCV format (files: "
            f"{', '.join(e['name'] for e in entries)}); prepare it with --format ffcv, or "
            "read WebDataset shards with abdist.data.loader.ShardSplit"
        )
    n = int(info["num_samples"])
    empty = torch.zeros(0, dtype=torch.int64)
    if not entries:
        if n:
            raise UserError(f"{root}: split '{split}' has {n} samples but no .beton file")
        return Part(split, None, 0, id_offset, empty, empty, True)
    require_ffcv()
    from ffcv.reader import Reader

    path = root / entries[0]["name"]
    if not path.is_file():
        raise UserError(f"{path} listed in the manifest is missing")
    try:
        reader = Reader(str(path))
    except Exception as exc:
        raise UserError(
            f"{path}: not a readable .beton ({exc}); check it with abdist verify"
        ) from None
    if int(reader.num_samples) != n or list(reader.handlers)[:3] != list(FIELDS):
        raise UserError(
            f"{path}: {reader.num_samples} samples with fields {list(reader.handlers)}, the "
            f"manifest says {n} with {list(FIELDS)}; check it with abdist verify"
        )
    cols = reader.metadata.dtype.names
    labels = torch.from_numpy(reader.metadata[cols[1]].astype(np.int64))
    groups = empty
    if manifest_num_groups(manifest) is not None:  # looked up by the samples' index field
        index = reader.metadata[cols[2]].astype(np.int64)
        by_index = np.zeros(int(index.max()) + 1 if len(index) else 0, dtype=np.int64)
        by_index[index] = reader.metadata[cols[3]]
        groups = torch.from_numpy(by_index)
    heights, widths = reader.metadata[cols[0]]["height"], reader.metadata[cols[0]]["width"]
    fixed = bool((heights == size).all() and (widths == size).all())
    return Part(split, path, n, id_offset, labels, groups, fixed)


class PartStream:
    """One part's FFCV pass as a stream of samples: ``take(m)`` gives the next ``m`` as
    ``(x, y, idx, g)`` (``g`` None without groups), ids already numbered for the whole split."""

    def __init__(self, it, part: Part, groups: bool) -> None:
        self.it, self.part, self.groups = it, part, groups
        self.batch: tuple | None = None
        self.pos = 0

    def _refill(self) -> None:
        # Copies: FFCV reuses its label/index buffers a few batches later (x is a new tensor).
        x, y, idx = next(self.it)
        y, idx = y.reshape(-1).clone(), idx.reshape(-1).clone()
        g = self.part.groups[idx] if self.groups else None  # by the file's own index field
        if self.part.id_offset:
            idx = idx + self.part.id_offset
        self.batch, self.pos = (x, y, idx, g), 0

    def take(self, m: int) -> tuple:
        pieces = []
        while m:
            if self.batch is None or self.pos == len(self.batch[1]):
                self._refill()
            size = len(self.batch[1])
            k = min(m, size - self.pos)
            if k == size:  # a whole batch (the single-file case): no copy
                pieces.append(self.batch)
            else:
                pieces.append(
                    tuple(t if t is None else t[self.pos : self.pos + k] for t in self.batch)
                )
            self.pos, m = self.pos + k, m - k
        if len(pieces) == 1:
            return pieces[0]
        return tuple(None if ts[0] is None else torch.cat(ts) for ts in zip(*pieces))

    def close(self) -> None:
        self.it.close()
        # An abandoned pass: let FFCV's thread stop (it checks every 0.5 s) before a next pass
        # resets the augmentation generator it may still be drawing from.
        self.it.join(timeout=5)


def assemble(streams: list[PartStream | None], parts: np.ndarray) -> tuple:
    """One batch whose position ``i`` comes from part ``parts[i]``: each part's next samples, in
    the pass's order."""
    first = int(parts[0])
    if (parts == first).all():
        return streams[first].take(len(parts))
    pieces = {int(p): streams[int(p)].take(int((parts == p).sum())) for p in np.unique(parts)}
    shapes = next(iter(pieces.values()))
    out = [None if t is None else t.new_empty((len(parts), *t.shape[1:])) for t in shapes]
    for p, piece in pieces.items():
        mask = torch.from_numpy(parts == p)
        for o, t in zip(out, piece):
            if o is not None:
                o[mask] = t
    return tuple(out)
