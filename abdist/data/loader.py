"""Per-rank loader over WebDataset-format shards: the ``TensorSplit`` surface, for data on disk.

:class:`ShardSplit` reads a split written as ``<split>-NNNNNN.tar`` shards plus ``manifest.json``
(format ``abdist-shards/1``) and serves it through the same three calls the trainer uses on an
in-memory :class:`~abdist.data.memory.TensorSplit`: ``len(split)``, ``num_batches`` and
``batches``. Each rank builds its own ``ShardSplit(rank=r, world_size=W_r, num_workers=W)``.

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

Images
    Decoded with ``torchvision.io.decode_image`` (libjpeg-turbo / libpng; about 3x faster than
    PIL on 32x32 JPEGs here), falling back to PIL for other formats and when torchvision drops
    these decoders (deprecated since 0.29 in favour of TorchCodec); ``decoder="pil"`` uses PIL
    only. Then converted to the manifest's channel count, and resized (shorter side) + centre
    cropped to ``image_size`` when a file's size differs. Transforms see float32 ``[B, C, H, W]``
    in ``[0, 1]``: training applies ``augment(x, y, generator)`` (e.g. a
    :class:`~abdist.data.augment.ClassAwareAugment`), evaluation ``eval_transform(x)``, both in
    the worker on whole batches. Then ``x = (x - mean[c]) / std[c]``, with ``mean``/``std`` from
    the constructor, else the manifest's ``image.mean`` / ``image.std`` if it has them (per
    channel, on the [0, 1] scale, meant to be the training split's statistics; ``abdist prepare``
    does not write them yet), else 0.5 / 0.5, which maps [0, 1] to [-1, 1]. Fixed values rather
    than statistics computed here: every rank and every run must normalise identically, and a
    pass over the data at start-up would cost an epoch of decoding.

Bad data
    A *bad sample* -- its image does not decode, its ``cls`` (or ``grp``) is not an integer in
    range, or it lacks a member (image, ``cls``, ``idx``) -- is handled by ``bad_data``, exactly
    as the in-memory loader (:mod:`abdist.data.shard_memory`) handles it: ``"skip"`` (default)
    leaves it out, counts it in :attr:`ShardSplit.bad_sample_counts` and warns
    (:class:`BadSampleWarning`) naming the shard and the key; ``"error"`` raises a one-line
    :class:`~abdist.errors.UserError` with that location. Workers report bad samples *with the
    batches they send*, so counting happens in the training process: no lost updates between
    workers, counts that match what was consumed, and warnings where logging and tests can see
    them. A sample is counted once per pass (epoch). ``max_bad_fraction``
    (``data.max_bad_fraction``) bounds the skipping: when more than that share of the samples a
    rank reads in one pass is bad, the pass stops with a one-line error saying how many of how
    many (checked as the counts arrive, so a mostly broken split fails in its first batches, not
    after an epoch of repeats).

    A *damaged shard* is never skipped, whatever ``bad_data`` says: the file is not what the
    manifest describes, so none of it can be trusted. What is checked, and when (nothing here
    rehashes the data: the sha256 of every byte at every start or epoch would cost a pass over a
    dataset too large for memory; ``abdist verify`` recomputes it, and the in-memory loader, which
    reads whole files anyway, checks it on load):

    - at construction, per shard, one ``stat``: the file exists and its size is a whole number of
      512-byte tar blocks (a cut-off file usually is not);
    - while reading: every tar header's checksum, members that end early, the end-of-archive
      marker, and that a shard holds exactly the manifest's sample count (one header beyond the
      last sample is parsed to see that nothing follows).

    Each raises a one-line ``UserError`` naming the shard, saying it is damaged and to re-run
    ``abdist prepare`` (``abdist verify`` lists every problem). An FFCV directory
    (``--format ffcv``) is refused at construction in one line as well.

Why not ``webdataset.WebDataset``
    The shards are plain WebDataset tars (``webdataset`` reads them; tests write them with its
    ``TarWriter``), but the reader here is its own: WebDataset's splitters assign whole shards,
    which cannot give exact evaluation or equal training batches with fewer (or unevenly sized)
    shards than slots, and its ``tarfile``-based member iteration alone cost ~130 us per CIFAR
    sample here (four times the JPEG decode); the small header parser below does ~25 us and
    knows the shard and key of every error. Members are grouped into samples by WebDataset's key
    rule (the basename up to its first dot). ``bench/loader.py`` has the measurements.
"""

