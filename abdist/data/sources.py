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

import tarfile
from pathlib import Path

from abdist.data.source_arrays import find_cifar, read_cifar, read_digits
from abdist.data.source_base import (
    SPLITS,
    EncodedImage,
    Source,
    SourceSplit,
    check_decodes,
    encode_image,
)
from abdist.data.source_files import read_image_folder, read_image_tar, read_inat, read_list_files
from abdist.errors import UserError

__all__ = [
    "SPLITS",
    "EncodedImage",
    "Source",
    "SourceSplit",
    "check_decodes",
    "encode_image",
    "open_source",
]


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
    cifar = find_cifar(path)
    if cifar is not None:
        kind, folder = cifar
        return read_cifar(folder, kind)
    return read_image_folder(path)
