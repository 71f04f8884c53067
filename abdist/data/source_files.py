"""Readers of sources stored as image files: image-folder trees and tars of them, list files
(ImageNet-LT style) and iNaturalist JSON (see abdist/data/sources.py for the formats)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from abdist.data.source_base import IMAGE_SUFFIXES, SPLITS, Source, SourceSplit
from abdist.errors import UserError

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