from __future__ import annotations

import copy
import io
import math
import random
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from abdist.errors import UserError

__all__ = ["BAD_REASONS", "BadSampleWarning", "ShardSplit"]

# Categories of bad samples, the keys of ShardSplit.bad_sample_counts (plus "total"). A shard whose
# bytes cannot be read is no bad sample but a damaged file: always an error (see the docstring).
BAD_REASONS = ("decode", "label", "missing")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_MAX_WARNINGS = 20  # per ShardSplit: a badly broken shard must not flood the log
_MAX_RECORDS = 100  # bad_samples keeps the most recent ones
_ZERO_BLOCK = bytes(512)


class BadSampleWarning(UserWarning):
    """A bad sample was skipped (``bad_data="skip"``); the message names the shard and key."""


# --- manifest -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shard:
    name: str
    path: str
    num_samples: int
    id_offset: int = 0  # added to the samples' .idx: "train+val" numbers val after train


# --- tar reading --------------------------------------------------------------------------------


class _TarError(Exception):
    """The shard's bytes are not a readable tar from here on."""


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header, if any (records: ``"%d key=value\\n"``)."""
    path, i = None, 0
    while i < len(data) and data[i : i + 1] != b"\0":
        space = data.index(b" ", i)
        length = int(data[i:space])
        if length <= space - i:
            raise ValueError("bad pax record length")
        key, _, value = data[space + 1 : i + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "replace")
        i += length
    return path


def _split_key(name: str) -> tuple[str, str] | tuple[None, None]:
    """WebDataset's rule: key = path up to the basename's first dot; extension = the rest."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None, None
    return name[:dot], name[dot + 1 :].lower()


def _tar_members(f) -> Iterator[tuple[str, int, int]]:
    """Yield ``(name, size, padded_size)`` of each regular member of the tar stream ``f``.

    The consumer must read or seek over exactly ``padded_size`` bytes before asking for the
    next member. Handles ustar, pax (``x``) and GNU long-name (``L``) headers and checks every
    header checksum; raises :class:`_TarError` where the bytes stop being a tar, including a
    stream that ends without the end-of-archive marker (every tar writer writes it: a file that
    lacks it was cut off, possibly between two samples).
    """
    long_name: str | None = None
    while True:
        offset = f.tell()
        header = f.read(512)
        if len(header) < 512 or header == _ZERO_BLOCK:
            if len(header) < 512:
                what = "header" if header else "end-of-archive marker"
                raise _TarError(f"truncated: no tar {what} at byte {offset}")
            return
        try:
            checksum = _octal(header[148:156])
            size = _octal(header[124:136])
        except ValueError:
            raise _TarError(f"corrupt tar header at byte {offset}") from None
        if checksum != sum(header) - sum(header[148:156]) + 256:
            raise _TarError(f"tar header checksum mismatch at byte {offset}")
        padded = (size + 511) & ~511
        kind = header[156:157]
        if kind in (b"x", b"L"):  # describes the next member's name
            data = f.read(padded)
            if len(data) < size:
                raise _TarError(f"truncated tar member at byte {offset}")
            try:
                if kind == b"L":
                    long_name = data[:size].split(b"\0", 1)[0].decode("utf-8", "replace")
                else:
                    long_name = _pax_path(data[:size]) or long_name
            except ValueError:
                raise _TarError(f"corrupt pax header at byte {offset}") from None
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global pax headers
            f.seek(padded, 1)
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if header[257:263] == b"ustar\x00":  # POSIX ustar: the name may have a prefix
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix.decode("utf-8", "replace") + "/" + name
        yield name, size, padded


def _shard_samples(path: str, start: int, stop: int) -> Iterator[tuple[int, str, dict]]:
    """Yield ``(position, key, {ext: bytes})`` for the samples at positions [start, stop) of the
    shard file ``path`` (see :func:`_tar_samples`)."""
    with open(path, "rb", buffering=1 << 18) as f:
        yield from _tar_samples(f, start, stop)


