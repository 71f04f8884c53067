"""Frequency dictionaries D_π: classes of similar training frequency share loss parameters.

AutoBalance tunes per-class loss parameters α_class ∈ R^C (one vector each for l, Δ, w). With
thousands of classes that is too many hyperparameters for a validation split to pin down, so they
are restricted to a K-dimensional subspace

    α_class = D_π · α_sub,     D_π ∈ R^{C×K},  every row of D_π non-negative and summing to 1,

where D_π depends only on the training class counts. Each row is a convex combination of the K
"knot" parameters, so the constraints callers put on α_sub (Δ ∈ (0, 1), w > 0) carry over to
α_class. The same explicit matrix is meant to be used in both the search and the retrain phase; the
authors' code searched with contiguous blocks and retrained with a different interpolation, and its
repeat_interleave crashed when the group size did not divide C.

Columns are ordered from the RAREST end (column 0) to the most frequent end (column K-1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["DICTIONARY_KINDS", "build_dictionary", "expand", "fit_sub"]

DICTIONARY_KINDS = ("per_class", "buckets", "interp")
TIES = ("average", "stable")


def _as_counts(class_counts: Tensor | Sequence[float]) -> Tensor:
    """Counts as a float64 CPU vector, validated: 1-D, non-empty, finite, >= 0, not all zero."""
    n = torch.as_tensor(class_counts).detach().to("cpu", torch.float64)
    if n.dim() != 1 or n.numel() == 0:
        raise ValueError(
            f"class_counts must be a non-empty 1-D sequence, got shape {list(n.shape)}"
        )
    if not torch.isfinite(n).all() or (n < 0).any():
        raise ValueError("class_counts must be finite and non-negative")
    if not (n > 0).any():
        raise ValueError(
            "class_counts are all zero; there is no frequency to build a dictionary on"
        )
    return n


def _check_k(k: int, c: int) -> int:
    if isinstance(k, bool) or int(k) != k:
        raise ValueError(f"num_groups must be an integer, got {k!r}")
    k = int(k)
    if not 1 <= k <= c:
        raise ValueError(f"num_groups must satisfy 1 <= K <= C = {c}, got K = {k}")
    return k


def _buckets(n: Tensor, k: int) -> Tensor:
    """One-hot rows: equal-width bins of log n between min and max, empty bins dropped."""
    c = n.numel()
    # A class with no training samples has log n = -inf; it is put with the rarest classes (the
    # smallest positive count) so it neither breaks the bin edges nor gets a bucket of its own.
    n = torch.where(n > 0, n, n[n > 0].min())
    logn = n.log()
    lo, hi = logn.min(), logn.max()
    if hi - lo <= 0:
        idx = torch.zeros(c, dtype=torch.long)
    else:
        # floor((log n - lo) / width); the maximum lands exactly on K and is folded into the last
        # bin. Equal counts give bit-identical logs, hence the same bin.
        idx = ((logn - lo) / (hi - lo) * k).floor().long().clamp_(0, k - 1)
    used = torch.unique(idx)  # sorted ascending: column 0 stays the rarest bucket
    remap = torch.full((k,), -1, dtype=torch.long)
    remap[used] = torch.arange(used.numel())
    d = torch.zeros(c, used.numel(), dtype=torch.float64)
    d[torch.arange(c), remap[idx]] = 1.0
    return d


def _ranks(n: Tensor, ties: str) -> Tensor:
    """Frequency rank of every class, 0 = rarest, C-1 = most frequent (float64).

    "stable": ties broken by class index (a stable sort), so ranks are a permutation of 0..C-1.
    "average": tied classes all get the mean of the ranks they occupy (fractional ranking), so the
    result depends only on the counts and equal counts give identical dictionary rows.
    """
    c = n.numel()
    order = torch.sort(n, stable=True).indices
    rank = torch.empty(c, dtype=torch.float64)
    rank[order] = torch.arange(c, dtype=torch.float64)
    if ties == "average":
        _, inverse = torch.unique(n, return_inverse=True)
        total = torch.zeros(int(inverse.max()) + 1, dtype=torch.float64).index_add_(
            0, inverse, rank
        )
        size = torch.bincount(inverse).to(torch.float64)
        rank = (total / size)[inverse]
    return rank


def _interp(n: Tensor, k: int, ties: str) -> Tensor:
    """Hat-function rows: linear interpolation over frequency rank between K evenly spaced knots."""
    c = n.numel()
    d = torch.zeros(c, k, dtype=torch.float64)
    if k == 1:
        d[:, 0] = 1.0
        return d
    rank = _ranks(n, ties)
    # Knot j sits at rank j·(C-1)/(K-1), so a class at rank r is at knot coordinate
    # s = r·(K-1)/(C-1). Computing s from 2·r (an integer even for averaged ranks, which are
    # multiples of 1/2) keeps it exact: K = C gives s = r exactly, i.e. a permutation matrix.
    num = (2 * rank).round().long() * (k - 1)
    den = 2 * (c - 1)
    lower = torch.div(num, den, rounding_mode="floor").clamp_(max=k - 1)
    frac = (num - lower * den).to(torch.float64) / den
    upper = (lower + 1).clamp(max=k - 1)
    rows = torch.arange(c)
    d[rows, lower] += 1.0 - frac
    # At the top knot frac is 0, so adding it to the clamped `upper` (= lower) changes nothing.
    d[rows, upper] += frac
    return d


def build_dictionary(
    class_counts: Tensor | Sequence[float],
    kind: str,
    num_groups: int | None = None,
    *,
    ties: str = "average",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Frequency dictionary D_π ∈ R^{C×K} with α_class = D_π · α_sub.

    class_counts: training samples per class [C] (frequencies π work equally: every kind depends
    only on the ordering or the log-ratios of the counts). Zero counts are allowed.

    kinds:
      "per_class": D = I_C (K = C); num_groups must be None or C.
      "buckets":   split [min log n, max log n] into K equal-width bins; class c gets the one-hot
                   row of its bin (a class with n = 0 counts as the smallest positive count).
                   Empty bins are dropped, so the returned K' may be smaller than num_groups.
                   No assumption that K divides C. Equal counts always share a bucket.
      "interp":    K knots at ranks t_j = j·(C-1)/(K-1), j = 0..K-1, over the frequency rank r_c
                   (0 = rarest); row c is the piecewise-linear hat-function interpolation
                   D[c, j] = max(0, 1 - |r_c - t_j|·(K-1)/(C-1)), i.e. weights (1-f, f) on the two
                   neighbouring knots. K = 1 gives one shared parameter. With K = C and distinct
                   counts D is a permutation matrix (each class is its own knot).
    ties (interp only): "average" (default) gives tied classes their mean rank, so classes with
      equal counts get identical rows and D is equivariant to relabelling classes; "stable"
      breaks ties by class index (a stable sort), so ranks are exactly 0..C-1.

    Every row is non-negative and sums to 1; columns go from the rarest (0) to the most frequent
    end. Raises ValueError for an unknown kind or K outside 1..C. Deterministic: the result is
    a pure function of (class_counts, kind, num_groups, ties).
    """
    n = _as_counts(class_counts)
    c = n.numel()
    if kind not in DICTIONARY_KINDS:
        raise ValueError(f"unknown dictionary kind {kind!r}; choose one of {DICTIONARY_KINDS}")
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    if kind == "per_class":
        if num_groups is not None and _check_k(num_groups, c) != c:
            raise ValueError(f"'per_class' has K = C = {c}; got num_groups = {num_groups}")
        d = torch.eye(c, dtype=torch.float64)
    else:
        if num_groups is None:
            raise ValueError(f"dictionary kind {kind!r} needs num_groups (K)")
        k = _check_k(num_groups, c)
        d = _buckets(n, k) if kind == "buckets" else _interp(n, k, ties)
    return d.to(dtype)


