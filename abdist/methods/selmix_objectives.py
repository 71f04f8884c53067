"""SelMix's non-decomposable objectives, as functions of the validation confusion matrix.

`C` is the joint confusion on validation, `C[i, j]` = share of samples of class i predicted j
(rows = true class, the whole matrix sums to 1), `pi = C.sum(1)` the class shares. Recall is
`r_i = C_ii / pi_i`; the class shares are data, not model, so `pi` is held constant when
differentiating (the gain's surrogate moves mass within a row, never between rows).

Each objective has
- `value(C)`: the figure itself (min recall is the exact minimum), what metrics.json reports;
- `surrogate(C)`: a smooth function whose gradient in `C` drives the gain; for every objective
  but the two min-type ones it is the value itself. min recall is the soft-min
  `-(1/eta) log sum_i exp(-eta r_i)`, whose gradient in `r` is the public code's multipliers
  `softmax(-eta r)`; min of head/tail mean recall is the same soft-min over the two means. The
  coverage objectives add `sum_j lam_j (cov_j - alpha/K)` to their base (`cov_j = sum_i C_ij`,
  the share predicted j), with `lam_j = max(lam_max (1 - exp((cov_j - alpha/K)/tau)), 0)`
  computed from `C` and held fixed, and divide by `max(lam) + 1` (the public code's closed form);
- `grad(C)`: d surrogate / dC (autograd), a [K, K] matrix.

Recalls in the geometric and harmonic means are floored at `eps` so that a class with zero
recall has a finite gradient (the public code clips the confusion at 1e-7 for the same reason).
Head/tail is by TRAINING count: the tail is the `tail_fraction` of classes with the fewest
training samples (at least one; ties by class index), not the last classes by index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from abdist.config_methods import SELMIX_OBJECTIVES
from abdist.errors import UserError

OBJECTIVES = SELMIX_OBJECTIVES  # the names `selmix.objective` accepts


def tail_classes(class_counts: Sequence[int], tail_fraction: float) -> Tensor:
    """bool [K]: the ceil(tail_fraction * K) classes with the fewest training samples (>= 1 and
    < K of them, so head and tail are both non-empty; ties broken by class index)."""
    k = len(class_counts)
    if k < 2:
        raise UserError("min_head_tail_recall needs at least 2 classes")
    n_tail = min(k - 1, max(1, math.ceil(tail_fraction * k)))
    order = sorted(range(k), key=lambda c: (class_counts[c], c))
    mask = torch.zeros(k, dtype=torch.bool)
    mask[order[:n_tail]] = True
    return mask


@dataclass
class Objective:
    """One objective and its surrogate's settings (see the module docstring)."""

    name: str
    eta: float = 50.0  # soft-min sharpness (min_recall, min_head_tail_recall)
    tail: Tensor | None = None  # bool [K] (min_head_tail_recall)
    alpha: float = 0.95  # coverage target alpha / K
    lambda_max: float = 100.0
    tau: float = 0.01
    eps: float = 1e-7

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise UserError(
                f"unknown SelMix objective {self.name!r}; one of {', '.join(OBJECTIVES)}"
            )
        if self.name == "min_head_tail_recall" and self.tail is None:
            raise ValueError("min_head_tail_recall needs the tail classes (tail_classes())")

    @property
    def base(self) -> str:
        """The objective without its coverage constraint."""
        return {"mean_recall_coverage": "mean_recall", "hmean_coverage": "hmean"}.get(
            self.name, self.name
        )

    # --- the figure -------------------------------------------------------------------------

    def value(self, C: Tensor) -> float:
        r = recalls(C)
        if self.base == "mean_recall":
            return float(r.mean())
        if self.base == "min_recall":
            return float(r.min())
        if self.base == "gmean":
            return float(r.clamp_min(0).log().mean().exp()) if bool((r > 0).all()) else 0.0
        if self.base == "hmean":
            return float(len(r) / (1 / r).sum()) if bool((r > 0).all()) else 0.0
        head, tail = r[~self.tail].mean(), r[self.tail].mean()
        return float(torch.minimum(head, tail))

    def coverage(self, C: Tensor) -> Tensor:
        """Share of validation samples predicted as each class (the coverage objectives' cov)."""
        return C.sum(0)

    # --- the smooth surrogate and its gradient ----------------------------------------------

    def surrogate(self, C: Tensor, multipliers: Tensor | None = None) -> Tensor:
        pi = C.sum(1).detach()
        r = torch.diagonal(C) / pi.clamp_min(self.eps)
        base = self.base
        if base == "mean_recall":
            m = r.mean()
        elif base == "min_recall":
            m = _soft_min(r, self.eta)
        elif base == "gmean":
            m = r.clamp_min(self.eps).log().mean().exp()
        elif base == "hmean":
            m = len(r) / (1 / r.clamp_min(self.eps)).sum()
        else:
            m = _soft_min(torch.stack([r[~self.tail].mean(), r[self.tail].mean()]), self.eta)
        if base == self.name:
            return m
        lam = self.multipliers(C) if multipliers is None else multipliers
        cov = C.sum(0)
        return (m + (lam * (cov - self.alpha / len(cov))).sum()) / (lam.max() + 1)

    def multipliers(self, C: Tensor) -> Tensor:
        """Coverage multipliers lam_j from the violation of cov_j >= alpha / K (held fixed)."""
        cov = C.detach().sum(0)
        slack = (cov - self.alpha / len(cov)) / self.tau
        return (self.lambda_max * (1 - torch.exp(slack))).clamp_min(0)

    def grad(self, C: Tensor) -> Tensor:
        """d surrogate / dC at C, [K, K] (coverage multipliers fixed at their value at C)."""
        with torch.enable_grad():  # also when called under no_grad (a refresh)
            leaf = C.detach().clone().requires_grad_(True)
            lam = self.multipliers(leaf) if self.base != self.name else None
            (g,) = torch.autograd.grad(self.surrogate(leaf, lam), leaf)
        return g


def recalls(C: Tensor) -> Tensor:
    """Per-class recall C_ii / sum_j C_ij (0 for a class absent from C)."""
    pi = C.sum(1)
    return torch.where(pi > 0, torch.diagonal(C) / pi.clamp_min(1e-30), torch.zeros_like(pi))


def _soft_min(x: Tensor, eta: float) -> Tensor:
    return -torch.logsumexp(-eta * x, dim=0) / eta