def _tar_samples(f, start: int, stop: int) -> Iterator[tuple[int, str, dict]]:
    """Yield ``(position, key, {ext: bytes})`` for the samples at positions [start, stop) of the
    tar stream ``f`` (a file, or ``io.BytesIO`` of a whole shard).

    A sample is a run of consecutive members with the same key (WebDataset's grouping); the
    samples before ``start`` are skipped by seeking over their data, not read. If the tar breaks
    off, :class:`_TarError` says where, naming the last sample key seen; the sample it broke off
    in is not yielded (it may lack members).
    """
    pos, key, fields = -1, None, None
    try:
        for name, size, padded in _tar_members(f):
            member_key, ext = _split_key(name)
            if member_key is not None and member_key != key:
                if fields is not None:
                    yield pos, key, fields
                pos, key = pos + 1, member_key
                if pos >= stop:
                    return
                fields = {} if pos >= start else None
            if fields is not None and member_key is not None:
                data = f.read(padded)
                if len(data) < size:
                    raise _TarError(f"truncated tar member '{name}'")
                fields[ext] = data if size == padded else data[:size]
            else:
                f.seek(padded, 1)
    except _TarError as e:
        after = f", in or after sample '{key}'" if key else ""
        raise _TarError(f"{e}{after}") from None
    if fields is not None:
        yield pos, key, fields


# --- decoding -----------------------------------------------------------------------------------


