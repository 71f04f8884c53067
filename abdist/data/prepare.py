"""``abdist prepare``: raw data → long-tailed, split, shuffled shards plus ``manifest.json``.

Steps, each deterministic given the seed:

1. open the source (:mod:`abdist.data.sources`); only labels are read at this point;
2. long-tail the *training pool* only (:func:`longtail_counts` + :func:`subsample_per_class`,
   head = class 0, ``n_max`` = the smallest class unless given); test stays as the source has it;
3. validation: the source's own val split if it has one, else carved from the long-tailed pool
   per class (:func:`stratified_split`), or with ``val_balanced`` the same count for every class;
4. shuffle each split (so every shard mixes classes), read/encode the chosen images and hand them
   to a writer (``WRITERS``; ``"wds"`` writes WebDataset tars, see :mod:`abdist.data.shards`);
5. write the manifest, then rename ``OUT.tmp-<pid>`` to ``OUT``: a directory named ``OUT`` is
   always complete, an interrupted prepare leaves none.

Before anything is written the planned splits are checked for classes without samples
(:func:`check_classes`): none in train, or none in a non-empty validation split, is refused
(training, or AutoBalance tuning on validation, would go wrong much later) unless
``allow_empty_classes``; none in test is only a warning.

Digits is the one exception to steps 2-3: its splits come from
:func:`abdist.data.digits.digits_lt_indices`, so shards hold exactly the samples of the in-memory
``load_digits_lt`` with the same options and seed.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from abdist.data.longtail import PROFILES
from abdist.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME
from abdist.data.prepare_plan import assign_groups, plan_splits, stage_seeds
from abdist.data.records import Record
from abdist.data.sources import (
    SPLITS,
    Source,
    SourceSplit,
    check_decodes,
    encode_image,
    open_source,
)
from abdist.errors import UserError
from abdist.io import write_json

DEFAULT_SHARD_SIZE = 2000

# A split writer: writer(out_dir, split, records, num_samples, shard_size) -> the manifest's
# shard entries [{"name", "num_samples", "sha256"}]. Records arrive in final order (i = 0..N-1).
SplitWriter = Callable[[Path, str, Iterator[Record], int, int], list[dict]]


def _wds_writer() -> SplitWriter:
    from abdist.data.shards import write_wds_split

    return write_wds_split


def _ffcv_writer() -> SplitWriter:
    from abdist.data.ffcv_files import require_ffcv, write_ffcv_split

    require_ffcv()  # a missing extra fails here, before anything is written
    return write_ffcv_split


# Backends by --format name, each a factory so an optional backend's imports (ffcv) only happen
# when it is chosen. A new backend registers here; nothing else in prepare() is format-specific.
WRITERS: dict[str, Callable[[], SplitWriter]] = {"wds": _wds_writer, "ffcv": _ffcv_writer}


@dataclass
class PrepareOptions:
    """Options of ``abdist prepare`` (see ``abdist prepare --help``); all go into the manifest."""

    profile: str = "exp"
    imbalance_ratio: float | None = None  # None: keep the training pool's own distribution
    minority_fraction: float = 0.5
    n_max: int | None = None  # head-class count; None: the smallest class of the pool
    val: float | int | None = None  # fraction in [0, 1) or per-class count; None: 0.2
    val_balanced: bool = False
    test_per_class: int = 50  # digits only: its balanced test split is carved from the pool
    groups: str | None = None  # CSV key,group
    shard_size: int = DEFAULT_SHARD_SIZE
    format: str = "wds"
    seed: int = 0

    def validate(self) -> None:
        """Raise ``UserError`` for an invalid option, before anything is read or written."""
        if self.profile not in PROFILES:
            raise UserError(f"--profile {self.profile!r}: use one of {', '.join(PROFILES)}")
        if self.imbalance_ratio is not None and not self.imbalance_ratio >= 1:
            raise UserError(f"--imbalance-ratio must be >= 1, got {self.imbalance_ratio!r}")
        if not 0.0 <= self.minority_fraction <= 1.0:
            raise UserError(
                f"--minority-fraction must be in [0, 1], got {self.minority_fraction!r}"
            )
        for name in ("n_max", "shard_size", "test_per_class"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.n_max is not None and self.imbalance_ratio is None:
            raise UserError("--n-max only applies with --imbalance-ratio")
        if self.val is not None:
            _check_val(self.val)
        if self.format not in WRITERS:
            raise UserError(f"--format {self.format!r}: use one of {', '.join(WRITERS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"--seed must be a non-negative integer, got {self.seed!r}")


def _check_val(val) -> None:
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise UserError(f"--val must be a fraction in [0, 1) or a per-class count, got {val!r}")
    if isinstance(val, float) and not 0.0 <= val < 1.0:
        raise UserError(f"--val fraction must be in [0, 1), got {val!r}; use an integer count")
    if isinstance(val, int) and val < 0:
        raise UserError(f"--val per-class count must be >= 0, got {val!r}")


def parse_val(text: str) -> float | int:
    """``--val`` from the command line: ``"0.2"`` is a fraction, ``"20"`` a per-class count."""
    try:
        val = float(text) if any(ch in text for ch in ".eE") else int(text)
    except ValueError:
        raise UserError(
            f"--val {text!r}: expected a fraction like 0.2 or a count like 20"
        ) from None
    _check_val(val)
    return val


def parse_split_file(text: str) -> tuple[str, str]:
    """``SPLIT=FILE`` (for ``--list`` / ``--json``) as a pair."""
    split, sep, file = text.partition("=")
    if not sep or split not in SPLITS or not file:
        raise UserError(f"{text!r}: expected SPLIT=FILE with SPLIT one of {', '.join(SPLITS)}")
    return split, file


# --------------------------------------------------------------------------- writing


# Training images decoded for the manifest's per-channel mean/std: the first ones written, which
# are a seeded random sample (each split is written in a shuffled order). Enough for 3 decimals.
PIXEL_STAT_IMAGES = 2000


class _ImageStats:
    """Channels, size and pixel statistics, for the manifest's ``image`` entry.

    ``mean`` / ``std`` (per channel, [0, 1] scale) are the training split's, from up to
    ``PIXEL_STAT_IMAGES`` of its images at their stored resolution, so that every reader (the
    streaming loaders and the in-memory one) normalises the same way without a pass of its own.
    """

    def __init__(self) -> None:
        self.color = False
        self.sizes: set[tuple[int, int]] = set()
        self.images = 0
        # Sums of x and x^2 over pixels, per mode: the channel count is only known at the end.
        self.sums = {"RGB": np.zeros((2, 3)), "L": np.zeros((2, 1))}
        self.pixels = 0

    def add(self, channels: int, size: tuple[int, int]) -> None:
        self.color |= channels == 3
        if len(self.sizes) < 2:  # only "one size or not" matters; ImageNet has thousands
            self.sizes.add(tuple(size))

    def add_pixels(self, data: bytes, where: str) -> None:
        """Count one training image's pixels (the first ``PIXEL_STAT_IMAGES`` only); an image
        whose header reads but whose pixels do not is refused naming ``where``."""
        if self.images >= PIXEL_STAT_IMAGES:
            return
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                planes = {
                    mode: np.asarray(im.convert(mode), dtype=np.float64) for mode in self.sums
                }
                pixels = im.size[0] * im.size[1]
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise UserError(f"{where}: not a readable image ({exc})") from None
        self.images += 1
        for mode, acc in self.sums.items():
            x = planes[mode].reshape(-1, acc.shape[1]) / 255
            acc[0] += x.sum(0)
            acc[1] += (x * x).sum(0)
        self.pixels += pixels

    def manifest(self) -> dict:
        size = None
        if len(self.sizes) == 1:
            (h, w) = next(iter(self.sizes))
            size = h if h == w else None  # a single int only describes square images
        out = {"channels": 3 if self.color else 1, "size": size}
        if self.pixels:
            s, s2 = self.sums["RGB" if self.color else "L"] / self.pixels
            std = np.sqrt(np.maximum(s2 - s * s, 0.0)).clip(min=1e-3)
            out.update(mean=np.round(s, 6).tolist(), std=np.round(std, 6).tolist())
        return out


def _records(
    split: str,
    sp: SourceSplit,
    idx: np.ndarray,
    order: np.ndarray,
    groups: np.ndarray | None,
    stats: _ImageStats,
    decode_all: bool = False,
) -> Iterator[Record]:
    """The split's records in ``order``; ``decode_all``: every image decoded in full first, not
    only its header. FFCV files need it: their reader decodes without a per-sample check (a
    damaged JPEG comes out as some image, silently), so one that does not decode must not get
    in; checked here, where the sample's source name is known."""
    for i, j in enumerate(order):
        si = int(idx[j])
        where = f"{split} sample {sp.keys[si]!r}"
        enc = encode_image(sp.read(si), where=where)
        if decode_all:
            check_decodes(
                enc.data,
                where,
                "an FFCV file cannot skip it at read time: repair or remove the file, or prepare "
                "WebDataset shards (their loader skips such samples per data.bad_data)",
            )
        stats.add(enc.channels, enc.size)
        if split == "train":
            stats.add_pixels(enc.data, where)
        group = None if groups is None else int(groups[j])
        yield Record(i, enc.ext, enc.data, int(sp.labels[si]), group)


