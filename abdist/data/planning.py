"""Planning a pass over shards: pure arithmetic over the manifest's sample counts.

How samples are split (explicit node and worker splitting)
-----------------------------------------------------------
One pass lays the split's shards end to end (in a seeded random order for training, in manifest
order for evaluation), which numbers every sample by a position ``0 .. N-1`` in that stream
(shard sample counts come from the manifest). The ``world_size * num_workers`` (rank, worker)
*slots* (slot = ``rank * num_workers + worker``) each get one contiguous range of positions, and a
slot reads only the shards that overlap its range, skipping (not decoding) the samples before its
start. Ranges are computed from the manifest alone, identically on every rank, so no
communication is needed, and they work for ANY shard count: with fewer shards than slots several
slots read disjoint parts of one shard (exact, at the cost of parsing the skipped tar headers).

Training epoch (``batches(..., shuffle=True)``)
    ``B`` is the GLOBAL batch (as for the in-memory ``TensorSplit``): every rank yields exactly
    ``num_batches(B, drop_last)`` full batches of ``B / world_size`` samples (``B`` must divide):
    ``ceil(N / B)``, or ``floor`` with ``drop_last``. The same on all ranks,
    whatever the shard layout, so DDP never waits on a rank that ran out. The rank's batches are
    split over its workers (``n // W``, the first ``n % W`` workers one more) and each slot's
    range is proportional to its quota of samples. A slot shuffles its range through a
    ``shuffle_buffer`` of encoded samples; when the range is exhausted before the quota (the
    last partial batch, or skipped bad samples) it reads its range again (repeat), and it stops
    as soon as the quota is met (truncate). So an epoch is one pass over the split in which every
    sample is drawn once across all ranks, plus fewer than ``B`` repeats to fill the last batches
    (or minus fewer than ``B`` dropped samples with ``drop_last``).
    The shard order, the ranges, the shuffle buffers and the workers' augmentation randomness all
    derive from one seed drawn from ``generator``: the same generator state (and the same
    ``world_size`` and ``num_workers``) reproduces the epoch exactly. The generator must be in the
    same state on every rank (the trainer's ``(seed, epoch)`` generator is), or the ranges of
    different ranks would be cut from differently shuffled streams.

Evaluation pass (``batches(..., shuffle=False)``)
    Manifest order, ranges of ``N / slots`` samples, no repeats, no padding: every sample is
    yielded exactly once across all ranks and workers; a worker's last batch may be short and
    ranks may get different numbers of batches (evaluation has no per-batch collective). Pass
    ``with_ids=True`` to get ``(x, y, idx)`` with the sample indices (the ``idx`` field), to gather
    predictions across ranks or to check coverage.
"""

from __future__ import annotations

import math
import random
from typing import Protocol

import torch

from abdist.errors import UserError


class Layout(Protocol):
    """What planning needs to know about a split: its shards' sizes and this rank's place."""

    shards: tuple  # each with .num_samples
    rank: int
    world_size: int

    @property
    def num_samples(self) -> int: ...

    @property
    def slots_per_rank(self) -> int: ...


def derive_seed(seed: int, *parts: object) -> int:
    # Seeding random.Random with a str hashes it with SHA-512: stable across processes and runs.
    return random.Random(":".join(map(str, (seed, *parts)))).getrandbits(63)


def worker_batches(n_batches: int, workers: int, worker: int) -> int:
    return n_batches // workers + (1 if worker < n_batches % workers else 0)


def slot_range(src: Layout, *, train: bool, batch_size: int, n_batches: int, worker: int):
    """This rank's ``worker``'s position range [a, b) of the pass, and its batch quota."""
    n, w = src.num_samples, src.slots_per_rank
    slot = src.rank * w + worker
    if not train:
        total = src.world_size * w
        return n * slot // total, n * (slot + 1) // total, None
    quota = [worker_batches(n_batches, w, i) * batch_size for i in range(w)]
    total = src.world_size * n_batches * batch_size
    if total == 0:
        return 0, 0, 0
    before = src.rank * n_batches * batch_size + sum(quota[:worker])
    return n * before // total, n * (before + quota[worker]) // total, quota[worker] // batch_size


def rank_coverage(src: Layout, train: bool, batch_size: int, n_batches: int) -> int:
    """Positions this rank's slots read in one pass (the ranks' ranges partition the split)."""
    ranges = (
        slot_range(src, train=train, batch_size=batch_size, n_batches=n_batches, worker=w)
        for w in range(src.slots_per_rank)
    )
    return sum(b - a for a, b, _ in ranges)


def stream_segments(src: Layout, order: list[int], a: int, b: int) -> list[tuple[int, int, int]]:
    """Positions [a, b) of the stream of shards in ``order`` as (shard, start, stop) pieces."""
    out, c = [], 0
    for i in order:
        n = src.shards[i].num_samples
        lo, hi = max(a, c), min(b, c + n)
        if lo < hi:
            out.append((i, lo - c, hi - c))
        c += n
    return out


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")


def local_batch(batch_size: int, world_size: int) -> int:
    """Each rank's share of a global training batch (which must divide evenly)."""
    check_batch_size(batch_size)
    if batch_size % world_size:
        raise UserError(
            f"batch size {batch_size} is the global batch and must be divisible by the "
            f"{world_size} ranks (each takes batch_size/{world_size})"
        )
    return batch_size // world_size


def epoch_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Global batches of ``batch_size`` in a training epoch over ``n`` samples."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def seed_from(generator: torch.Generator | None) -> int:
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed
    live = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if live else 0
    if world_size is None:
        world_size = dist.get_world_size() if live else 1
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{name} must be an integer, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size
