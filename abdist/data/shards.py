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

import hashlib
import json
import math
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from abdist.errors import UserError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "abdist-shards/1"
IMAGE_FIELDS = ("jpg", "png")
# Fixed tar member metadata: with the wall clock as mtime two identical prepares would differ.
# (TarWriter already fixes uid/gid 0, user/group names and mode; we pass them explicitly anyway.)
SHARD_MTIME = 946684800  # 2000-01-01T00:00:00Z
_TAR_META = {"mtime": SHARD_MTIME, "mode": 0o444, "user": "abdist", "group": "abdist"}
_MAX_SAMPLE_PROBLEMS = 5  # per shard: one corrupt shard should not drown the report


@dataclass(frozen=True)
class Record:
    """One sample as a shard writer receives it (backend-neutral)."""

    index: int  # position i within its split (0..N-1), also the sample id
    ext: str  # "jpg" or "png"
    image: bytes
    label: int
    group: int | None = None


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


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def read_manifest(directory: str | Path) -> dict:
    """Load and sanity-check ``directory/manifest.json``; one-line ``UserError`` if unusable."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        hint = "" if Path(directory).is_dir() else " (no such directory)"
        raise UserError(f"{path}: not found{hint}; create shards with `abdist prepare`")
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    problem = _manifest_problem(m)
    if problem:
        raise UserError(f"{path}: invalid manifest: {problem}")
    return m


def _manifest_problem(m) -> str | None:
    if not isinstance(m, dict):
        return "not a JSON object"
    if m.get("format") != MANIFEST_FORMAT:
        return f"format is {m.get('format')!r}, expected {MANIFEST_FORMAT!r}"
    names = m.get("class_names")
    if not isinstance(names, list) or m.get("num_classes") != len(names):
        return "class_names / num_classes missing or inconsistent"
    groups = m.get("group_names")
    if groups is not None and not isinstance(groups, list):
        return "group_names must be a list or null"
    splits = m.get("splits")
    if not isinstance(splits, dict) or not splits:
        return "no splits"
    for split, info in splits.items():
        try:
            shards = info["shards"]
            ok = (
                isinstance(info["num_samples"], int)
                and len(info["class_counts"]) == len(names)
                and all(
                    isinstance(s["name"], str)
                    and re.fullmatch(r"[\w.-]+", s["name"])  # a plain file name in the dir
                    and isinstance(s["num_samples"], int)
                    and isinstance(s["sha256"], str)
                    for s in shards
                )
            )
        except (KeyError, TypeError):
            ok = False
        if not ok:
            return f"split {split!r} lacks num_samples, class_counts or well-formed shards"
    return None


# --------------------------------------------------------------------------- checks on load


def require_wds_shards(root: str | Path, manifest: dict, splits: Iterable[str]) -> None:
    """One-line ``UserError`` unless ``splits`` are stored as WebDataset ``.tar`` shards.

    An FFCV directory (``abdist prepare --format ffcv``: one ``{split}.beton`` per split, and
    ``options.format == "ffcv"`` in its manifest) says so: ``abdist train`` reads WebDataset
    shards, in memory and streamed alike.
    """
    names = [e["name"] for split in splits for e in manifest["splits"][split]["shards"]]
    everything = [e["name"] for info in manifest["splits"].values() for e in info["shards"]]
    beton = [n for n in everything if n.endswith(".beton")]
    if beton or (manifest.get("options") or {}).get("format") == "ffcv":
        files = ", ".join(beton[:3]) or "no .tar shards"
        raise UserError(
            f"{root} is an FFCV directory (prepared with --format ffcv: {files}), not "
            "WebDataset tar shards, which are what `abdist train` reads: prepare the data again "
            "without --format ffcv, or read this directory in Python with "
            "abdist.data.ffcv_backend.FFCVSplit"
        )
    other = [n for n in names if not n.endswith(".tar")]
    if other:
        raise UserError(
            f"{root}: {other[0]} is not stored as WebDataset tar shards (.tar files); "
            "re-run `abdist prepare`"
        )


def damaged_shard(path: str | Path, problem: str) -> UserError:
    """The one-line error for a shard FILE that is not what the manifest says (changed bytes,
    truncated, unreadable tar, wrong sample count): the whole file is suspect, so this is never
    a skippable bad sample, whatever ``data.bad_data`` says."""
    path = Path(path)
    return UserError(
        f"shard {path} is damaged: {problem}; a damaged file is not a bad sample that "
        "data.bad_data could skip: re-run `abdist prepare` (`abdist verify "
        f"{path.parent}` lists every problem)"
    )


def missing_shard(path: str | Path) -> UserError:
    """The one-line error for a shard the manifest lists that is not on disk."""
    path = Path(path)
    return UserError(
        f"shard {path} listed in the manifest is missing: the directory is incomplete; re-run "
        f"`abdist prepare` (`abdist verify {path.parent}` lists every problem)"
    )


def read_shard_checked(path: str | Path, entry: dict) -> bytes:
    """The bytes of the shard ``entry`` (a manifest shard entry), checked against its sha256.

    For readers that read whole files anyway (the in-memory loader): hashing the bytes already
    in memory costs ~1 ms per MB, far less than decoding them.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise missing_shard(path) from None
    except IsADirectoryError:
        raise damaged_shard(path, "it is a directory, not a file") from None
    except OSError as exc:
        raise damaged_shard(path, f"it cannot be read ({exc.strerror or exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise damaged_shard(
            path,
            f"its sha256 is {digest[:16]}..., the manifest says {entry['sha256'][:16]}... "
            f"(changed, truncated or corrupt since `abdist prepare`; {len(data)} bytes)",
        )
    return data


