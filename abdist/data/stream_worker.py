"""The worker pass of the streamed loader: what one (rank, worker) slot does in one pass.

A slot reads its planned range of shard positions (abdist/data/planning.py) through the tar
reader, shuffles it through a buffer (training), decodes and batches it (abdist/data/samples.py),
applies the class-aware chain (training passes), the normalisation and the crop/flip (training
passes), and sends each batch with
the bad samples it met, so the training process counts and warns (no lost updates between
workers).

A slot's ``j``-th training batch is the pass's batch ``j * W + worker`` (W workers per rank: the
DataLoader hands out the workers' batches round-robin, and quotas differ by at most one, the
earlier workers having the extra): the index the chain's table lookup and its generator use, sent
along so the consumer can check the order.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from abdist.data.manifest import ShardFile, damaged_shard
from abdist.data.planning import derive_seed, slot_range, stream_segments
from abdist.data.samples import (
    BadSample,
    bad_sample_error,
    decode_sample,
    sample_fields,
    short_error,
)
from abdist.data.tar_reader import TarError, shard_samples
from abdist.errors import UserError


@dataclass(frozen=True)
class StreamSource:
    """Everything a worker needs about the split (picklable)."""

    split: str
    shards: tuple[ShardFile, ...]
    num_classes: int
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_transform: Any
    bad_data: str
    decoder: str
    rank: int
    world_size: int
    num_workers: int
    shuffle_buffer: int
    num_groups: int | None = None  # shards prepared with --groups: every sample has a .grp

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def slots_per_rank(self) -> int:
        return max(1, self.num_workers)


FLUSH = "flush"  # marks the end of a pass in a training slot's raw stream


def _identity(item):
    return item


def shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """WebDataset-style shuffle buffer: hold ``size`` items, emit a random one per new item.

    ``FLUSH`` empties the buffer (in random order) before anything after it enters: a slot's
    repeat pass then only starts once its first pass has been fully emitted, so every sample
    comes before any repeat.
    """
    buf: list = []
    for item in items:
        if item is FLUSH:
            rng.shuffle(buf)
            yield from buf
            buf.clear()
            continue
        if size <= 1:
            yield item
            continue
        buf.append(item)
        if len(buf) >= size:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class StreamPass(IterableDataset):
    """One pass (an epoch or an evaluation) over the split; each worker runs its own slot.

    Yields ``(kind, payload, bad_records)`` with kind ``"batch"`` (payload ``(x, meta, index)``:
    ``meta`` the int64 array ``[3, B]`` of labels, ids and groups, ``index`` the batch's place in
    a training pass, see the module docstring, or None),
    ``"end"`` or ``"error"`` (payload: the one-line message). ``bad_records`` are the bad samples
    met since the previous item, so the consumer can count and warn in its own process.
    """

    def __init__(
        self,
        src: StreamSource,
        *,
        train: bool,
        batch_size: int,
        n_batches: int,
        seed: int,
        chain: Any = None,
        base: Any = None,
        first_batch: int | None = None,
    ) -> None:
        """``chain``: the class-aware ``ClassAwareAugment`` run on training batches (in [0, 1],
        before normalisation); ``base``: the crop/flip run on them after normalisation (so its
        zero padding is the dataset mean); ``first_batch``: the run-wide index of the pass's
        first batch."""
        super().__init__()
        self.src, self.train, self.batch_size = src, train, batch_size
        self.n_batches, self.seed = n_batches, seed
        self.chain, self.base, self.first_batch = chain, base, first_batch

    def items(self, workers: int, prefetch_factor: int, context: str | None) -> Iterator:
        """The pass's items: read here (``workers`` 0) or by ``workers`` DataLoader processes."""
        if workers == 0:
            return iter(self)
        loader = DataLoader(
            self,
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            prefetch_factor=prefetch_factor,
            multiprocessing_context=context,
            # Its own generator: creating workers must not consume the global RNG.
            generator=torch.Generator().manual_seed(derive_seed(self.seed, "loader")),
        )
        return iter(loader)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        run = SlotRun(self, worker)
        try:
            yield from run.batches()
        except UserError as e:
            yield "error", str(e), run.take_records()
            return
        yield "end", None, run.take_records()


