"""Readers for raw image datasets: one small reader per on-disk format.

Every reader returns a :class:`Source`: the class names plus, per split, the labels and a
``read(i)`` for sample ``i``'s image. Labels come first and images are read on demand, so the
long-tail subsampling in :mod:`abdist.data.prepare` can choose its samples before a single image
is read (a long-tailed ImageNet keeps ~10 % of the files). ``read`` returns either the encoded
bytes exactly as stored (JPEG and PNG are kept byte for byte) or a ``uint8`` array for pixels that
only exist decoded (CIFAR pickles, sklearn digits); :func:`encode_image` turns either into the
bytes that go into a shard.

Formats (see :func:`open_source`):

- ``cifar10`` / ``cifar100``: the python pickles torchvision downloads
  (``cifar-10-batches-py/``, ``cifar-100-python/``; CIFAR-100 uses the fine labels);
- ``folder``: ``<root>/<split>/<class>/<file>`` or a ``.tar``/``.tar.gz`` of such a tree;
- ``list``: ImageNet-LT-style list files, ``path label [group]`` per line, paths under a root;
- ``inat``: iNaturalist-2018-style JSON (``images``, ``annotations``, ``categories``) per split;
- ``digits``: sklearn's bundled 8×8 digits (one ``"all"`` split; prepare splits it).

Each sample also has a ``key`` (and for some formats an ``alt_key``) naming it for ``--groups``:
CIFAR ``"train/123"`` (position in the concatenated batches; alt: the pickle's file name),
folder the path relative to the tree root (``"train/cat/001.jpg"``), list the path as written,
iNat the ``file_name`` (alt: the image id), digits the index into sklearn's array.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import json
import lzma
import os
import pickle
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    # PIL writes no timestamp into PNGs, so equal pixels give equal bytes (deterministic shards).
    img.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- dispatch


def open_source(
    spec: str,
    *,
    lists: dict[str, str] | None = None,
    jsons: dict[str, str] | None = None,
    root: str | None = None,
    scratch: str | Path | None = None,
) -> Source:
    """Open the raw dataset ``spec`` names.

    ``spec`` is ``"digits"``; ``"list"`` (with ``lists={"train": FILE, "test": FILE, ...}`` and
    ``root``); ``"inat"`` (with ``jsons`` and ``root``); or a path: a CIFAR-10/100 directory (the
    ``cifar-*-py*`` folder or the directory holding it), an image-folder tree, or a ``.tar`` /
    ``.tar.gz`` of one. With ``lists``/``jsons`` a path ``spec`` serves as the root.
    ``scratch`` is a directory a compressed tar may be unpacked into (once, for random access).
    """
    if lists and jsons:
        raise UserError("give either --list or --json files, not both")
    if spec in ("list", "inat") or lists or jsons:
        kind = "list" if (lists or spec == "list") else "inat"
        files = lists if kind == "list" else jsons
        if spec not in ("list", "inat"):
            if root is not None and Path(root) != Path(spec):
                raise UserError(f"source {spec!r} and --root {root!r} disagree; give one root")
            root = spec
        flag = "--list" if kind == "list" else "--json"
        if not files:
            raise UserError(f"source '{kind}' needs {flag} train=FILE {flag} test=FILE")
        if root is None:
            raise UserError(f"source '{kind}' needs --root DIR (the directory image paths are in)")
        return read_list_files(files, root) if kind == "list" else read_inat(files, root)
    if spec == "digits":
        return read_digits()
    path = Path(spec)
    if not path.exists():
        raise UserError(
            f"source {spec!r} not found; expected 'digits', 'list', 'inat', a CIFAR directory, "
            "an image folder or a .tar/.tar.gz of one"
        )
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise UserError(f"source {spec!r} is a file but not a tar archive")
        return read_image_tar(path, scratch)
    cifar = _find_cifar(path)
    if cifar is not None:
        kind, folder = cifar
        return read_cifar(folder, kind)
    return read_image_folder(path)


# --------------------------------------------------------------------------- CIFAR


def _find_cifar(path: Path) -> tuple[str, Path] | None:
    def is10(p: Path) -> bool:
        return (p / "batches.meta").is_file() and (p / "test_batch").is_file()

    def is100(p: Path) -> bool:
        return all((p / f).is_file() for f in ("meta", "train", "test"))

    if is10(path):
        return "cifar10", path
    if is100(path):
        return "cifar100", path
    found = [
        (kind, path / name)
        for kind, name, test in (
            ("cifar10", "cifar-10-batches-py", is10),
            ("cifar100", "cifar-100-python", is100),
        )
        if test(path / name)
    ]
    if len(found) > 1:
        raise UserError(
            f"{path} holds both CIFAR-10 and CIFAR-100; point at {found[0][1]} or {found[1][1]}"
        )
    return found[0] if found else None


def _multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays.

    CIFAR pickles hold dicts, lists, bytes and numpy arrays; refusing every other global means a
    tampered download cannot run code when it is read.
    """

    def find_class(self, module: str, name: str):
        ma = _multiarray()
        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): ma._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): ma._reconstruct,
            ("numpy.core.multiarray", "scalar"): ma.scalar,
            ("numpy._core.multiarray", "scalar"): ma.scalar,
            ("_codecs", "encode"): codecs.encode,  # how protocol 2 stores bytes
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return allowed[(module, name)]


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: not a readable CIFAR pickle ({exc})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a CIFAR pickle (expected a dict, got {type(obj).__name__})")
    return obj