def expand(d: Tensor, alpha_sub: Tensor) -> Tensor:
    """α_class = D · α_sub.

    alpha_sub is [K] (one parameter vector) or [K, P] (P vectors, e.g. l, Δ, w stacked as
    columns); the result is [C] or [C, P]. D is cast to alpha_sub's dtype and device, and the
    product is differentiable in alpha_sub, so hypergradients flow back to the K free parameters
    as D^T · ∂F/∂α_class.
    """
    if alpha_sub.dim() not in (1, 2) or alpha_sub.shape[0] != d.shape[1]:
        raise ValueError(
            f"alpha_sub must be [K] or [K, P] with K = {d.shape[1]}, got {list(alpha_sub.shape)}"
        )
    return d.to(device=alpha_sub.device, dtype=alpha_sub.dtype) @ alpha_sub


def fit_sub(d: Tensor, alpha_class: Tensor) -> Tensor:
    """Least-squares α_sub = argmin_a ‖D a − α_class‖₂ (e.g. to start from a per-class LA init).

    Exact (α_class recovered) whenever α_class lies in the column span of D, e.g. when it is
    already D · a. Solved in float64; returned in alpha_class's dtype and device.
    """
    if alpha_class.shape[0] != d.shape[0]:
        raise ValueError(f"alpha_class must have C = {d.shape[0]} rows, got {alpha_class.shape[0]}")
    a = alpha_class.detach().to("cpu", torch.float64)
    col = a.dim() == 1
    sol = torch.linalg.lstsq(
        d.detach().to("cpu", torch.float64), a[:, None] if col else a, driver="gelsd"
    ).solution
    return (sol[:, 0] if col else sol).to(alpha_class.device, alpha_class.dtype)


# What AutoBalance can tune, and how each per-class vector is parameterised by D·a.
TUNABLE = ("w", "l", "delta", "aug", "aug_mag")
# Δ = DELTA_MAX·σ(t): the presets' Δ = 1 sits at t = 0, the sigmoid's steepest point.
DELTA_MAX = 2.0


def class_vectors(d: Tensor, a: dict[str, Tensor], fixed: dict[str, Tensor | None]) -> dict:
    """Per-class vectors from subspace parameters (the tuned ones) or the fixed preset values:
    l = D·a, Δ = DELTA_MAX·σ(D·a), w = exp(D·a), aug = σ(D·a), aug_mag = σ(D·a)."""
    out = dict(fixed)
    if "l" in a:
        out["l"] = expand(d, a["l"])
    if "delta" in a:
        out["delta"] = DELTA_MAX * torch.sigmoid(expand(d, a["delta"]))
    if "w" in a:
        out["w"] = torch.exp(expand(d, a["w"]))
    if "aug" in a:
        out["aug"] = torch.sigmoid(expand(d, a["aug"]))
    if "aug_mag" in a:
        out["aug_mag"] = torch.sigmoid(expand(d, a["aug_mag"]))
    return out