class SlotRun:
    """The state of one (rank, worker) slot during one pass."""

    def __init__(self, p: StreamPass, worker: int) -> None:
        self.p, self.src = p, p.src
        slot = self.src.rank * self.src.slots_per_rank + worker
        self.rng = random.Random(derive_seed(p.seed, "slot", slot))
        self.worker = worker
        self.made = 0  # training batches this slot has sent in this pass
        self.records: list[tuple] = []
        self.bad: set[tuple[int, int]] = set()  # (shard, position): skipped for the whole pass
        c = self.src.channels
        self.mean = torch.tensor(self.src.mean, dtype=torch.float32).view(c, 1, 1)
        self.std = torch.tensor(self.src.std, dtype=torch.float32).view(c, 1, 1)

    def take_records(self) -> list[tuple]:
        records, self.records = self.records, []
        return records

    def report(self, reason: str, shard: ShardFile, key: str, detail: str, count: int = 1) -> None:
        if self.src.bad_data == "error":
            raise bad_sample_error(key, shard.path, detail)
        self.records.append((reason, shard.name, key, detail, count))

    # reading

    def read(self, segments: list[tuple[int, int, int]]) -> Iterator[tuple]:
        """Raw samples ``(shard, position, key, fields)`` of ``segments``, known-bad ones left
        out. A shard that cannot be read as the manifest describes it (a broken or cut-off tar,
        fewer or more samples than listed) raises the one-line damaged-shard ``UserError``:
        never a skippable bad sample. Each sample is held back until the next one (or the
        segment's clean end) is read, so a sample cut off by the damage is never yielded."""
        for i, start, stop in segments:
            shard = self.src.shards[i]
            end = shard.num_samples
            # A segment that reaches the shard's end reads one sample further: there must be none.
            reached, key, held = start, None, None
            try:
                for pos, key, fields in shard_samples(shard.path, start, stop + (stop == end)):
                    if pos >= end:
                        raise damaged_shard(
                            shard.path, f"it holds more samples than the {end} the manifest lists"
                        )
                    if held is not None:
                        yield held
                    held = (i, pos, key, fields) if (i, pos) not in self.bad else None
                    reached = pos + 1
            except TarError as e:
                raise damaged_shard(shard.path, str(e)) from None
            except OSError as e:
                raise damaged_shard(shard.path, f"it cannot be read ({short_error(e)})") from None
            if reached < stop:
                after = f" after sample '{key}'" if key else ""
                raise damaged_shard(
                    shard.path, f"it ends{after} at sample {reached}, the manifest lists {end}"
                )
            if held is not None:
                yield held

    # decoding and batching

    def decode(self, rec: tuple) -> tuple[Tensor, int, int, int] | None:
        """``(image, label, idx, group)`` of a raw sample (group 0 when the shards have no
        groups), or None (reported and marked bad)."""
        i, pos, key, fields = rec
        src = self.src
        try:
            data, label, idx, group = sample_fields(fields, src.num_classes, src.num_groups)
            image = decode_sample(data, src.channels, (src.height, src.width), src.decoder)
        except BadSample as e:
            self.bad.add((i, pos))
            self.report(e.reason, src.shards[i], key, e.detail)
            return None
        return image, label, idx + src.shards[i].id_offset, group

    def finish(self, images: Tensor, labels: list[int], ids: list[int], groups: list[int]):
        """uint8 batch -> transformed, normalised float batch (in the worker)."""
        y = torch.tensor(labels, dtype=torch.int64)
        x = images.float().div_(255)
        index = None
        if self.p.train:
            index = self.made * self.src.slots_per_rank + self.worker
            self.made += 1
            if self.p.first_batch is not None:
                index += self.p.first_batch
            if self.p.chain is not None:
                x = self.p.chain(x, y, batch=index, stream=self.src.rank)
        elif self.src.eval_transform is not None:
            x = self.src.eval_transform(x)
            if not x.is_floating_point() or x.ndim != 4 or x.shape[:2] != images.shape[:2]:
                raise UserError(
                    f"the eval_transform returned {x.dtype} {tuple(x.shape)}; it must return a "
                    f"float [B, C, H', W'] batch in [0, 1] with B, C = {images.shape[0]}, "
                    f"{images.shape[1]}"
                )
        x = x.sub_(self.mean).div_(self.std)
        if index is not None and self.p.base is not None:
            # Its own generator per batch (not the slot's stream): the draws depend only on the
            # pass seed, the rank and the batch index, whichever worker makes the batch.
            seed = derive_seed(self.p.seed, "crop", self.src.rank, index)
            x = self.p.base(x, y, torch.Generator().manual_seed(seed))
        # Labels, ids and groups travel as one small numpy array, pickled inline: every tensor
        # a worker sends costs a shared-memory file and a socket handshake to receive (~0.5 ms
        # here), so one tensor per batch rather than four.
        meta = np.array([labels, ids, groups], dtype=np.int64).reshape(3, -1)
        return "batch", (x.contiguous(), meta, index), self.take_records()

    def batches(self) -> Iterator[tuple]:
        p, src = self.p, self.src
        start, stop, quota = slot_range(
            src, train=p.train, batch_size=p.batch_size, n_batches=p.n_batches, worker=self.worker
        )
        order = list(range(len(src.shards)))
        if p.train:
            random.Random(derive_seed(p.seed, "shards")).shuffle(order)  # same on every rank
            if quota == 0:
                return
            raw = shuffled(self.cycle(order, start, stop), src.shuffle_buffer, self.rng)
        else:
            raw = self.read(stream_segments(src, order, start, stop))
        size = p.batch_size
        shape = (size, src.channels, src.height, src.width)
        images, labels, ids, groups = torch.empty(shape, dtype=torch.uint8), [], [], []
        done = 0
        for rec in raw:
            if (rec[0], rec[1]) in self.bad:  # a duplicate of one found bad while buffered
                continue
            sample = self.decode(rec)
            if sample is None:
                continue
            images[len(labels)] = sample[0]
            labels.append(sample[1])
            ids.append(sample[2])
            groups.append(sample[3])
            if len(labels) == size:
                yield self.finish(images, labels, ids, groups)
                images, labels, ids, groups = torch.empty(shape, dtype=torch.uint8), [], [], []
                done += 1
                if p.train and done == quota:
                    return
        if labels:  # evaluation only: a training slot's stream never ends before its quota
            yield self.finish(images[: len(labels)], labels, ids, groups)

    def cycle(self, order: list[int], start: int, stop: int) -> Iterator[tuple]:
        """Training: the slot's range over and over; the whole split if the range has nothing."""
        own = stream_segments(self.src, order, start, stop)
        everything = stream_segments(self.src, order, 0, self.src.num_samples)
        segments = own
        while True:
            count = 0
            for rec in self.read(segments):
                count += 1
                yield rec
            yield FLUSH
            if count == 0:
                # Only a tiny split (a range of 0 samples) or a range made only of bad samples
                # gets here; borrowing from the whole split keeps every rank's batch count.
                if segments is everything:
                    raise UserError(
                        f"split '{self.src.split}' has no readable sample "
                        f"({self.src.num_samples} in the manifest, all skipped as bad)"
                    )
                segments = everything