def _field(d: dict, path: Path, *names: str):
    # Pickles written by Python 2 have bytes keys, re-pickled ones may have str keys.
    for name in names:
        for k in (name.encode(), name):
            if k in d:
                return d[k]
    raise UserError(f"{path}: missing {' or '.join(names)!s} (not a CIFAR pickle?)")


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def read_cifar(folder: str | Path, kind: str) -> Source:
    """CIFAR-10 (``kind="cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels) python pickles."""
    folder = Path(folder)
    if kind == "cifar10":
        names = [
            _text(n) for n in _field(_load_pickle(folder / "batches.meta"), folder, "label_names")
        ]
        train_files = sorted(folder.glob("data_batch_*"), key=lambda p: _batch_number(p))
        if not train_files:
            raise UserError(f"{folder}: no data_batch_* files")
        files = {"train": train_files, "test": [folder / "test_batch"]}
        label_key = "labels"
    elif kind == "cifar100":
        meta = _load_pickle(folder / "meta")
        names = [_text(n) for n in _field(meta, folder / "meta", "fine_label_names", "label_names")]
        files = {"train": [folder / "train"], "test": [folder / "test"]}
        label_key = "fine_labels"
    else:
        raise ValueError(f"unknown CIFAR kind {kind!r}")

    splits = {}
    for split, paths in files.items():
        images, labels, fnames = [], [], []
        for p in paths:
            d = _load_pickle(p)
            data = np.asarray(_field(d, p, "data"), dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise UserError(f"{p}: data has shape {data.shape}, expected [N, 3072]")
            lab = np.asarray(_field(d, p, label_key), dtype=np.int64)
            if lab.shape != (data.shape[0],):
                raise UserError(f"{p}: {lab.shape[0]} labels for {data.shape[0]} images")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW rows → HWC
            labels.append(lab)
            fn = d.get(b"filenames", d.get("filenames"))
            fnames.extend(_text(f) for f in fn) if fn is not None else fnames.extend(
                [None] * len(lab)
            )
        pixels = np.concatenate(images)
        lab = np.concatenate(labels)
        if lab.size and (lab.min() < 0 or lab.max() >= len(names)):
            raise UserError(
                f"{folder}: labels span [{lab.min()}, {lab.max()}] for {len(names)} classes"
            )
        keys = [f"{split}/{i}" for i in range(len(lab))]
        alt = fnames if all(f is not None for f in fnames) else None
        splits[split] = SourceSplit(lab, keys, _array_reader(pixels), alt_keys=alt)
    return Source(kind, str(folder.resolve()), names, splits)


def _batch_number(p: Path) -> int:
    try:
        return int(p.name.rsplit("_", 1)[1])
    except ValueError:
        raise UserError(f"{p}: unexpected CIFAR batch file name") from None


def _array_reader(pixels: np.ndarray) -> Callable[[int], np.ndarray]:
    return lambda i: pixels[i]


# --------------------------------------------------------------------------- digits


def read_digits() -> Source:
    """sklearn's bundled digits as one ``"all"`` split of 8×8 grayscale ``uint8`` images.

    Pixels 0..16 are stored as ``15 * v`` (0..240): exact, invertible and linear, so a loader that
    scales to [0, 1] and standardises with train statistics gets the same inputs as
    :func:`abdist.data.digits.load_digits_lt`.
    """
    from abdist.data.digits import IMAGE_SIZE, _load_raw

    raw, labels = _load_raw()
    pixels = (raw.reshape(-1, IMAGE_SIZE, IMAGE_SIZE) * 15).round().astype(np.uint8)
    keys = [str(i) for i in range(len(labels))]
    split = SourceSplit(labels, keys, _array_reader(pixels))
    return Source(
        "digits", "sklearn.datasets.load_digits", [str(c) for c in range(10)], {"all": split}
    )


# --------------------------------------------------------------------------- image folders


def _is_hidden(parts: list[str]) -> bool:
    # Dot files and macOS resource forks (__MACOSX/, ._name) are never images of the dataset.
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _tree_layout(
    rel_paths: list[str], where: str, class_dirs: list[str] = ()
) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
    """Class names and ``{split: [(rel_path, class_name)]}`` of a ``split/class/file`` tree.

    Every ``<split>/<class>`` folder names a class, also one without images (``class_dirs``, the
    tree's folders): such an empty class is then refused or kept by :mod:`abdist.data.prepare`
    instead of vanishing without a word.
    """
    by_split: dict[str, list[tuple[str, str]]] = {}
    for rel in sorted(rel_paths):  # sorted: the same tree gives the same order on any filesystem
        parts = rel.split("/")
        if _is_hidden(parts) or Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if parts[0] not in SPLITS or len(parts) < 3:
            raise UserError(
                f"{where}: unexpected image {rel!r}; expected <split>/<class>/<file> with split "
                "one of train, val, test"
            )
        by_split.setdefault(parts[0], []).append((rel, parts[1]))
    for need in ("train", "test"):
        if not by_split.get(need):
            raise UserError(
                f"{where}: no images under {need}/<class>/ (expected <split>/<class>/<file>)"
            )
    classes = {c for items in by_split.values() for _, c in items}
    for rel in class_dirs:
        parts = rel.split("/")
        if len(parts) == 2 and parts[0] in SPLITS and parts[1] and not _is_hidden(parts):
            classes.add(parts[1])
    return sorted(classes), by_split


def _tree_source(
    kind: str,
    where: str,
    rel_paths: list[str],
    reader: Callable[[str], bytes],
    class_dirs: list[str] = (),
) -> Source:
    classes, by_split = _tree_layout(rel_paths, where, class_dirs)
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, items in by_split.items():
        rels = [r for r, _ in items]
        labels = np.array([index[c] for _, c in items], dtype=np.int64)
        splits[split] = SourceSplit(labels, rels, lambda i, rels=rels: reader(rels[i]))
    return Source(kind, where, classes, splits)


def read_image_folder(root: str | Path) -> Source:
    """An image tree ``<root>/<split>/<class>/<file>``; classes are the sorted folder names."""
    root = Path(root)
    rel_paths, class_dirs = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_paths += [f if rel_dir == "." else f"{rel_dir}/{f}" for f in filenames]
        if rel_dir in SPLITS:
            class_dirs += [f"{rel_dir}/{d}" for d in dirnames]

    def read(rel: str) -> bytes:
        try:
            return (root / rel).read_bytes()
        except OSError as exc:
            raise UserError(f"{root / rel}: cannot read ({exc.strerror})") from None

    return _tree_source("folder", str(root.resolve()), rel_paths, read, class_dirs)


_DECOMPRESSORS = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


def read_image_tar(path: str | Path, scratch: str | Path | None = None) -> Source:
    """A ``.tar`` (or ``.tar.gz``/``.bz2``/``.xz``) of an image tree, read without extracting it.

    A single top-level folder around ``train/``, ``test/`` ... is allowed (``tar czf x.tgz x/``).
    Images are read by seeking to their offset; a compressed archive is first decompressed once
    into ``scratch`` because seeking backwards in a compressed stream restarts decompression.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(6)
    opener = next((op for magic, op in _DECOMPRESSORS if head.startswith(magic)), None)
    plain = path
    if opener is not None:
        if scratch is None:
            raise UserError(f"{path}: a compressed tar needs a scratch directory to unpack into")
        Path(scratch).mkdir(parents=True, exist_ok=True)
        plain = Path(scratch) / (path.name + ".tar")
        try:
            with opener(path, "rb") as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (OSError, EOFError, lzma.LZMAError) as exc:
            raise UserError(f"{path}: cannot decompress ({exc})") from None
    try:
        with tarfile.open(plain, "r:") as tf:
            members = tf.getmembers()
    except tarfile.TarError as exc:
        raise UserError(f"{path}: not a readable tar archive ({exc})") from None

    def norm(name: str) -> str:
        while name.startswith("./"):
            name = name[2:]
        return name.lstrip("/")

    entries = {norm(m.name): (m.offset_data, m.size) for m in members if m.isfile()}
    dirs = [norm(m.name).rstrip("/") for m in members if m.isdir()]
    images = [
        n
        for n in entries
        if not _is_hidden(n.split("/")) and Path(n).suffix.lower() in IMAGE_SUFFIXES
    ]
    tops = {n.split("/", 1)[0] for n in images}
    if len(tops) == 1 and all("/" in n for n in images) and next(iter(tops)) not in SPLITS:
        # One wrapping folder (`tar czf data.tgz data/`): drop it so keys read train/cat/x.jpg.
        prefix = next(iter(tops)) + "/"
        entries = {n[len(prefix) :]: v for n, v in entries.items() if n.startswith(prefix)}
        dirs = [d[len(prefix) :] for d in dirs if d.startswith(prefix)]
    fh = open(plain, "rb")  # noqa: SIM115 - closed by Source.close

    def read(rel: str) -> bytes:
        offset, size = entries[rel]
        fh.seek(offset)
        return fh.read(size)

    try:
        src = _tree_source("folder-tar", str(path.resolve()), list(entries), read, dirs)
    except BaseException:
        fh.close()
        raise
    src._closers.append(fh.close)
    return src


# --------------------------------------------------------------------------- list files


def _file_reader(root: Path) -> Callable[[str], bytes]:
    def read(rel: str) -> bytes:
        p = root / rel
        try:
            return p.read_bytes()
        except OSError as exc:
            raise UserError(f"{p}: cannot read ({exc.strerror})") from None

    return read


def _check_splits(files: dict[str, str], flag: str) -> None:
    for split in files:
        if split not in SPLITS:
            raise UserError(f"{flag} {split}=...: split must be one of {', '.join(SPLITS)}")
    for need in ("train", "test"):
        if need not in files:
            raise UserError(f"missing {flag} {need}=FILE")


def read_list_files(lists: dict[str, str], root: str | Path) -> Source:
    """ImageNet-LT-style list files: ``path label [group]`` per line, paths relative to ``root``.

    Labels are integers 0..C-1: C is the largest label in any of the files + 1 and the class names
    are the label numbers, so a label outside the intended range shows up as classes without
    training samples (a gap), which :mod:`abdist.data.prepare` refuses. An optional third column
    is a group attribute, given either on every line or on none. Blank lines and lines starting
    with ``#`` are skipped; paths may not contain spaces.
    """
    _check_splits(lists, "--list")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--root {root}: not a directory")
    read = _file_reader(root)
    parsed, sites = {}, {}
    for split, file in sorted(lists.items(), key=lambda kv: SPLITS.index(kv[0])):
        rels, labels, groups = [], [], []
        try:
            lines = Path(file).read_text().splitlines()
        except OSError as exc:
            raise UserError(f"{file}: cannot read list file ({exc.strerror})") from None
        for lineno, line in enumerate(lines, 1):
            tok = line.split()
            if not tok or tok[0].startswith("#"):
                continue
            if len(tok) not in (2, 3) or not tok[1].isdigit():
                raise UserError(f"{file}:{lineno}: expected 'path label [group]', got {line!r}")
            rels.append(tok[0])
            labels.append(int(tok[1]))
            sites.setdefault(labels[-1], f"{file}:{lineno}")
            groups.append(tok[2] if len(tok) == 3 else None)
        if not rels:
            raise UserError(f"{file}: no samples")
        has = {g is not None for g in groups}
        if len(has) > 1:
            raise UserError(f"{file}: the group column must be on every line or on none")
        parsed[split] = (rels, labels, groups if has == {True} else None)
    if len({g is None for _, _, g in parsed.values()}) > 1:
        raise UserError("list files disagree: some have a group column, some do not")
    num_classes = max(max(lab) for _, lab, _ in parsed.values()) + 1
    splits = {
        split: SourceSplit(
            np.array(labels), rels, lambda i, rels=rels: read(rels[i]), groups=groups
        )
        for split, (rels, labels, groups) in parsed.items()
    }
    names = [str(c) for c in range(num_classes)]
    return Source("list", str(root.resolve()), names, splits, label_sites=sites)


# --------------------------------------------------------------------------- iNaturalist JSON


def read_inat(jsons: dict[str, str], root: str | Path) -> Source:
    """iNaturalist-2018-style JSON per split: ``images [{id, file_name}]``,
    ``annotations [{image_id, category_id}]``, ``categories [{id, name}]``.

    Classes are all categories, ordered by id (so ids need not be contiguous). ``file_name`` is
    relative to ``root``. Every image needs an annotation: iNat's unlabelled test JSON cannot be
    used; use the labelled val JSON as ``test`` instead.
    """
    _check_splits(jsons, "--json")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--root {root}: not a directory")
    docs, categories = {}, {}
    for split, file in jsons.items():
        try:
            doc = json.loads(Path(file).read_text())
            images = doc["images"]
            annotations = doc.get("annotations", [])
            for c in doc.get("categories", []):
                name = str(c.get("name", c["id"]))
                if categories.setdefault(c["id"], name) != name:
                    raise UserError(f"{file}: category {c['id']} is named differently elsewhere")
        except OSError as exc:
            raise UserError(f"{file}: cannot read ({exc.strerror})") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{file}: not an iNaturalist-style JSON ({exc!r})") from None
        docs[split] = (file, images, annotations)
    if not categories:
        raise UserError("no 'categories' in any --json file")
    ids = sorted(categories)
    index = {cid: i for i, cid in enumerate(ids)}
    read = _file_reader(root)
    splits = {}
    for split, (file, images, annotations) in docs.items():
        try:
            label_of = {a["image_id"]: a["category_id"] for a in annotations}
            rels = [str(im["file_name"]) for im in images]
            img_ids = [im["id"] for im in images]
        except (KeyError, TypeError) as exc:
            raise UserError(f"{file}: not an iNaturalist-style JSON ({exc!r})") from None
        labels = []
        for img_id, rel in zip(img_ids, rels):
            if img_id not in label_of:
                raise UserError(f"{file}: image {img_id} ({rel}) has no annotation")
            if label_of[img_id] not in index:
                raise UserError(f"{file}: image {img_id} has unknown category {label_of[img_id]}")
            labels.append(index[label_of[img_id]])
        if not rels:
            raise UserError(f"{file}: no images")
        splits[split] = SourceSplit(
            np.array(labels, dtype=np.int64),
            rels,
            lambda i, rels=rels: read(rels[i]),
            alt_keys=[str(i) for i in img_ids],
        )
    return Source("inat", str(root.resolve()), [categories[c] for c in ids], splits)
