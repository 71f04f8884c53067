"""WebDataset shards: the sample format, the writer, the manifest and ``verify``.

A prepared directory holds ``{split}-{shard:06d}.tar`` files and ``manifest.json``. Each sample
in a shard is a group of tar members sharing the key ``{split}-{i:08d}`` (``i`` = 0..N-1 within
the split, in a seeded shuffled order so every shard mixes classes):

- ``<key>.jpg`` or ``<key>.png``: the encoded image (JPEGs exactly as the source stored them);
- ``<key>.cls``: the class index, ASCII decimal;
- ``<key>.idx``: ``i``, ASCII decimal (a stable sample id for de-duplicated evaluation);
- ``<key>.grp``: the group index, ASCII decimal, only when the dataset has groups.

The manifest (format ``"abdist-shards/1"``) lists every shard with its sample count and sha256,
plus per-split ``class_counts`` and ``group_class_counts`` (indexed ``[group][class]``).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from abdist.data.manifest import read_manifest, sha256_file
from abdist.data.records import MAX_SAMPLE_PROBLEMS, Record, ShardScan
from abdist.data.tar_reader import TarError, shard_samples
from abdist.errors import UserError

IMAGE_FIELDS = ("jpg", "png")
# Fixed tar member metadata: with the wall clock as mtime two identical prepares would differ.
# (TarWriter already fixes uid/gid 0, user/group names and mode; we pass them explicitly anyway.)
SHARD_MTIME = 946684800  # 2000-01-01T00:00:00Z
_TAR_META = {"mtime": SHARD_MTIME, "mode": 0o444, "user": "abdist", "group": "abdist"}


def sample_key(split: str, index: int) -> str:
    """The ``__key__`` of sample ``index`` of ``split``: ``f"{split}-{index:08d}"``."""
    return f"{split}-{index:08d}"


def shard_name(split: str, shard: int) -> str:
    """File name of shard number ``shard`` of ``split``: ``f"{split}-{shard:06d}.tar"``."""
    return f"{split}-{shard:06d}.tar"


def shard_sizes(num_samples: int, shard_size: int) -> list[int]:
    """Samples per shard: as few shards of at most ``shard_size`` as possible, sizes within 1.

    Even sizes (rather than full shards plus a short last one) keep ranks and workers that read
    whole shards close to equal work.
    """
    if num_samples == 0:
        return []
    n = math.ceil(num_samples / shard_size)
    return [num_samples // n + (j < num_samples % n) for j in range(n)]


def write_wds_split(
    out_dir: str | Path, split: str, records: Iterable[Record], num_samples: int, shard_size: int
) -> list[dict]:
    """Write ``records`` (exactly ``num_samples``, in order) as WebDataset shards of ``split``.

    Returns the manifest's shard entries ``[{"name", "num_samples", "sha256"}]``. Output bytes
    depend only on the records: member metadata is fixed, so equal inputs give equal sha256.
    """
    from webdataset import TarWriter

    out_dir = Path(out_dir)
    it = iter(records)
    shards = []
    for j, n in enumerate(shard_sizes(num_samples, shard_size)):
        name = shard_name(split, j)
        with open(out_dir / name, "wb") as f:
            # encoder=False: every field is already bytes; the default encoder would re-encode
            # arrays and guess from extensions.
            with TarWriter(f, encoder=False, **_TAR_META) as tw:
                for _ in range(n):
                    rec = next(it)
                    sample = {
                        "__key__": sample_key(split, rec.index),
                        rec.ext: rec.image,
                        "cls": str(rec.label).encode("ascii"),
                        "idx": str(rec.index).encode("ascii"),
                    }
                    if rec.group is not None:
                        sample["grp"] = str(rec.group).encode("ascii")
                    tw.write(sample)
            f.flush()
            os.fsync(f.fileno())  # the directory is renamed into place as "complete" later
        shards.append({"name": name, "num_samples": n, "sha256": sha256_file(out_dir / name)})
    if next(it, None) is not None:
        raise AssertionError(f"{split}: more records than num_samples={num_samples}")
    return shards


# --------------------------------------------------------------------------- manifest


# --------------------------------------------------------------------------- checks on load


# --------------------------------------------------------------------------- verify


def _scan_shard(path: Path, split: str, num_classes: int, num_groups: int | None) -> ShardScan:
    """Read a shard's members (images are skipped, not decoded) and check each sample."""
    cc = np.zeros(num_classes, dtype=np.int64)
    gcc = np.zeros((num_groups, num_classes), dtype=np.int64) if num_groups else None
    indices: list[int] = []
    problems: list[str] = []
    n = 0

    def finish(key: str, fields: dict[str, bytes | None]) -> None:
        nonlocal n
        n += 1
        bad = []
        images = [f for f in fields if f in IMAGE_FIELDS]
        if len(images) != 1:
            bad.append(f"{len(images)} image fields (expected one of jpg, png)")
        m = re.fullmatch(rf"{re.escape(split)}-(\d{{8}})", key)
        idx = _int_field(fields, "idx")
        if m is None:
            bad.append(f"key is not {split}-NNNNNNNN")
        if idx is None:
            bad.append("missing or non-numeric idx")
        else:
            indices.append(idx)
            if m is not None and int(m.group(1)) != idx:
                bad.append(f"idx {idx} does not match the key")
        cls = _int_field(fields, "cls")
        if cls is None or not 0 <= cls < num_classes:
            bad.append(f"cls {fields.get('cls')!r} is not a class index in [0, {num_classes})")
            cls = None
        else:
            cc[cls] += 1
        if num_groups:
            grp = _int_field(fields, "grp")
            if grp is None or not 0 <= grp < num_groups:
                bad.append(f"grp {fields.get('grp')!r} is not a group index in [0, {num_groups})")
            elif cls is not None:
                gcc[grp, cls] += 1
        elif "grp" in fields:
            bad.append("has grp but the manifest has no groups")
        if bad:
            problems.append(f"sample {key}: {'; '.join(bad)}")

    # The loaders' own reader, so verify groups members into samples exactly as training does.
    for _, key, fields in shard_samples(str(path), 0, sys.maxsize):
        finish(key, fields)
    return ShardScan(n, cc, gcc, indices, problems)