def check_shard_file(path: str | Path, entry: dict) -> None:
    """Cheap checks of a shard before streaming it (no reading): it exists, is a file, and its
    size is a whole number of 512-byte tar blocks (a cut-off file usually is not).

    The sha256 is NOT recomputed here (a pass over every byte of a dataset too large for memory,
    at every start); ``abdist verify`` does that, and the streaming reader checks every tar
    header's checksum and each shard's sample count as it reads.
    """
    path = Path(path)
    if not path.exists():
        raise missing_shard(path)
    if not path.is_file():
        raise damaged_shard(path, "it is not a regular file")
    size = path.stat().st_size
    if size % 512 or (size == 0 and entry["num_samples"] > 0):
        raise damaged_shard(
            path,
            f"{size} bytes is not a whole number of 512-byte tar blocks (truncated?); the "
            f"manifest lists {entry['num_samples']} samples",
        )


# --------------------------------------------------------------------------- verify


@dataclass
class _ShardScan:
    num_samples: int
    class_counts: np.ndarray
    group_class_counts: np.ndarray | None
    indices: list[int]
    problems: list[str]


def _scan_shard(path: Path, split: str, num_classes: int, num_groups: int | None) -> _ShardScan:
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

    with tarfile.open(path, "r|") as tf:  # streaming: one pass, no seeks
        key, fields = None, {}
        for member in tf:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            k, _, field = base.partition(".")
            # WebDataset groups consecutive members by key; so do we.
            if k != key:
                if key is not None:
                    finish(key, fields)
                key, fields = k, {}
            if field in ("cls", "idx", "grp"):
                fields[field] = tf.extractfile(member).read()
            else:
                fields[field] = None
        if key is not None:
            finish(key, fields)
    return _ShardScan(n, cc, gcc, indices, problems)


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
                    from abdist.data.ffcv_backend import scan_beton

                    scan = scan_beton(path, split, num_classes, num_groups)
                else:
                    scan = _scan_shard(path, split, num_classes, num_groups)
            except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
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
            for p in scan.problems[:_MAX_SAMPLE_PROBLEMS]:
                problems.append(f"{name}: {p}")
            if len(scan.problems) > _MAX_SAMPLE_PROBLEMS:
                more = len(scan.problems) - _MAX_SAMPLE_PROBLEMS
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
