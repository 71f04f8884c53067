"""What ``abdist prepare`` puts where, before anything is written: the split plan (long-tailed
training pool, validation carved per class, digits' own indices), the check that no planned split
lacks a class, and the group id of every planned sample (``--groups`` CSV or the source's own
column). Pure over the source's labels: no image is read here.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from abdist.data.longtail import longtail_counts, stratified_split, subsample_per_class
from abdist.data.sources import SPLITS, Source, SourceSplit
from abdist.errors import UserError

DEFAULT_VAL = 0.2

if TYPE_CHECKING:  # the options dataclass lives with the command; only its fields are read here
    from abdist.data.prepare import PrepareOptions


def read_group_csv(path: str | Path) -> dict[str, str]:
    """``key,group`` rows of a CSV as a dict (an optional ``key,group`` header row is skipped).

    Keys name samples the way the source does (see :mod:`abdist.data.sources`); rows for samples
    that are not in the prepared dataset are ignored.
    """
    mapping: dict[str, str] = {}
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"--groups {path}: cannot read ({exc})") from None
    for lineno, row in enumerate(rows, 1):
        row = [c.strip() for c in row]
        if not any(row):
            continue
        if lineno == 1 and [c.lower() for c in row] == ["key", "group"]:
            continue
        if len(row) != 2 or not row[0] or not row[1]:
            raise UserError(f"{path}:{lineno}: expected 'key,group', got {','.join(row)!r}")
        if mapping.setdefault(row[0], row[1]) != row[1]:
            raise UserError(f"{path}:{lineno}: {row[0]!r} is given two different groups")
    return mapping


def stage_seeds(seed: int) -> tuple[int, int, np.random.SeedSequence]:
    # The same derivation as abdist.data.digits (children 0..2: test, long-tail, split), so both
    # paths agree; child 3 drives the shard order. Independent streams mean that, e.g., changing
    # --val never changes which samples the long-tail step picked.
    children = np.random.SeedSequence(seed).spawn(4)
    s_lt, s_split = (int(s.generate_state(1)[0]) for s in children[1:3])
    return s_lt, s_split, children[3]


def _longtail_pool(src: Source, opts: PrepareOptions, seed: int) -> np.ndarray:
    labels = src.splits["train"].labels
    if opts.imbalance_ratio is None:
        return np.arange(labels.size, dtype=np.int64)
    per_class = np.bincount(labels, minlength=src.num_classes)
    if per_class.min() == 0:
        empty = np.flatnonzero(per_class == 0).tolist()
        raise UserError(
            f"no training samples for {_class_list(src, empty)}; --imbalance-ratio needs every "
            "class (also with --allow-empty-classes)"
        )
    n_max = opts.n_max if opts.n_max is not None else int(per_class.min())
    counts = longtail_counts(
        n_max, src.num_classes, opts.imbalance_ratio, opts.profile, opts.minority_fraction
    )
    return subsample_per_class(labels, counts, seed)


def _balanced_split(
    labels: np.ndarray, pool: np.ndarray, val: float | int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`stratified_split`, but every class gives the same validation count ``k``.

    A count is used as is, a fraction applies to the smallest class (so no class gives more than
    that fraction of its samples); ``k`` is capped at smallest - 1 so that even the rarest class
    keeps a training sample and validation stays exactly balanced.
    """
    per_class = np.bincount(labels[pool])
    smallest = int(per_class[per_class > 0].min()) if pool.size else 0
    if isinstance(val, float):
        k = math.floor(val * smallest + 0.5 + 1e-9)  # round half up, as stratified_split does
    else:
        k = int(val)
    if val > 0:
        k = max(1, min(k, smallest - 1))
    return stratified_split(labels, pool, k, seed)


def plan_splits(
    src: Source, opts: PrepareOptions, *, allow_empty_classes: bool = False
) -> dict[str, tuple[str, np.ndarray]]:
    """``{split: (source split, sorted indices into it)}`` for ``train``, ``val`` and ``test``.

    Checked with :func:`check_classes` (``UserError`` for a class without training or
    validation samples unless ``allow_empty_classes``).
    """
    s_lt, s_split, _ = stage_seeds(opts.seed)
    if src.kind == "digits":
        from abdist.data.digits import digits_lt_indices

        if opts.n_max is not None:
            raise UserError("--n-max does not apply to digits (its n_max is the smallest class)")

        val = DEFAULT_VAL if opts.val is None else opts.val
        idx = digits_lt_indices(
            profile=opts.profile,
            imbalance_ratio=1.0 if opts.imbalance_ratio is None else opts.imbalance_ratio,
            minority_fraction=opts.minority_fraction,
            test_per_class=opts.test_per_class,
            val=0 if opts.val_balanced else val,
            seed=opts.seed,
        )
        if opts.val_balanced:
            idx["train"], idx["val"] = _balanced_split(
                src.splits["all"].labels, idx["train"], val, s_split
            )
        plan = {split: ("all", idx[split]) for split in SPLITS}
        check_classes(src, plan, allow_empty_classes)
        return plan

    labels = src.splits["train"].labels
    # The source's own training split first: an empty class there is the user's data, not a
    # consequence of the options, and is named before --imbalance-ratio would trip over it.
    check_classes(
        src, {"train": ("train", np.arange(labels.size))}, allow_empty_classes, warn=False
    )
    pool = _longtail_pool(src, opts, s_lt)
    if "val" in src.splits:
        if opts.val is not None or opts.val_balanced:
            raise UserError(
                "the source has its own val split; drop --val / --val-balanced (they only apply "
                "when validation is carved from the training pool)"
            )
        train, val_idx = pool, np.arange(len(src.splits["val"]), dtype=np.int64)
        plan = {"train": ("train", train), "val": ("val", val_idx)}
    else:
        val = DEFAULT_VAL if opts.val is None else opts.val
        split = _balanced_split if opts.val_balanced else stratified_split
        train, val_idx = split(labels, pool, val, s_split)
        plan = {"train": ("train", train), "val": ("train", val_idx)}
    plan["test"] = ("test", np.arange(len(src.splits["test"]), dtype=np.int64))
    check_classes(src, plan, allow_empty_classes)
    return plan