def _int_field(fields: dict, name: str) -> int | None:
    raw = fields.get(name)
    if raw is None:
        return None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return int(text) if text.isdigit() else None


def verify_shards(directory: str | Path) -> list[str]:
    """Check every shard in ``directory`` against its manifest; returns the problems (empty = ok).

    Recomputes each shard's sha256, counts its samples and per-class (and per-group) samples
    from the ``cls``/``grp`` fields, checks keys/``idx`` cover 0..N-1 once per split, and flags
    ``.tar`` files the manifest does not list. Raises ``UserError`` for a missing or invalid
    manifest (see :func:`read_manifest`).
    """
    directory = Path(directory)
    m = read_manifest(directory)
    names = m["class_names"]
    num_classes = len(names)
    num_groups = len(m["group_names"]) if m.get("group_names") else None
    problems: list[str] = []
    listed = set()
    for split, info in m["splits"].items():
        cc = np.zeros(num_classes, dtype=np.int64)
        gcc = np.zeros((num_groups, num_classes), dtype=np.int64) if num_groups else None
        seen: list[int] = []
        complete = True  # split totals are only comparable if every shard could be read
        for shard in info["shards"]:
            name, want = shard["name"], shard["num_samples"]
            listed.add(name)
            path = directory / name
            if not path.is_file():
                problems.append(f"{name}: missing (manifest lists {want} samples)")
                complete = False
                continue
            digest = sha256_file(path)
            if digest != shard["sha256"]:
                problems.append(
                    f"{name}: sha256 mismatch: expected {shard['sha256'][:16]}..., "
                    f"found {digest[:16]}... (file changed or corrupt)"
                )
            try:
                if name.endswith(".beton"):  # --format ffcv: one FFCV file per split
                    from abdist.data.ffcv_files import scan_beton

                    scan = scan_beton(path, split, num_classes, num_groups)
                else:
                    scan = _scan_shard(path, split, num_classes, num_groups)
            except (TarError, OSError, ValueError) as exc:
                kind = ".beton" if name.endswith(".beton") else "tar"
                problems.append(f"{name}: unreadable {kind} ({exc})")
                complete = False
                continue
            except UserError as exc:  # ffcv not installed: the sha256 was checked, no more
                problems.append(f"{name}: samples not checked: {exc}")
                complete = False
                continue
            if scan.num_samples != want:
                problems.append(f"{name}: {want} samples expected, {scan.num_samples} found")
                complete = False  # split-level counts would only repeat this problem
            for p in scan.problems[:MAX_SAMPLE_PROBLEMS]:
                problems.append(f"{name}: {p}")
            if len(scan.problems) > MAX_SAMPLE_PROBLEMS:
                more = len(scan.problems) - MAX_SAMPLE_PROBLEMS
                problems.append(f"{name}: ... and {more} more bad samples")
            cc += scan.class_counts
            if gcc is not None:
                gcc += scan.group_class_counts
            seen += scan.indices
        listed_total = sum(s["num_samples"] for s in info["shards"])
        if listed_total != info["num_samples"]:
            problems.append(
                f"{split}: manifest says {info['num_samples']} samples but its shards list "
                f"{listed_total}"
            )
        if not complete:
            continue
        for c, (want, got) in enumerate(zip(info["class_counts"], cc.tolist())):
            if want != got:
                problems.append(
                    f"{split}: class {c} ({names[c]!r}): {want} samples expected, {got} found"
                )
        if gcc is not None and info.get("group_class_counts") is not None:
            if np.asarray(info["group_class_counts"]).tolist() != gcc.tolist():
                problems.append(f"{split}: group_class_counts differ from the grp fields")
        if sorted(seen) != list(range(len(seen))) or len(seen) != info["num_samples"]:
            problems.append(
                f"{split}: sample idx values are not 0..{info['num_samples'] - 1} exactly once"
            )
    for path in sorted([*directory.glob("*.tar"), *directory.glob("*.beton")]):
        if path.name not in listed:
            problems.append(f"{path.name}: shard file not listed in the manifest")
    return problems
