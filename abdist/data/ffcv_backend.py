"""FFCV as an optional backend: ``abdist prepare --format ffcv`` and the :class:`FFCVSplit` reader.

Needs the ``ffcv`` extra (``ffcv==1.0.2``, built from source against Debian's ``pkg-config``,
``libopencv-dev`` and ``libturbojpeg0-dev``; ``docker/install.sh`` installs all of it with
``ABDIST_WITH_FFCV=1``). Nothing here imports ffcv until it is used, and a missing ffcv is one
:class:`~abdist.errors.UserError` line saying how to install it.

Files
-----
One ``{split}.beton`` per non-empty split (no file for an empty split) beside the usual
``manifest.json``, whose per-split ``shards`` list holds that one file with its sample count and
sha256, so ``abdist verify`` checks it like a tar shard. Fields, in this order:

- ``image`` (``RGBImageField``): JPEG source bytes are stored exactly as the source has them (the
  ``jpg`` mode of FFCV's image field, written directly instead of FFCV re-encoding decoded pixels,
  which would be lossy and slow); anything else (PNG, pixels from pickles) is decoded and stored
  as raw RGB pixels, lossless. 1-channel datasets (``image.channels == 1`` in the manifest) are
  stored as RGB with R = G = B, and the reader keeps one channel: the same values as the
  WebDataset loader's grayscale decode, without a second image field type. JPEGs that are not
  RGB or grayscale (CMYK) are decoded by PIL and stored raw, since FFCV's decoder cannot read
  them;
- ``label``, ``index`` (``IntField``): the class and the position ``i`` in the split (equal to
  the FFCV sample id, and to the ``idx`` of the WebDataset format);
- ``group`` (``IntField``), only if the dataset has groups.

A sample must fit in one FFCV page (:data:`PAGE_SIZE`, 8 MiB, FFCV's default); a bigger one is a
``UserError`` naming it. The file is written by this process alone, in record order, using
FFCV's ``DatasetWriter`` for the header and layout: no worker processes, no progress bar, and the
same bytes for the same records (FFCV's parallel writer interleaves pages nondeterministically).

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

Augmentation (the same semantics as the WebDataset loader)
    FFCV decodes (numba threads, ``num_workers`` of them) into uint8 ``[B, H, W, 3]``. A custom
    FFCV operation at the end of the image pipeline, in FFCV's loader thread, turns that into
    float ``[B, C, H, W]`` in [0, 1], looks the batch's labels up by sample id and applies
    ``augment(x, y, generator)`` for training (e.g. a
    :class:`~abdist.data.augment.ClassAwareAugment`: per-class probability and magnitude read
    from the shared :class:`~abdist.data.augment.AugmentTable` at every batch) or
    ``eval_transform(x)`` for evaluation, then normalises with ``mean`` / ``std``. It is the very
    same ``ClassAwareAugment`` code as the WebDataset path, so the distribution is identical;
    only the random stream differs (one torch generator per rank and pass, seeded from the
    pass's seed, instead of one per WebDataset worker). Differences: it runs in one background
    thread of the training process (not in worker processes), so ``AugmentTable.set`` is seen
    at the next batch FFCV prepares (up to ``batches_ahead`` batches are prepared ahead, as with
    a DataLoader's prefetch); FFCV decodes JPEGs with libjpeg-turbo's *fast* DCT (hard-wired
    in FFCV), so JPEG pixels differ from the WebDataset loader's accurate-DCT decode by a few
    levels (mean ~1, max 4 of 255 on 32x32 quality-90 images; raw/PNG pixels are exact);
    images of another size than the output are centre-cropped (side = the shorter side) and
    resized by FFCV's OpenCV decoder, not resized with antialiased bilinear and then
    centre-cropped as the WebDataset loader does; there is no bad-sample skipping (a
    ``.beton`` is checked whole, by its sha256, with ``abdist verify``).

Threads: importing ffcv and building a Loader call ``torch.set_num_threads`` (FFCV's
``Compiler.set_num_threads``); :func:`require_ffcv` and this module restore the caller's count.
The batch operation runs torch ops on one thread in FFCV's loader thread (per-thread with torch's
OpenMP backend, as in DataLoader workers): with 2 torch threads beside FFCV's decode threads it
used ~10x the CPU on a 2-core machine (760 vs 24k images/s).
"""