class _BadSample(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _short(exc: BaseException) -> str:
    """One line of an exception message, without torchvision's 'func, file.cpp:NN, ' prefix or
    PIL's object address ('cannot identify image file <_io.BytesIO object at 0x...>')."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    parts = text.split(", ")
    if len(parts) > 2 and ".cpp:" in parts[1]:
        text = ", ".join(parts[2:])
    text = re.sub(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>", "", text)
    return text[:160]


def sample_fields(
    fields: dict, num_classes: int, num_groups: int | None
) -> tuple[bytes, int, int, int]:
    """``(image bytes, label, idx, group)`` of a sample's members, or :class:`_BadSample`.

    The one definition of a well-formed sample, shared by the streaming and the in-memory
    readers: an image member (jpg, jpeg, png, webp), ``cls`` an integer in ``[0, C)``, ``idx`` an
    integer, and (when the manifest lists groups) ``grp`` an integer in ``[0, G)``; group 0
    without groups.
    """
    data = next((fields[e] for e in IMAGE_EXTS if e in fields), None)
    if data is None:
        raise _BadSample("missing", f"no image member (.{'/.'.join(IMAGE_EXTS)})")
    for member in ("cls", "idx"):
        if member not in fields:
            raise _BadSample("missing", f"no .{member} member")
    try:
        label = int(fields["cls"])
    except ValueError:
        raise _BadSample("label", f"label {fields['cls'][:20]!r} is not an integer") from None
    if not 0 <= label < num_classes:
        raise _BadSample("label", f"label {label} outside [0, {num_classes})")
    try:
        idx = int(fields["idx"])
    except ValueError:
        raise _BadSample("missing", f"idx {fields['idx'][:20]!r} is not an integer") from None
    if num_groups is None:
        return data, label, idx, 0
    if "grp" not in fields:
        raise _BadSample("missing", "no .grp member (the manifest lists groups)")
    try:
        group = int(fields["grp"])
    except ValueError:
        raise _BadSample("label", f"group {fields['grp'][:20]!r} is not an integer") from None
    if not 0 <= group < num_groups:
        raise _BadSample("label", f"group {group} outside [0, {num_groups})")
    return data, label, idx, group


def bad_sample_error(key: str, shard: str, detail: str) -> UserError:
    """The one-line error for a bad sample under ``bad_data="error"`` (both readers)."""
    return UserError(
        f"bad sample '{key}' in shard {shard}: {detail} "
        "(bad_data='error'; bad_data='skip' skips and counts such samples)"
    )


def over_bad_limit(bad: int, of: int, limit: float | None) -> bool:
    """Whether ``bad`` skipped samples of ``of`` exceed the share ``limit`` (None: no limit)."""
    return limit is not None and bad > 0 and bad / max(of, bad) > limit


def too_many_bad(
    split: str,
    bad: int,
    of: int,
    limit: float,
    counts: dict[str, int],
    where: str = "",
    so_far: bool = False,
) -> UserError:
    """The one-line error when skipped samples exceed ``max_bad_fraction`` (both readers);
    ``so_far``: counted part-way through a pass (the streaming reader stops at once)."""
    reasons = ", ".join(f"{n} {r}" for r, n in counts.items() if n)
    at_least = "at least " if so_far else ""
    return UserError(
        f"{at_least}{bad} of {of} samples of split '{split}'{where} are unreadable (skipped as "
        f"bad: {reasons}), more than the limit data.max_bad_fraction={limit:g} allows "
        f"({math.floor(limit * of + 1e-9)}); repair or re-prepare the data (`abdist verify` "
        "checks it), or raise data.max_bad_fraction"
    )


def _decode_image(data: bytes, channels: int, decoder: str) -> Tensor:
    """Encoded bytes -> uint8 ``[channels, H, W]``."""
    if decoder == "torchvision":
        try:
            from torchvision.io import ImageReadMode, decode_image
        except ImportError:  # a future torchvision without image decoders: PIL below
            decode_image = None
        if decode_image is not None:
            mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
            try:
                # torchvision 0.29 deprecates its decoders (in favour of TorchCodec) with a
                # warning per call; they are still the fastest here, and PIL takes over when
                # they go.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                    image = decode_image(buffer, mode=mode)
                if image.ndim == 3:
                    return image
            except (RuntimeError, ValueError):
                pass  # not a format torchvision decodes, or corrupt: PIL has the last word
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            array = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    except Exception as e:  # PIL raises many types for corrupt files
        raise _BadSample("decode", f"image does not decode ({_short(e)})") from None
    image = torch.from_numpy(array.copy())
    return image.permute(2, 0, 1) if image.ndim == 3 else image.unsqueeze(0)


def _preload_decoders(decoder: str) -> None:
    """Import the decoders here, so forked workers inherit them instead of each importing them
    again at every pass (seconds per worker on a busy 2-core machine)."""
    import PIL.Image  # noqa: F401

    if decoder == "torchvision":
        try:
            import torchvision.io  # noqa: F401
        except ImportError:
            pass


def _fit(image: Tensor, height: int, width: int) -> Tensor:
    """Resize the shorter side to cover ``height x width``, then centre crop."""
    from torchvision.transforms.v2 import functional as TF

    h, w = image.shape[-2:]
    scale = max(height / h, width / w)
    size = [max(height, round(h * scale)), max(width, round(w * scale))]
    return TF.center_crop(TF.resize(image, size, antialias=True), [height, width])


# --- one pass, as run by each worker ------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """Everything a worker needs about the split (picklable)."""

    split: str
    shards: tuple[_Shard, ...]
    num_classes: int
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Any
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


def _derive(seed: int, *parts: object) -> int:
    # Seeding random.Random with a str hashes it with SHA-512: stable across processes and runs.
    return random.Random(":".join(map(str, (seed, *parts)))).getrandbits(63)


def _worker_batches(n_batches: int, workers: int, worker: int) -> int:
    return n_batches // workers + (1 if worker < n_batches % workers else 0)


def _slot_range(src: _Source, *, train: bool, batch_size: int, n_batches: int, worker: int):
    """This rank's ``worker``'s position range [a, b) of the pass, and its batch quota."""
    n, w = src.num_samples, src.slots_per_rank
    slot = src.rank * w + worker
    if not train:
        total = src.world_size * w
        return n * slot // total, n * (slot + 1) // total, None
    quota = [_worker_batches(n_batches, w, i) * batch_size for i in range(w)]
    total = src.world_size * n_batches * batch_size
    if total == 0:
        return 0, 0, 0
    before = src.rank * n_batches * batch_size + sum(quota[:worker])
    return n * before // total, n * (before + quota[worker]) // total, quota[worker] // batch_size


def _segments(src: _Source, order: list[int], a: int, b: int) -> list[tuple[int, int, int]]:
    """Positions [a, b) of the stream of shards in ``order`` as (shard, start, stop) pieces."""
    out, c = [], 0
    for i in order:
        n = src.shards[i].num_samples
        lo, hi = max(a, c), min(b, c + n)
        if lo < hi:
            out.append((i, lo - c, hi - c))
        c += n
    return out


_FLUSH = "flush"  # marks the end of a pass in a training slot's raw stream


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """WebDataset-style shuffle buffer: hold ``size`` items, emit a random one per new item.

    ``_FLUSH`` empties the buffer (in random order) before anything after it enters: a slot's
    repeat pass then only starts once its first pass has been fully emitted, so every sample
    comes before any repeat.
    """
    buf: list = []
    for item in items:
        if item is _FLUSH:
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


class _Pass(IterableDataset):
    """One pass (an epoch or an evaluation) over the split; each worker runs its own slot.

    Yields ``(kind, payload, bad_records)`` with kind ``"batch"`` (payload ``(x, y, idx, group)``),
    ``"end"`` or ``"error"`` (payload: the one-line message). ``bad_records`` are the bad samples
    met since the previous item, so the consumer can count and warn in its own process.
    """

    def __init__(
        self, src: _Source, *, train: bool, batch_size: int, n_batches: int, seed: int
    ) -> None:
        super().__init__()
        self.src, self.train, self.batch_size = src, train, batch_size
        self.n_batches, self.seed = n_batches, seed

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        run = _SlotRun(self, worker)
        try:
            yield from run.batches()
        except UserError as e:
            yield "error", str(e), run.take_records()
            return
        yield "end", None, run.take_records()


class _SlotRun:
    """The state of one (rank, worker) slot during one pass."""

    def __init__(self, p: _Pass, worker: int) -> None:
        self.p, self.src = p, p.src
        slot = self.src.rank * self.src.slots_per_rank + worker
        self.rng = random.Random(_derive(p.seed, "slot", slot))
        self.gen = torch.Generator().manual_seed(_derive(p.seed, "augment", slot))
        self.worker = worker
        self.records: list[tuple] = []
        self.bad: set[tuple[int, int]] = set()  # (shard, position): skipped for the whole pass
        c = self.src.channels
        self.mean = torch.tensor(self.src.mean, dtype=torch.float32).view(c, 1, 1)
        self.std = torch.tensor(self.src.std, dtype=torch.float32).view(c, 1, 1)

    def take_records(self) -> list[tuple]:
        records, self.records = self.records, []
        return records

    def report(self, reason: str, shard: _Shard, key: str, detail: str, count: int = 1) -> None:
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
        from abdist.data.shards import damaged_shard

        for i, start, stop in segments:
            shard = self.src.shards[i]
            end = shard.num_samples
            # A segment that reaches the shard's end reads one sample further: there must be none.
            reached, key, held = start, None, None
            try:
                for pos, key, fields in _shard_samples(shard.path, start, stop + (stop == end)):
                    if pos >= end:
                        raise damaged_shard(
                            shard.path, f"it holds more samples than the {end} the manifest lists"
                        )
                    if held is not None:
                        yield held
                    held = (i, pos, key, fields) if (i, pos) not in self.bad else None
                    reached = pos + 1
            except _TarError as e:
                raise damaged_shard(shard.path, str(e)) from None
            except OSError as e:
                raise damaged_shard(shard.path, f"it cannot be read ({_short(e)})") from None
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
            image = _decode_image(data, src.channels, src.decoder)
            if image.shape[-2:] != (src.height, src.width):
                image = _fit(image, src.height, src.width)
        except _BadSample as e:
            self.bad.add((i, pos))
            self.report(e.reason, src.shards[i], key, e.detail)
            return None
        return image, label, idx + src.shards[i].id_offset, group

    def finish(self, images: Tensor, labels: list[int], ids: list[int], groups: list[int]):
        """uint8 batch -> transformed, normalised float batch (in the worker)."""
        y = torch.tensor(labels, dtype=torch.int64)
        x = images.float().div_(255)
        if self.p.train and self.src.augment is not None:
            x = self.src.augment(x, y, self.gen)
        elif not self.p.train and self.src.eval_transform is not None:
            x = self.src.eval_transform(x)
        if not x.is_floating_point() or x.ndim != 4 or x.shape[:2] != images.shape[:2]:
            raise UserError(
                f"the {'augment' if self.p.train else 'eval_transform'} returned "
                f"{x.dtype} {tuple(x.shape)}; it must return a float [B, C, H', W'] batch "
                f"in [0, 1] with B, C = {images.shape[0]}, {images.shape[1]}"
            )
        x = x.sub_(self.mean).div_(self.std)
        ids_t, groups_t = (torch.tensor(v, dtype=torch.int64) for v in (ids, groups))
        return "batch", (x.contiguous(), y, ids_t, groups_t), self.take_records()

    def batches(self) -> Iterator[tuple]:
        p, src = self.p, self.src
        start, stop, quota = _slot_range(
            src, train=p.train, batch_size=p.batch_size, n_batches=p.n_batches, worker=self.worker
        )
        order = list(range(len(src.shards)))
        if p.train:
            random.Random(_derive(p.seed, "shards")).shuffle(order)  # same on every rank
            if quota == 0:
                return
            raw = _shuffled(self.cycle(order, start, stop), src.shuffle_buffer, self.rng)
        else:
            raw = self.read(_segments(src, order, start, stop))
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
        own = _segments(self.src, order, start, stop)
        everything = _segments(self.src, order, 0, self.src.num_samples)
        segments = own
        while True:
            count = 0
            for rec in self.read(segments):
                count += 1
                yield rec
            yield _FLUSH
            if count == 0:
                # Only a tiny split (a range of 0 samples) or a range made only of bad samples
                # gets here; borrowing from the whole split keeps every rank's batch count.
                if segments is everything:
                    raise UserError(
                        f"split '{self.src.split}' has no readable sample "
                        f"({self.src.num_samples} in the manifest, all skipped as bad)"
                    )
                segments = everything


def _identity(item):
    return item


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
        augment: ``augment(x, y, generator) -> x`` on float ``[B, C, H, W]`` in [0, 1], run in
            the workers for training passes; typically a ``ClassAwareAugment``, whose shared
            strength table workers re-read every batch.
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
        augment: Callable[[Tensor, Tensor, torch.Generator], Tensor] | None = None,
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
        # The writer's own checks, one source.
        from abdist.data.shards import check_shard_file, read_manifest, require_wds_shards

        root = Path(root)
        manifest = read_manifest(root)
        splits = manifest["splits"]
        rank, world_size = _resolve_rank(rank, world_size)
        for name, value, low in (
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
        if bad_data not in ("skip", "error"):
            raise UserError(f"bad_data must be 'skip' or 'error', got {bad_data!r}")
        if max_bad_fraction is not None and not (
            isinstance(max_bad_fraction, (int, float))
            and not isinstance(max_bad_fraction, bool)
            and 0 <= max_bad_fraction <= 1
        ):
            raise UserError(
                f"max_bad_fraction must be a number in [0, 1] or None, got {max_bad_fraction!r}"
            )
        if decoder not in ("torchvision", "pil"):
            raise UserError(f"decoder must be 'torchvision' or 'pil', got {decoder!r}")

        parts = split.split("+")  # "train+val": the splits' shards end to end (a retrain)
        for part in parts:
            if part not in splits:
                raise UserError(
                    f"{root}: no split '{part}' in the manifest (has: {sorted(splits)})"
                )
        require_wds_shards(root, manifest, parts)
        shards, offset = [], 0
        for part in parts:
            entries = splits[part].get("shards") or []
            for entry in entries:
                path = root / entry["name"]
                check_shard_file(path, entry)  # exists, whole tar blocks: one stat, no reading
                shards.append(_Shard(entry["name"], str(path), int(entry["num_samples"]), offset))
            offset += splits[part].get("num_samples", sum(e["num_samples"] for e in entries))
        total = sum(s.num_samples for s in shards)
        declared = sum(
            splits[part].get("num_samples", sum(e["num_samples"] for e in splits[part]["shards"]))
            for part in parts
        )
        if declared != total:
            raise UserError(
                f"{root}/manifest.json: split '{split}' declares {declared} samples but its "
                f"shards hold {total}"
            )
        channels, size, num_classes, mean, std = image_settings(
            root, manifest, image_size=image_size, mean=mean, std=std, augment=augment
        )

        self.root, self.split, self.manifest = root, split, manifest
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.max_bad_fraction = max_bad_fraction
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self._src = _Source(
            split=split,
            shards=tuple(shards),
            num_classes=num_classes,
            channels=channels,
            height=int(size),
            width=int(size),
            mean=mean,
            std=std,
            augment=augment,
            eval_transform=eval_transform,
            bad_data=bad_data,
            decoder=decoder,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            num_groups=len(manifest["group_names"]) if manifest.get("group_names") else None,
        )
        _preload_decoders(decoder)
        self._counts = dict.fromkeys(BAD_REASONS, 0)
        self._records: list[dict[str, Any]] = []
        self._warned = 0

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
        totals = [[0] * self.num_classes for _ in range(self.num_groups)]
        for part in self.split.split("+"):
            for g, row in enumerate(self.manifest["splits"][part]["group_class_counts"]):
                for c, n in enumerate(row):
                    totals[g][c] += int(n)
        return totals

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

    @property
    def augment(self):
        """The worker-side training augmentation (e.g. a ``ClassAwareAugment``) or None."""
        return self._src.augment

    # --- counts

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """Batches per rank in a training epoch of GLOBAL batches of ``batch_size`` (each rank
        takes ``batch_size / world_size`` of each): ``ceil`` (``floor`` with drop_last) of
        ``len / batch_size``; the same on every rank."""
        local_batch(batch_size, self.world_size)
        return epoch_batches(len(self), batch_size, drop_last)

    def eval_num_batches(self, batch_size: int) -> int:
        """Batches this rank yields in an evaluation pass (fewer if bad samples are skipped)."""
        _check_batch_size(batch_size)
        total = 0
        for worker in range(self._src.slots_per_rank):
            a, b, _ = _slot_range(
                self._src, train=False, batch_size=batch_size, n_batches=0, worker=worker
            )
            total += math.ceil((b - a) / batch_size)
        return total

    @property
    def bad_sample_counts(self) -> dict[str, int]:
        """Bad samples met by this rank so far, by reason, plus ``"total"`` (all workers, all
        passes; a sample counts once per pass). Sum over ranks for the run's figure."""
        return {**self._counts, "total": sum(self._counts.values())}

    @property
    def bad_samples(self) -> list[dict[str, Any]]:
        """The most recent bad samples (up to 100): reason, shard, key, detail, count."""
        return list(self._records)

    def _note(self, records: list[tuple]) -> None:
        for reason, shard, key, detail, count in records:
            self._counts[reason] += count
            self._records.append(
                {"reason": reason, "shard": shard, "key": key, "detail": detail, "count": count}
            )
            if self._warned < _MAX_WARNINGS:
                self._warned += 1
                more = (
                    "; further bad samples are only counted (bad_sample_counts)"
                    if self._warned == _MAX_WARNINGS
                    else ""
                )
                warnings.warn(
                    f"skipped bad sample '{key}' in shard {shard} ({reason}: {detail}){more}",
                    BadSampleWarning,
                    stacklevel=3,
                )
        del self._records[:-_MAX_RECORDS]

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
    ) -> Iterator[tuple[Tensor, ...]]:
        """Yield ``(x, y)`` for one pass on this rank, then ``idx`` (the sample indices) with
        ``with_ids`` and ``g`` (the group ids; shards prepared with ``--groups``) with
        ``with_groups``: ``(x, y, idx, g)`` with both.

        ``shuffle=True``: a training epoch of exactly :meth:`num_batches` full batches of
        ``batch_size / world_size`` samples (``batch_size`` is the GLOBAL batch, as for
        ``TensorSplit``), ordered and augmented from one seed drawn from ``generator`` (torch's
        global RNG if None). ``shuffle=False``: an evaluation pass, each sample exactly once
        across ranks and workers, in batches of ``batch_size`` per worker (``drop_last`` drops
        each worker's short last batch). ``augment(x, generator, y)`` is the ``TensorSplit``
        hook: it runs here, in the calling process, on the normalised batch (the worker-side
        ``augment`` given to the constructor runs before normalisation).

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
        _check_batch_size(batch_size)
        src = self._src
        if (rank, world_size) != (None, None):
            rank, world_size = _resolve_rank(
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
            seed = _draw_seed(generator)
            size = local_batch(batch_size, src.world_size)
            n_batches = epoch_batches(src.num_samples, batch_size, drop_last)
        else:
            seed, n_batches, size = 0, 0, batch_size
        data = _Pass(src, train=shuffle, batch_size=size, n_batches=n_batches, seed=seed)
        if workers == 0:
            items = iter(data)
        else:
            items = iter(
                DataLoader(
                    data,
                    batch_size=None,
                    num_workers=self.num_workers,
                    collate_fn=_identity,
                    prefetch_factor=self.prefetch_factor,
                    multiprocessing_context=self.multiprocessing_context,
                    # Its own generator: creating workers must not consume the global RNG.
                    generator=torch.Generator().manual_seed(_derive(seed, "loader")),
                )
            )
        yielded, error = 0, None
        # max_bad_fraction: of the samples this rank's slots read in this pass (their ranges
        # partition the split over ranks), checked as the bad-sample records arrive.
        covered = sum(
            b - a
            for a, b, _ in (
                _slot_range(src, train=shuffle, batch_size=size, n_batches=n_batches, worker=w)
                for w in range(src.slots_per_rank)
            )
        )
        pass_bad = dict.fromkeys(BAD_REASONS, 0)
        try:
            for kind, payload, records in items:
                self._note(records)
                if records and self.max_bad_fraction is not None:
                    for reason, *_, count in records:
                        pass_bad[reason] += count
                    bad = sum(pass_bad.values())
                    if over_bad_limit(bad, covered, self.max_bad_fraction):
                        where = (
                            f" read by rank {src.rank}/{src.world_size} in this pass"
                            if src.world_size > 1
                            else ""
                        )
                        raise too_many_bad(
                            self.split,
                            bad,
                            covered,
                            self.max_bad_fraction,
                            pass_bad,
                            where,
                            so_far=True,
                        )
                if kind == "error":
                    error = payload
                    break
                if kind != "batch":
                    continue
                x, y, idx, g = payload
                if not shuffle and drop_last and len(y) < batch_size:
                    continue
                if augment is not None:
                    x = augment(x, generator, y)
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
        rank, world_size = _resolve_rank(rank, world_size)
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


def _refuse_groups(with_groups: bool) -> None:
    """The FFCV reader does not yield group ids (yet): what needs them says so in one line."""
    if with_groups:
        raise UserError(
            "the FFCV reader does not yield group ids yet; read group data with the WebDataset "
            "shards (ShardSplit, or abdist train)"
        )


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")


def local_batch(batch_size: int, world_size: int) -> int:
    """Each rank's share of a global training batch (which must divide evenly)."""
    _check_batch_size(batch_size)
    if batch_size % world_size:
        raise UserError(
            f"batch size {batch_size} is the global batch and must be divisible by the "
            f"{world_size} ranks (each takes batch_size/{world_size})"
        )
    return batch_size // world_size


