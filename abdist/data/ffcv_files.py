"""FFCV files: ``abdist prepare --format ffcv`` writes them, ``abdist verify`` checks them.

Needs the ``ffcv`` extra (``ffcv==1.0.2``, built from source against Debian's ``pkg-config``,
``libopencv-dev`` and ``libturbojpeg0-dev``; ``docker/install.sh`` installs all of it with
``ABDIST_WITH_FFCV=1``). Nothing here imports ffcv until it is used, and a missing ffcv is one
:class:`~abdist.errors.UserError` line saying how to install it. The reader is
:class:`abdist.data.ffcv_backend.FFCVSplit`.

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
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from abdist.data.manifest import sha256_file
from abdist.data.records import MAX_SAMPLE_PROBLEMS, Record, ShardScan
from abdist.errors import UserError

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
        try:
            writer.metadata_sm.close()
        except BufferError:
            # Only on the way out of an error: its traceback still holds _fill's numpy views of
            # the block, and a failed close must not hide that error (the mapping goes with the
            # process; the name is removed below).
            pass
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


def scan_beton(path: str | Path, split: str, num_classes: int, num_groups: int | None):
    """Check a ``.beton`` sample by sample (no image decoding), for ``verify_shards``.

    Returns a :class:`abdist.data.records.ShardScan`. Raises ``UserError`` when ffcv is not
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