from __future__ import annotations

import copy
import functools
import io
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from abdist.data.manifest import (
    image_settings,
    manifest_cell_counts,
    manifest_class_counts,
    read_manifest,
    sha256_file,
)
from abdist.data.planning import (
    check_batch_size,
    epoch_batches,
    local_batch,
    resolve_rank,
    seed_from,
)
from abdist.data.shards import MAX_SAMPLE_PROBLEMS, Record, ShardScan
from abdist.errors import UserError

__all__ = [
    "FFCV_INSTALL_HINT",
    "FFCVSplit",
    "PAGE_SIZE",
    "beton_name",
    "require_ffcv",
    "scan_beton",
    "write_ffcv_split",
]

FFCV_INSTALL_HINT = (
    "install the ffcv extra: apt-get install -y pkg-config libopencv-dev libturbojpeg0-dev, "
    "then pip install 'abdist[ffcv]' (or run docker/install.sh with ABDIST_WITH_FFCV=1)"
)
PAGE_SIZE = 1 << 23  # 8 MiB, FFCV's default; every sample must fit in one page
FIELDS = ("image", "label", "index")  # + "group" when the dataset has groups
_JPG, _RAW = 0, 1  # RGBImageField's modes


def require_ffcv():
    """Import and return the ``ffcv`` module, or raise a one-line ``UserError`` saying how."""
    threads = torch.get_num_threads()
    try:
        import ffcv  # its first import calls torch.set_num_threads(1) (Compiler's defaults)
    except ImportError as exc:
        raise UserError(f"the FFCV backend needs ffcv ({exc}); {FFCV_INSTALL_HINT}") from None
    except OSError as exc:  # a native library (libturbojpeg, OpenCV) missing or broken
        raise UserError(f"ffcv does not load ({exc}); {FFCV_INSTALL_HINT}") from None
    finally:
        torch.set_num_threads(threads)
    return ffcv


def beton_name(split: str) -> str:
    """File name of a split's FFCV file: ``f"{split}.beton"``."""
    return f"{split}.beton"


# --------------------------------------------------------------------------- writing


