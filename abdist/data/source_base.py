"""The raw-source types every reader returns (:class:`Source`, :class:`SourceSplit`) and the
encoding of one image into the bytes a shard stores (:func:`encode_image`); the readers are in
abdist/data/source_arrays.py and abdist/data/source_files.py, the dispatch in
abdist/data/sources.py."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from abdist.errors import UserError

SPLITS = ("train", "val", "test")
# Files with these suffixes are images; anything else in a tree (README, .DS_Store) is ignored.
# JPEG and PNG are stored as they are; the others are decoded and stored as lossless PNG.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp"}
)
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# PIL modes without colour: the manifest reports 1 channel only if every image is one of these.
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})

Payload = bytes | np.ndarray


@dataclass
class SourceSplit:
    """One split of a raw source: labels up front, images read on demand by index."""

    labels: np.ndarray  # int64 [N], class indices into Source.class_names
    keys: list[str]  # per-sample name that a --groups CSV may refer to
    read: Callable[[int], Payload]
    alt_keys: list[str] | None = None  # a second accepted name (an image id, a file name)
    groups: list[str] | None = None  # group attribute given by the source itself (list files)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = self.labels.shape[0]
        assert len(self.keys) == n, "one key per sample"
        assert self.alt_keys is None or len(self.alt_keys) == n
        assert self.groups is None or len(self.groups) == n

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Source:
    """A raw dataset: class names and its splits (some of ``train``, ``val``, ``test``, ``all``).

    Use as a context manager (or call :meth:`close`): tar-backed sources keep a file open.
    """

    kind: str
    path: str
    class_names: list[str]
    splits: dict[str, SourceSplit]
    # List files only: where each label first appears ("FILE:LINE"), so that a message about a
    # class can point at the line that created it (classes are counted as largest label + 1).
    label_sites: dict[int, str] = field(default_factory=dict)
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def close(self) -> None:
        """Release open files."""
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- image encoding


@dataclass(frozen=True)
class EncodedImage:
    """Image bytes as they go into a shard, with the facts the manifest records."""

    ext: str  # "jpg" or "png": the shard field name
    data: bytes
    channels: int  # 1 (grayscale) or 3 (anything with colour; the loader converts to RGB)
    size: tuple[int, int]  # (height, width)


def encode_image(payload: Payload, where: str = "image") -> EncodedImage:
    """Shard-ready bytes for one image: JPEG/PNG bytes unchanged, anything else as lossless PNG.

    The format is told by the bytes' signature, not the file name (ImageNet has PNGs named .JPEG),
    so the shard field always matches the content. Arrays must be ``uint8`` ``H×W``, ``H×W×1`` or
    ``H×W×3``. Raises ``UserError`` naming ``where`` if the image cannot be read.
    """
    from PIL import Image

    if isinstance(payload, np.ndarray):
        arr = payload
        if arr.dtype != np.uint8 or not (
            arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3))
        ):
            raise UserError(
                f"{where}: expected a uint8 H×W or H×W×3 array, got {arr.dtype} {arr.shape}"
            )
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        img = Image.fromarray(np.ascontiguousarray(arr), "L" if arr.ndim == 2 else "RGB")
        return EncodedImage("png", _png_bytes(img), 1 if arr.ndim == 2 else 3, arr.shape[:2])

    data = bytes(payload)
    try:
        img = Image.open(io.BytesIO(data))  # lazy: reads the header only
        mode, (w, h) = img.mode, img.size
        if data.startswith(_JPEG_MAGIC):
            ext = "jpg"
        elif data.startswith(_PNG_MAGIC):
            ext = "png"
        else:
            # BMP, GIF, TIFF, WebP ...: decode once and store losslessly as PNG.
            img = img.convert("L" if mode in _GRAY_MODES else "RGB")
            mode, data, ext = img.mode, _png_bytes(img), "png"
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{where}: not a readable image ({exc})") from None
    return EncodedImage(ext, data, 1 if mode in _GRAY_MODES else 3, (h, w))


def check_decodes(data: bytes, where: str, hint: str = "") -> None:
    """Decode ``data`` in full (not only its header, as :func:`encode_image` does); raise the
    one-line ``UserError`` naming ``where`` (and ``hint``) if its pixels do not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        tail = f"; {hint}" if hint else ""
        raise UserError(f"{where}: not a readable image ({exc}){tail}") from None


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    # PIL writes no timestamp into PNGs, so equal pixels give equal bytes (deterministic shards).
    img.save(buf, format="PNG")
    return buf.getvalue()
