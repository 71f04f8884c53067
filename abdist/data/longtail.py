"""Long-tailed subsampling and stratified splitting.

Pure numpy functions, deterministic given a seed, shared by every data source (digits, CIFAR,
image folders) so that the same profile/ρ/seed always yields the same dataset.
"""

from __future__ import annotations

import math

import numpy as np

from abdist.errors import UserError

PROFILES = ("exp", "step")

# Tolerance for float rounding in floor/ceil: 100 * 100**-1 may come out as 0.99999...; without
# it a hand-computable count (the paper tables) would silently lose one sample.
_EPS = 1e-9


def longtail_counts(
    n_max: int,
    num_classes: int,
    imbalance_ratio: float,
    profile: str,
    minority_fraction: float = 0.5,
) -> list[int]:
    """Per-class sample counts of a long-tailed dataset, head class first.

    Profiles (C = ``num_classes``, ρ = ``imbalance_ratio``):

    - ``"exp"``: ``n_i = floor(n_max * ρ^(-i/(C-1)))`` for ``i = 0..C-1`` (``[n_max]`` if C = 1),
      so the first class has ``n_max`` and the last ``n_max/ρ``.
    - ``"step"``: the first ``ceil(C * (1 - minority_fraction))`` classes get ``n_max``, the rest
      ``floor(n_max / ρ)``.

    Every count is at least 1, so no class disappears even for extreme ρ.
    """
    if not isinstance(n_max, (int, np.integer)) or n_max < 1:
        raise UserError(f"n_max must be a positive integer, got {n_max!r}")
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not imbalance_ratio >= 1:  # also rejects NaN
        raise UserError(
            f"imbalance_ratio must be >= 1 (head/tail count ratio), got {imbalance_ratio!r}; "
            "use 1 for a balanced dataset"
        )
    if profile == "exp":
        if num_classes == 1:
            return [int(n_max)]
        return [
            max(1, math.floor(n_max * imbalance_ratio ** (-i / (num_classes - 1)) + _EPS))
            for i in range(num_classes)
        ]
    if profile == "step":
        if not 0.0 <= minority_fraction <= 1.0:
            raise UserError(
                "minority_fraction must be in [0, 1] for the step profile, "
                f"got {minority_fraction!r}"
            )
        n_major = math.ceil(num_classes * (1.0 - minority_fraction) - _EPS)
        n_minor = max(1, math.floor(n_max / imbalance_ratio + _EPS))
        return [int(n_max)] * n_major + [n_minor] * (num_classes - n_major)
    raise UserError(f"unknown long-tail profile {profile!r}; use one of {', '.join(PROFILES)}")


def _as_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}"
        )
    return labels


def subsample_per_class(labels: np.ndarray, counts: list[int], seed: int) -> np.ndarray:
    """Indices (sorted, int64) of a subsample with exactly ``counts[c]`` samples of class ``c``.

    Samples of each class are drawn uniformly without replacement; labels must lie in
    ``[0, len(counts))``. Raises ``UserError`` if a class has fewer samples than asked for.
    """
    labels = _as_labels(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= len(counts)):
        raise UserError(
            f"labels span [{labels.min()}, {labels.max()}] but counts has {len(counts)} entries; "
            "give one count per class"
        )
    rng = np.random.default_rng(seed)
    chosen = []
    for c, want in enumerate(counts):
        if want < 0:
            raise UserError(f"count for class {c} is negative ({want}); counts must be >= 0")
        pool = np.flatnonzero(labels == c)
        if pool.size < want:
            raise UserError(
                f"class {c} has {pool.size} samples but {want} were requested; "
                "lower n_max or the counts for that class"
            )
        # Drawn for every class in a fixed order so one seed maps to one subsample.
        chosen.append(rng.choice(pool, size=want, replace=False))
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def stratified_split(
    labels: np.ndarray, indices: np.ndarray, val: float | int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` (into ``labels``) per class into sorted ``(train_idx, val_idx)``.

    ``val`` is either a fraction (float in (0, 1)) or a fixed per-class count (int >= 0); 0 (or
    0.0) means no validation split. For a class with ``n`` samples the validation count is:

    - fraction: ``floor(n * val + 0.5)`` (round half up), then
    - clamped to ``[1, n - 1]`` when ``n >= 2``, so every such class has at least one sample in
      each split (tail classes would otherwise vanish from validation, and the validation-driven
      loss cannot see them); a class with a single sample keeps it in train;
    - a fixed count larger than ``n - 1`` is clamped the same way rather than raising, because
      tail classes of a long-tailed set are expected to be small.
    """
    labels = _as_labels(labels)
    indices = np.asarray(indices, dtype=np.int64)
    if isinstance(val, bool) or not isinstance(val, (int, float, np.integer, np.floating)):
        raise UserError(f"val must be a fraction in (0, 1) or a per-class count, got {val!r}")
    is_fraction = isinstance(val, (float, np.floating))
    if is_fraction and not 0.0 <= val < 1.0:
        raise UserError(
            f"val fraction must be in [0, 1), got {val!r}; use an int for a per-class count"
        )
    if not is_fraction and val < 0:
        raise UserError(f"val per-class count must be >= 0, got {val!r}")

    rng = np.random.default_rng(seed)
    sub_labels = labels[indices]
    train, held = [], []
    for c in np.unique(sub_labels):
        pool = indices[sub_labels == c]
        n = pool.size
        n_val = math.floor(n * val + 0.5 + _EPS) if is_fraction else int(val)
        n_val = min(max(n_val, 1), n - 1) if (val > 0 and n >= 2) else 0
        perm = rng.permutation(pool)
        held.append(perm[:n_val])
        train.append(perm[n_val:])
    empty = np.zeros(0, dtype=np.int64)
    train_idx = np.sort(np.concatenate(train)) if train else empty
    val_idx = np.sort(np.concatenate(held)) if held else empty
    return train_idx.astype(np.int64), val_idx.astype(np.int64)
