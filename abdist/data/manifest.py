"""The manifest of a prepared directory: reading and validating it, the shards of a split
(parts such as "train+val" end to end), class and cell counts, image settings, and the checks
that a shard file is the one the manifest describes.

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
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abdist.errors import UserError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "abdist-shards/1"


@dataclass(frozen=True)
class ShardFile:
    name: str
    path: str
    num_samples: int
    id_offset: int = 0  # added to the samples' .idx: "train+val" numbers val after train


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def require_wds_shards(root: str | Path, manifest: dict, splits: Iterable[str]) -> None:
    """One-line ``UserError`` unless ``splits`` are stored as WebDataset ``.tar`` shards.

    An FFCV directory (``abdist prepare --format ffcv``: one ``{split}.beton`` per split, and
    ``options.format == "ffcv"`` in its manifest) says so: the WebDataset readers cannot read it
    (``abdist train`` picks the FFCV reader for such a directory itself).
    """
    names = [e["name"] for split in splits for e in manifest["splits"][split]["shards"]]
    if is_ffcv(manifest):
        everything = [e["name"] for info in manifest["splits"].values() for e in info["shards"]]
        files = ", ".join(n for n in everything if n.endswith(".beton")) or "no .tar shards"
        raise UserError(
            f"{root} is an FFCV directory (prepared with --format ffcv: {files}), not "
            "WebDataset tar shards: read it with abdist.data.ffcv_backend.FFCVSplit (abdist "
            "train does so by itself), or prepare the data again without --format ffcv"
        )
    other = [n for n in names if not n.endswith(".tar")]
    if other:
        raise UserError(
            f"{root}: {other[0]} is not stored as WebDataset tar shards (.tar files); "
            "re-run `abdist prepare`"
        )


def is_ffcv(manifest: dict) -> bool:
    """Whether the directory was prepared with ``--format ffcv`` (one ``{split}.beton`` each)."""
    everything = [e["name"] for info in manifest["splits"].values() for e in info["shards"]]
    beton = any(n.endswith(".beton") for n in everything)
    return beton or (manifest.get("options") or {}).get("format") == "ffcv"


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


def manifest_class_counts(manifest: dict, split: str, num_classes: int) -> list[int]:
    """Samples per class of ``split`` ("a+b": summed over the parts), from the manifest."""
    totals = [0] * num_classes
    for part in split.split("+"):
        for c, n in enumerate(manifest["splits"][part].get("class_counts") or []):
            totals[c] += int(n)
    return totals


def per_channel(name: str, value: Any, channels: int) -> tuple[float, ...]:
    values = (
        [float(value)] * channels if isinstance(value, (int, float)) else list(map(float, value))
    )
    if len(values) != channels or not all(math.isfinite(v) for v in values):
        raise UserError(f"{name} must be one finite number per channel ({channels}), got {value!r}")
    return tuple(values)


def image_settings(root, manifest: dict, *, image_size, mean, std):
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
    mean = per_channel("mean", mean if mean is not None else image.get("mean", 0.5), channels)
    std = per_channel("std", std if std is not None else image.get("std", 0.5), channels)
    if any(s <= 0 for s in std):
        raise UserError(f"std must be positive, got {list(std)}")
    return channels, int(size), num_classes, mean, std


def split_shards(root: Path, manifest: dict, split: str) -> tuple[ShardFile, ...]:
    """The shard files of ``split`` ("a+b": the parts' shards end to end, the later parts'
    sample ids numbered after the earlier ones), each given one ``stat`` (check_shard_file); a
    one-line error for an unknown split, an FFCV directory or counts that do not add up."""
    splits = manifest["splits"]
    parts = split.split("+")  # "train+val": the splits' shards end to end (a retrain)
    for part in parts:
        if part not in splits:
            raise UserError(f"{root}: no split '{part}' in the manifest (has: {sorted(splits)})")
    require_wds_shards(root, manifest, parts)
    shards, offset = [], 0
    for part in parts:
        entries = splits[part].get("shards") or []
        for entry in entries:
            path = root / entry["name"]
            check_shard_file(path, entry)  # exists, whole tar blocks: one stat, no reading
            shards.append(ShardFile(entry["name"], str(path), int(entry["num_samples"]), offset))
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
    return tuple(shards)


def manifest_num_groups(manifest: dict) -> int | None:
    """Number of groups (prepared with ``--groups``), else None."""
    return len(manifest["group_names"]) if manifest.get("group_names") else None


def manifest_cell_counts(manifest: dict, split: str, num_classes: int) -> list[list[int]]:
    """Samples per (group, class) of ``split`` ("a+b": summed over the parts)."""
    totals = [[0] * num_classes for _ in manifest["group_names"]]
    for part in split.split("+"):
        for g, row in enumerate(manifest["splits"][part]["group_class_counts"]):
            for c, n in enumerate(row):
                totals[g][c] += int(n)
    return totals