def _image_entry(rec: Record, where: str) -> tuple[int, int, int, np.ndarray]:
    """``(mode, height, width, bytes)`` of a record's image as it goes into the file."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(rec.image)) as im:
            mode, (w, h) = im.mode, im.size
            if rec.ext == "jpg" and mode in ("RGB", "L"):
                # libjpeg-turbo decodes these straight to RGB (gray: R = G = B): keep the bytes.
                return _JPG, h, w, np.frombuffer(rec.image, dtype=np.uint8)
            pixels = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: not a readable image ({exc})") from None
    return _RAW, h, w, np.ascontiguousarray(pixels).reshape(-1)


def write_ffcv_split(
    out_dir: str | Path,
    split: str,
    records: Iterable[Record],
    num_samples: int,
    shard_size: int = 0,
) -> list[dict]:
    """Write ``records`` (exactly ``num_samples``, in order) as ``out_dir/{split}.beton``.

    The ``SplitWriter`` of ``prepare --format ffcv`` (``shard_size`` is ignored: one file per
    split). Returns the manifest's shard entries: ``[]`` for an empty split (no file), else
    ``[{"name": "{split}.beton", "num_samples", "sha256"}]``. Deterministic: equal records give
    equal bytes.
    """
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    it = iter(records)
    if num_samples == 0:
        if next(it, None) is not None:
            raise AssertionError(f"{split}: records for an empty split")
        return []
    first = next(it)
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField(), "index": IntField()}
    if first.group is not None:
        fields["group"] = IntField()
    name = beton_name(split)
    path = Path(out_dir) / name
    writer = DatasetWriter(str(path), fields, page_size=PAGE_SIZE, num_workers=1)
    writer.num_samples = num_samples
    writer.prepare()  # header, field descriptors, zeroed metadata table (shared memory)
    try:
        allocator = MemoryAllocator(str(path), writer.data_region_start, PAGE_SIZE)
        allocator.__enter__()  # opens the file for appending pages
        try:
            _fill(writer, allocator, split, _chain(first, it), num_samples)
        finally:
            allocator.__exit__(None, None, None)  # writes the last page, closes the file
        writer.finalize(allocator.allocations)  # metadata table, allocation table, header
    finally:
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()
    return [{"name": name, "num_samples": num_samples, "sha256": sha256_file(path)}]


def _fill(writer, allocator, split: str, records: Iterator[Record], num_samples: int) -> None:
    """Write each record's image into pages and its fields into the metadata table.

    A function of its own so that its numpy views of the shared metadata block are gone when it
    returns (the block cannot be closed while views exist).
    """
    metadata = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type)
    columns = metadata.dtype.names  # "f0", "f1", ... in field order
    image = metadata[columns[0]]
    count = 0
    for i, rec in enumerate(records):
        if i >= num_samples:
            raise AssertionError(f"{split}: more records than num_samples={num_samples}")
        if rec.index != i:
            raise AssertionError(f"{split}: record {rec.index} arrived at position {i}")
        where = f"{split} sample {i}"
        mode, h, w, data = _image_entry(rec, where)
        if data.nbytes > PAGE_SIZE or max(h, w) > 65535:
            raise UserError(
                f"{where}: image of {h}x{w} ({data.nbytes} bytes) does not fit an FFCV page of "
                f"{PAGE_SIZE} bytes; use --format wds for such images"
            )
        # Moving to a fresh page when this one is full cannot fail here: the image is the
        # sample's only allocation (the other fields live in the metadata table).
        allocator.set_current_sample(i)
        ptr, storage = allocator.malloc(data.nbytes)
        storage[:] = data
        image["mode"][i], image["height"][i], image["width"][i] = mode, h, w
        image["data_ptr"][i] = ptr
        metadata[columns[1]][i] = rec.label
        metadata[columns[2]][i] = rec.index
        if len(columns) > 3:
            if rec.group is None:
                raise AssertionError(f"{where}: no group, but the first sample has one")
            metadata[columns[3]][i] = rec.group
        count += 1
    if count != num_samples:
        raise AssertionError(f"{split}: {count} records, num_samples={num_samples}")


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


# --------------------------------------------------------------------------- verify


def scan_beton(path: str | Path, split: str, num_classes: int, num_groups: int | None):
    """Check a ``.beton`` sample by sample (no image decoding), for ``verify_shards``.

    Returns a :class:`abdist.data.shards.ShardScan`. Raises ``UserError`` when ffcv is not
    installed and ``ValueError`` when the file's header or tables cannot be read.
    """

    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    path = Path(path)
    try:
        reader = Reader(str(path))
    except Exception as exc:  # numpy/ffcv raise many types for a corrupt header
        raise ValueError(f"not a readable .beton ({type(exc).__name__}: {exc})") from None
    want = [*FIELDS, "group"] if num_groups else list(FIELDS)
    types = [RGBImageField, IntField, IntField, IntField][: len(want)]
    got = [(n, type(h)) for n, h in reader.handlers.items()]
    if got != list(zip(want, types)):
        names = ", ".join(f"{n}:{t.__name__}" for n, t in got)
        raise ValueError(f"fields are [{names}], expected {want}")
    n = int(reader.num_samples)
    meta = reader.metadata
    cols = meta.dtype.names
    image, labels, index = meta[cols[0]], meta[cols[1]], meta[cols[2]]
    bad: dict[int, list[str]] = {}

    def flag(mask: np.ndarray, text: str) -> None:
        for i in np.flatnonzero(mask)[: MAX_SAMPLE_PROBLEMS + 1].tolist():
            bad.setdefault(i, []).append(text)

    flag(
        (labels < 0) | (labels >= num_classes), f"label is not a class index in [0, {num_classes})"
    )
    flag(index != np.arange(n), "index does not match its position")
    cc = np.bincount(labels[(labels >= 0) & (labels < num_classes)], minlength=num_classes)
    gcc = None
    if num_groups:
        groups = meta[cols[3]]
        ok_g = (groups >= 0) & (groups < num_groups)
        flag(~ok_g, f"group is not a group index in [0, {num_groups})")
        ok = ok_g & (labels >= 0) & (labels < num_classes)
        gcc = np.zeros((num_groups, num_classes), dtype=np.int64)
        np.add.at(gcc, (groups[ok], labels[ok]), 1)
    # Every sample: exactly one data region, inside the file, of the size its mode implies.
    table = reader.alloc_table
    size = path.stat().st_size
    sid = table["sample_id"].astype(np.int64)
    valid = (sid >= 0) & (sid < n)
    per_sample = np.bincount(sid[valid], minlength=n)
    flag(per_sample != 1, "not exactly one data region")
    one = np.zeros(sid.shape, dtype=bool)
    one[valid] = per_sample[sid[valid]] == 1
    region = np.zeros(n, dtype=np.int64)
    ptr = np.zeros(n, dtype=np.uint64)
    region[sid[one]] = table["size"][one].astype(np.int64)
    ptr[sid[one]] = table["ptr"][one]
    flag(image["data_ptr"] != ptr, "image pointer does not match the allocation table")
    flag(ptr.astype(np.int64) + region > size, "data region beyond the end of the file")
    mode = image["mode"]
    flag((mode != _JPG) & (mode != _RAW), "unknown image mode")
    h, w = image["height"].astype(np.int64), image["width"].astype(np.int64)
    flag((h == 0) | (w == 0), "empty image")
    flag((mode == _RAW) & (region != h * w * 3), "raw image size does not match its height/width")
    problems = [f"sample {split}-{i:08d}: {'; '.join(texts)}" for i, texts in sorted(bad.items())]
    return ShardScan(n, cc.astype(np.int64), gcc, index.astype(np.int64).tolist(), problems)


# --------------------------------------------------------------------------- reading


class FFCVSplit:
    """One split of an FFCV-format directory, served per rank (see the module docstring).

    Args:
        root: the prepared directory (``manifest.json`` + ``{split}.beton``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        rank, world_size: this process's place; default to ``torch.distributed``'s if it is
            initialised, else 0 and 1.
        num_workers: FFCV decoding threads (None: this process's CPUs).
        augment: ``augment(x, y, generator) -> x`` on float ``[B, C, H, W]`` in [0, 1] for
            training passes, typically a ``ClassAwareAugment``.
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
        augment: Callable[[Tensor, Tensor, torch.Generator], Tensor] | None = None,
        eval_transform: Callable[[Tensor], Tensor] | None = None,
        mean: list[float] | float | None = None,
        std: list[float] | float | None = None,
        image_size: int | None = None,
        os_cache: bool = True,
        batches_ahead: int = 3,
    ) -> None:
        root = Path(root)
        manifest = read_manifest(root)
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
        self.rank, self.world_size = resolve_rank(rank, world_size)
        if num_workers is None:
            num_workers = _cpu_count()
        for name, value, low in (
            ("num_workers", num_workers, 1),
            ("batches_ahead", batches_ahead, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
        channels, size, num_classes, mean, std = image_settings(
            root, manifest, image_size=image_size, mean=mean, std=std, augment=augment
        )

        self.root, self.split, self.manifest = root, split, manifest
        self.num_workers, self.os_cache, self.batches_ahead = num_workers, os_cache, batches_ahead
        self._augment, self.eval_transform = augment, eval_transform
        self._channels, self._size = channels, int(size)
        self._mean, self._std = mean, std
        self._num_classes = num_classes
        self._n = int(info["num_samples"])
        self._path = None
        self._labels = torch.zeros(0, dtype=torch.int64)
        self._num_groups = len(manifest["group_names"]) if manifest.get("group_names") else None
        self._groups = torch.zeros(0, dtype=torch.int64)  # group of each sample id
        self._loaders: dict[tuple, Any] = {}
        self._fixed = True
        if entries:
            require_ffcv()
            from ffcv.reader import Reader

            self._path = root / entries[0]["name"]
            if not self._path.is_file():
                raise UserError(f"{self._path} listed in the manifest is missing")
            try:
                reader = Reader(str(self._path))
            except Exception as exc:
                raise UserError(
                    f"{self._path}: not a readable .beton ({exc}); check it with abdist verify"
                ) from None
            if int(reader.num_samples) != self._n or list(reader.handlers)[:3] != list(FIELDS):
                raise UserError(
                    f"{self._path}: {reader.num_samples} samples with fields "
                    f"{list(reader.handlers)}, the manifest says {self._n} with {list(FIELDS)}; "
                    "check it with abdist verify"
                )
            cols = reader.metadata.dtype.names
            self._labels = torch.from_numpy(reader.metadata[cols[1]].astype(np.int64))
            if self._num_groups is not None:  # looked up by the samples' index field
                index = reader.metadata[cols[2]].astype(np.int64)
                by_index = np.zeros(int(index.max()) + 1 if len(index) else 0, dtype=np.int64)
                by_index[index] = reader.metadata[cols[3]]
                self._groups = torch.from_numpy(by_index)
            heights, widths = reader.metadata[cols[0]]["height"], reader.metadata[cols[0]]["width"]
            self._fixed = bool((heights == self._size).all() and (widths == self._size).all())
        elif self._n:
            raise UserError(f"{root}: split '{split}' has {self._n} samples but no .beton file")

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
    def augment(self):
        """The training augmentation (e.g. a ``ClassAwareAugment``) or None."""
        return self._augment

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
    ) -> Iterator[tuple[Tensor, ...]]:
        """Yield ``(x, y)`` for one pass on this rank, then ``idx`` (the sample ids) with
        ``with_ids`` and ``g`` (the group ids; prepared with ``--groups``) with ``with_groups``,
        in ``ShardSplit.batches``' order.

        ``shuffle=True``: a training epoch of exactly :meth:`num_batches` full batches of
        ``batch_size / world_size`` samples (``batch_size`` is the GLOBAL batch), ordered and
        augmented from one seed drawn from ``generator`` (torch's global RNG if None).
        ``shuffle=False``: an evaluation pass, each sample exactly once across ranks, in batches
        of ``batch_size``. ``augment(x, generator, y)`` is the ``TensorSplit`` hook, run here on
        the normalised batch (the constructor's ``augment`` is the class-aware one, before
        normalisation). ``rank`` / ``world_size`` serve another place than the split's own for
        this pass; ``max_batches`` stops after that many batches.
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
        loader, op = self._loader(shuffle, batch_size, len(order))
        loader.traversal_order.order = order.astype(np.int64)
        aug_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])
        last = n_batches - 1  # the batch that may hold padding
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        op.start_pass(aug_seed >> 1)
        threads = torch.get_num_threads()
        it = iter(loader)
        try:
            for k in range(n_batches):
                x, y, idx = next(it)
                if k == 0:  # FFCV's thread has set torch's thread count by now: restore it
                    torch.set_num_threads(threads)
                y, idx = y.reshape(-1).clone(), idx.reshape(-1).clone()
                if k == last and keep_last < batch_size:
                    x, y, idx = x[:keep_last], y[:keep_last], idx[:keep_last]
                if augment is not None:
                    x = augment(x, generator, y)
                extra = [idx] if with_ids else []
                if with_groups:  # the group column of the file's metadata, by sample id
                    extra.append(self._groups[idx])
                yield (x, y, *extra)
        finally:
            it.close()
            # An abandoned pass: let FFCV's thread stop (it checks every 0.5 s) before a next
            # pass resets the augmentation generator it may still be drawing from.
            it.join(timeout=5)
            torch.set_num_threads(threads)

    def _loader(self, train: bool, batch_size: int, length: int):
        """The FFCV Loader for passes of this kind (one per kind: each compiles its pipeline)."""
        key = (train, batch_size, length)
        if key in self._loaders:
            return self._loaders[key]
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import ToTensor

        if self._fixed:
            decoder = SimpleRGBImageDecoder()
        else:
            decoder = CenterCropRGBImageDecoder((self._size, self._size), ratio=1.0)
        op = _BatchFinish(
            labels=self._labels,
            channels=self._channels,
            mean=self._mean,
            std=self._std,
            transform=self._augment if train else self.eval_transform,
            train=train,
        )
        pipelines = {
            "image": [decoder, ToTensor(), op],
            "label": [IntDecoder(), ToTensor()],
            "index": [IntDecoder(), ToTensor()],
            "group": None,  # not served (the TensorSplit surface has no groups)
        }
        threads = torch.get_num_threads()
        try:
            loader = Loader(
                str(self._path),
                batch_size=batch_size,
                num_workers=self.num_workers,
                os_cache=self.os_cache,
                order=_make_order(np.zeros(length, dtype=np.int64)),
                distributed=False,
                seed=0,
                pipelines=pipelines,
                drop_last=True,
                batches_ahead=self.batches_ahead,
            )
        finally:
            torch.set_num_threads(threads)
        self._loaders[key] = (loader, op)
        return loader, op

    def __repr__(self) -> str:
        return (
            f"FFCVSplit({str(self.root)!r}, {self.split!r}, rank={self.rank}, "
            f"world_size={self.world_size}, num_workers={self.num_workers}, samples={len(self)})"
        )


def _make_order(initial: np.ndarray):
    """A TraversalOrder *instance* returning whatever ``.order`` holds (set before each pass).

    FFCV's Loader accepts an instance and calls it with itself (``order(loader)``).
    """
    from ffcv.traversal_order.base import TraversalOrder

    class GivenOrder(TraversalOrder):
        def __init__(self, order: np.ndarray) -> None:  # no loader yet
            self.order = order

        def __call__(self, loader) -> GivenOrder:
            self.loader = loader
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return self.order

    return GivenOrder(initial)


@functools.cache
def _batch_finish_class():
    from dataclasses import replace

    from ffcv.pipeline.operation import Operation

    class BatchFinish(Operation):
        """uint8 ``[B, H, W, 3]`` -> augmented/transformed, normalised float ``[B, C, H, W]``.

        A non-JIT FFCV operation run in FFCV's loader thread; it receives the batch's sample
        ids, so it can look the labels up for class-aware augmentation.
        """

        def __init__(self, labels, channels, mean, std, transform, train) -> None:
            super().__init__()
            self.labels, self.channels = labels, channels
            self.mean = torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1)
            self.std = torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1)
            self.transform, self.train = transform, train
            self.generator = torch.Generator()

        def start_pass(self, seed: int) -> None:
            self.generator = torch.Generator().manual_seed(seed)

        def generate_code(self) -> Callable:
            per_thread = _omp_threads_are_per_thread()

            def finish(inp: Tensor, _dst, batch_indices) -> Tensor:
                # Small-tensor ops run best on one thread (as in DataLoader workers): several
                # OpenMP threads per op, beside FFCV's decode threads, cost 10x the CPU on 2
                # cores. With OpenMP the setting is per thread: the training thread keeps its own.
                if per_thread and torch.get_num_threads() != 1:
                    torch.set_num_threads(1)
                ids = torch.from_numpy(np.asarray(batch_indices, dtype=np.int64))
                x = inp.permute(0, 3, 1, 2)[:, : self.channels].contiguous()
                x = x.float().div_(255)
                if self.transform is not None:
                    if self.train:
                        x = self.transform(x, self.labels[ids], self.generator)
                    else:
                        x = self.transform(x)
                return x.sub(self.mean).div_(self.std).contiguous()

            finish.with_indices = True
            return finish

        def declare_state_and_memory(self, previous_state):
            h, w, _ = previous_state.shape
            state = replace(
                previous_state, jit_mode=False, shape=(self.channels, h, w), dtype=torch.float32
            )
            return state, None

    return BatchFinish


def _BatchFinish(**kwargs):
    return _batch_finish_class()(**kwargs)


# --------------------------------------------------------------------------- small helpers


@functools.cache
def _omp_threads_are_per_thread() -> bool:
    """True if torch's intra-op pool is OpenMP (``set_num_threads`` then only sets the calling
    thread's count); with another backend it is process-wide and must be left alone."""
    return "OpenMP" in torch.__config__.parallel_info()


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