def epoch_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Global batches of ``batch_size`` in a training epoch over ``n`` samples."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def manifest_class_counts(manifest: dict, split: str, num_classes: int) -> list[int]:
    """Samples per class of ``split`` ("a+b": summed over the parts), from the manifest."""
    totals = [0] * num_classes
    for part in split.split("+"):
        for c, n in enumerate(manifest["splits"][part].get("class_counts") or []):
            totals[c] += int(n)
    return totals


def _draw_seed(generator: torch.Generator | None) -> int:
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


def _per_channel(name: str, value: Any, channels: int) -> tuple[float, ...]:
    values = (
        [float(value)] * channels if isinstance(value, (int, float)) else list(map(float, value))
    )
    if len(values) != channels or not all(math.isfinite(v) for v in values):
        raise UserError(f"{name} must be one finite number per channel ({channels}), got {value!r}")
    return tuple(values)


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
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


def image_settings(root, manifest: dict, *, image_size, mean, std, augment):
    """(channels, size, num_classes, mean, std) from a manifest and the caller's overrides.

    Shared by every shard reader (WebDataset, FFCV) so they agree on shapes and normalisation.
    """
    image = manifest.get("image") or {}
    channels = int(image.get("channels") or 3)
    if channels not in (1, 3):
        raise UserError(f"{root}/manifest.json: image.channels must be 1 or 3, got {channels}")
    size = image_size if image_size is not None else image.get("size")
    if size is None:
        raise UserError(
            f"{root}: the manifest has no fixed image.size; pass image_size= to resize to"
        )
    num_classes = int(manifest["num_classes"])
    if augment is not None and getattr(augment, "num_classes", num_classes) != num_classes:
        raise UserError(
            f"augment is built for {augment.num_classes} classes, the data has {num_classes}"
        )
    mean = _per_channel("mean", mean if mean is not None else image.get("mean", 0.5), channels)
    std = _per_channel("std", std if std is not None else image.get("std", 0.5), channels)
    if any(s <= 0 for s in std):
        raise UserError(f"std must be positive, got {list(std)}")
    return channels, int(size), num_classes, mean, std