def _check_out(out: Path, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if not out.is_dir() or out.is_symlink():
        raise UserError(f"refusing to replace {out}: not a directory")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        # --force replaces earlier prepare output, never an unrelated directory (a typo in OUT).
        raise UserError(f"refusing to replace {out}: it has files but no {MANIFEST_NAME}")


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    # Move the old directory aside first, so there is never a moment without a complete OUT
    # that we could not roll back from.
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def prepare(
    source: str,
    out: str | Path,
    options: PrepareOptions | None = None,
    *,
    lists: dict[str, str] | None = None,
    jsons: dict[str, str] | None = None,
    root: str | None = None,
    force: bool = False,
    allow_empty_classes: bool = False,
) -> dict:
    """Convert the raw dataset ``source`` into shards in ``out``; returns the manifest.

    ``source``, ``lists``, ``jsons`` and ``root`` are as for
    :func:`abdist.data.sources.open_source`. Output: ``out/{split}-NNNNNN.tar`` for ``train``,
    ``val`` and ``test`` (a split with no samples has no shards) and ``out/manifest.json``; see
    :mod:`abdist.data.shards` for the exact formats. Byte-identical for equal inputs, options and
    seed. An existing ``out`` is only replaced with ``force=True`` (and only if it holds an earlier
    prepare's output); the work happens in ``out.tmp-<pid>`` beside it, removed on any error.
    A class without training or validation samples is refused unless ``allow_empty_classes``
    (see :func:`check_classes`); like ``force`` it never changes what is written.
    """
    opts = options if options is not None else PrepareOptions()
    opts.validate()
    writer = WRITERS[opts.format]()
    out = Path(out)
    _check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():  # left by a killed run whose pid we now have: ours to remove
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with open_source(
            source, lists=lists, jsons=jsons, root=root, scratch=tmp / "_scratch"
        ) as src:
            manifest = _write_all(src, opts, tmp, writer, allow_empty_classes)
        shutil.rmtree(tmp / "_scratch", ignore_errors=True)
        manifest["options"] = {
            **asdict(opts),
            "groups": _abs(opts.groups),
            "lists": {k: _abs(v) for k, v in (lists or {}).items()} or None,
            "jsons": {k: _abs(v) for k, v in (jsons or {}).items()} or None,
            "root": _abs(root),
        }
        write_json(tmp / MANIFEST_NAME, manifest)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _abs(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def _write_all(
    src: Source, opts: PrepareOptions, tmp: Path, writer: SplitWriter, allow_empty: bool
) -> dict:
    from abdist import __version__

    plan = plan_splits(src, opts, allow_empty_classes=allow_empty)
    group_names, group_ids = assign_groups(src, plan, opts)
    _, _, shuffle_seq = stage_seeds(opts.seed)
    shuffle_seeds = dict(zip(SPLITS, shuffle_seq.spawn(len(SPLITS))))
    stats = _ImageStats()
    num_classes = src.num_classes
    splits = {}
    for split in SPLITS:
        sname, idx = plan[split]
        sp = src.splits[sname]
        labels = sp.labels[idx]
        groups = None if group_ids is None else group_ids[split]
        order = np.random.default_rng(shuffle_seeds[split]).permutation(idx.size)
        shards = writer(
            tmp,
            split,
            _records(split, sp, idx, order, groups, stats, decode_all=opts.format == "ffcv"),
            idx.size,
            opts.shard_size,
        )
        gcc = None
        if groups is not None:
            table = np.zeros((len(group_names), num_classes), dtype=np.int64)
            np.add.at(table, (groups, labels), 1)
            gcc = table.tolist()
        splits[split] = {
            "num_samples": int(idx.size),
            "class_counts": np.bincount(labels, minlength=num_classes).tolist(),
            "group_class_counts": gcc,
            "shards": shards,
        }
    return {
        "format": MANIFEST_FORMAT,
        "class_names": list(src.class_names),
        "num_classes": num_classes,
        "group_names": group_names,
        "image": stats.manifest(),
        "splits": splits,
        "source": {"kind": src.kind, "path": src.path},
        "options": {},  # filled in by prepare()
        "seed": opts.seed,
        "created_by": f"abdist {__version__}",
    }


def summarize(manifest: dict, out: str | Path) -> str:
    """One line for the CLI: where, how many classes, samples and shards per split."""
    parts = []
    for split, info in manifest["splits"].items():
        parts.append(f"{split} {info['num_samples']} ({len(info['shards'])} shards)")
    counts = manifest["splits"]["train"]["class_counts"]
    head, tail = (max(counts), min(counts)) if counts else (0, 0)
    return (
        f"wrote {out}: {manifest['num_classes']} classes, {', '.join(parts)}; "
        f"train per class {head}..{tail}"
    )