ALLOW_EMPTY = "--allow-empty-classes"


def _warn(message: str) -> None:
    print(f"abdist: warning: {message}", file=sys.stderr)


def _class_list(src: Source, ids: list[int], limit: int = 10) -> str:
    """``"2 of 13 classes (10, 11)"``; folder/JSON classes by name: ``"1 of 4 classes ('fox')"``."""
    numeric = src.class_names == [str(c) for c in range(src.num_classes)]
    shown = [str(c) if numeric else repr(src.class_names[c]) for c in ids[:limit]]
    if len(ids) > limit:
        shown.append(f"... {len(ids) - limit} more")
    noun = "class" if src.num_classes == 1 else "classes"
    return f"{len(ids)} of {src.num_classes} {noun} ({', '.join(shown)})"


def _empty_hint(src: Source) -> str:
    """Where classes without training samples come from, by source kind."""
    if src.kind == "list":
        top = src.num_classes - 1
        return (
            f"; list files have classes 0..largest label, and label {top} at "
            f"{src.label_sites.get(top, '?')} makes {src.num_classes}: check that line"
        )
    if src.kind.startswith("folder"):
        return (
            "; every <split>/<class>/ folder names a class: add images to train/<class>/ or "
            "remove that class's folders"
        )
    if src.kind == "inat":
        return "; every category in the JSON files is a class"
    return ""


def check_classes(
    src: Source,
    plan: dict[str, tuple[str, np.ndarray]],
    allow_empty_classes: bool = False,
    *,
    warn: bool = True,
) -> None:
    """Refuse (``UserError``) or warn about classes with no samples in a planned split.

    - train: refused; with ``allow_empty_classes`` a warning;
    - val, if it has samples at all (``--val 0`` asks for none): refused, since AutoBalance tunes
      on validation and would silently leave the class out; with ``allow_empty_classes`` a
      warning;
    - test: a warning (those classes are not evaluated).

    The warnings go into one ``abdist: warning:`` line on stderr (none with ``warn=False``).
    """
    empty = {}
    for split, (sname, idx) in plan.items():
        if split == "val" and idx.size == 0:
            continue
        counts = np.bincount(src.splits[sname].labels[idx], minlength=src.num_classes)
        if (counts == 0).any():
            empty[split] = np.flatnonzero(counts == 0).tolist()
    if not allow_empty_classes and "train" in empty:
        raise UserError(
            f"no training samples for {_class_list(src, empty['train'])}"
            f"{_empty_hint(src)}; or pass {ALLOW_EMPTY} to keep them"
        )
    if not allow_empty_classes and "val" in empty:
        if plan["val"][0] == "val":
            fix = (
                "the source's val split lacks them: add some, or drop it and carve one with --val N"
            )
        else:
            fix = "a class with 1 training sample keeps it in train; use --val 0 for no validation"
        raise UserError(
            f"no validation samples for {_class_list(src, empty['val'])}; {fix}, or pass "
            f"{ALLOW_EMPTY} to tune on the other classes"
        )
    if warn and empty:
        parts = [f"{split} {_class_list(src, ids)}" for split, ids in empty.items()]
        kept = f", kept ({ALLOW_EMPTY})" if empty.keys() - {"test"} else ""
        _warn(f"classes without samples: {'; '.join(parts)}{kept}")


def _sorted_names(names: set[str]) -> list[str]:
    # Numeric group labels sort as numbers ("2" before "10"), anything else alphabetically.
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def assign_groups(
    src: Source, plan: dict[str, tuple[str, np.ndarray]], opts: PrepareOptions
) -> tuple[list[str] | None, dict[str, np.ndarray] | None]:
    """Group names and, per split, a group id for each planned sample (None: no groups)."""
    from_source = any(s.groups is not None for s in src.splits.values())
    if opts.groups is None and not from_source:
        return None, None
    if opts.groups is not None and from_source:
        raise UserError("the list files already have a group column; drop --groups or the column")
    mapping = read_group_csv(opts.groups) if opts.groups is not None else None
    values: dict[str, list[str]] = {}
    for split, (sname, idx) in plan.items():
        sp: SourceSplit = src.splits[sname]
        if mapping is None:
            values[split] = [sp.groups[i] for i in idx]
            continue
        vals, missing = [], []
        for i in idx:
            g = mapping.get(sp.keys[i])
            if g is None and sp.alt_keys is not None:
                g = mapping.get(sp.alt_keys[i])
            (missing.append(sp.keys[i]) if g is None else vals.append(g))
        if missing:
            raise UserError(
                f"--groups {opts.groups}: no group for {len(missing)} {split} samples, "
                f"e.g. {missing[0]!r} (keys for this source look like {sp.keys[0]!r})"
            )
        values[split] = vals
    names = _sorted_names({v for vals in values.values() for v in vals})
    index = {n: g for g, n in enumerate(names)}
    ids = {s: np.array([index[v] for v in vals], dtype=np.int64) for s, vals in values.items()}
    return names, ids
