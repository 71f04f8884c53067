"""Streaming shards for the trainer (``data.in_memory=false``, and every FFCV directory): per-rank
loaders behind the DataBundle surface the training loop uses (train/val/test, class metadata,
with_val_merged) -- ``ShardSplit`` for WebDataset shards, ``FFCVSplit`` for a directory prepared
with ``--format ffcv`` (chosen from its manifest; FFCV's page cache plays the in-memory role, so
``data.in_memory`` does not apply to it).

Everything the in-memory path does holds here too: ``train.batch_size`` is the global batch (each
rank reads ``B / world_size`` of it), evaluation visits every sample once across ranks, and the
training augmentation is the same system (abdist/data/augment.py): the class-aware chain runs
where the pixels are decoded (the WebDataset workers, FFCV's loader thread) and reads the
per-class table at the version the batch's index selects, the crop/flip runs in the training
process. That keeps the run deterministic and resumable: nothing depends on when a worker saw a
table update (abdist/data/augment_table.py).

Bad data follows the same policy as in memory (``data.bad_data``, ``data.max_bad_fraction``, a
damaged shard file is always an error); what the streaming reader checks, and why it does not
rehash the shards, is in :mod:`abdist.data.loader` ("Bad data").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from abdist.data.loader import ShardSplit
from abdist.data.manifest import is_ffcv, read_manifest
from abdist.data.memory import TensorSplit
from abdist.errors import UserError


@dataclass
class StreamingBundle:
    """Train/val/test as per-rank loaders over one prepared directory; `open_split(name)` opens
    another split of it (e.g. "train+val") the same way."""

    train: Any  # ShardSplit | FFCVSplit
    val: Any  # the same, or an empty TensorSplit after with_val_merged
    test: Any
    open_split: Callable[[str], Any] = field(repr=False)

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def in_channels(self) -> int:
        return self.train.image_shape[0]

    @property
    def image_size(self) -> int:
        return self.train.image_shape[1]

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) the loaders normalise with (the training split's)."""
        return tuple(self.train.mean), tuple(self.train.std)

    @property
    def class_counts(self) -> list[int]:
        """Training samples per class, from the manifest."""
        return self.train.class_counts

    @property
    def num_groups(self) -> int | None:
        """Number of groups (shards prepared with --groups), else None."""
        return self.train.num_groups

    def cell_counts(self) -> list[list[int]] | None:
        """Training samples per (group, class), from the manifest."""
        return self.train.cell_counts()

    def with_val_merged(self) -> StreamingBundle:
        """Train on the train and val shards together, with an empty validation split."""
        c, h, w = self.train.image_shape
        empty = TensorSplit(torch.zeros(0, c, h, w), torch.zeros(0, dtype=torch.int64))
        return replace(self, train=self.open_split("train+val"), val=empty)

    @property
    def bad_sample_counts(self) -> dict[str, int]:
        """Bad samples this rank met so far, all splits together (by reason, plus total)."""
        total: dict[str, int] = {}
        for split in (self.train, self.val, self.test):
            for reason, n in getattr(split, "bad_sample_counts", {}).items():
                total[reason] = total.get(reason, 0) + n
        return total


def load_shards_streaming(cfg, rank: int, world_size: int) -> StreamingBundle:
    """Per-rank loaders for the prepared directory at ``cfg.root`` (a DataConfig): WebDataset
    shards or, when its manifest says so, FFCV files."""
    root = Path(cfg.root)
    if is_ffcv(read_manifest(root)):
        open_split = _ffcv_opener(root, cfg, rank, world_size)
    else:
        options = dict(
            rank=rank,
            world_size=world_size,
            num_workers=cfg.workers,
            shuffle_buffer=cfg.shuffle_buffer,
            bad_data=cfg.bad_data,
            max_bad_fraction=cfg.max_bad_fraction,
        )

        def open_split(name: str) -> ShardSplit:
            return ShardSplit(root, name, **options)

    train = open_split("train")
    if len(train) == 0:
        raise UserError(f"{root}: the train split is empty; re-run `abdist prepare`")
    return StreamingBundle(train, open_split("val"), open_split("test"), open_split)


def _ffcv_opener(root: Path, cfg, rank: int, world_size: int) -> Callable[[str], Any]:
    from abdist.data.ffcv_backend import FFCVSplit

    # FFCV decodes in threads of this process: data.workers of them (at least one).
    options = dict(rank=rank, world_size=world_size, num_workers=max(1, cfg.workers))

    def open_split(name: str) -> FFCVSplit:
        return FFCVSplit(root, name, **options)

    return open_split
