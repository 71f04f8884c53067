"""Readers of sources whose pixels exist only decoded: the CIFAR-10/100 python pickles and
sklearn's digits (see abdist/data/sources.py for the formats)."""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np

from abdist.data.source_base import Source, SourceSplit
from abdist.errors import UserError

# --------------------------------------------------------------------------- CIFAR


def find_cifar(path: Path) -> tuple[str, Path] | None:
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
    from abdist.data.digits import IMAGE_SIZE, load_raw

    raw, labels = load_raw()
    pixels = (raw.reshape(-1, IMAGE_SIZE, IMAGE_SIZE) * 15).round().astype(np.uint8)
    keys = [str(i) for i in range(len(labels))]
    split = SourceSplit(labels, keys, _array_reader(pixels))
    return Source(
        "digits", "sklearn.datasets.load_digits", [str(c) for c in range(10)], {"all": split}
    )
