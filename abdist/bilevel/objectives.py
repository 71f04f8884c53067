"""Differentiable validation objectives (upper-level losses) for AutoBalance-style searches.

All objectives take RAW logits f_θ(x): the loss parameters α (l, Δ, w) only shape training, and
predictions at test time are argmax f_θ(x), so the validation surrogate must judge the raw model.
(α still influences these objectives through θ*(α); their direct derivative in α is zero.)

Per-class quantities are averaged over the classes PRESENT in the batch only (as in
`abdist.metrics`): a class with no validation sample has no defined loss, and counting it as 0
would bias every average. Everything is written with masks rather than boolean indexing, so the
functions stay differentiable under torch.func transforms and never produce NaN gradients for
absent classes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "OBJECTIVES",
    "Objective",
    "balanced_ce",
    "blend",
    "cross_entropy",
    "equal_opportunity_gap",
    "get_objective",
    "per_class_ce",
    "worst_class",
]


def _check(logits: Tensor, y: Tensor, num_classes: int | None = None) -> Tensor:
    """Validate shapes; return logits in a dtype where log-softmax keeps tail probabilities."""
    if logits.dim() != 2 or y.shape != logits.shape[:1]:
        raise ValueError(f"need logits [B, C] and y [B], got {list(logits.shape)}, {list(y.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("empty validation batch: the objective is undefined")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} classes, expected {num_classes}")
    # Half-precision log-softmax loses the small probabilities that tail classes live on.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _masked_mean_by(values: Tensor, index: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """(mean of `values` per index in 0..size-1, mask of indices that occur)."""
    total = values.new_zeros(size).index_add(0, index, values)
    count = torch.bincount(index, minlength=size)[:size]
    present = count > 0
    # clamp: absent entries become 0/1 = 0 (finite, zero gradient) instead of 0/0 = NaN.
    return total / count.clamp(min=1).to(values.dtype), present


def _soft_max(values: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """T · logsumexp(v_i / T) over entries with mask_i; max_i v_i <= result <= max + T·log m."""
    z = torch.where(mask, values / temperature, torch.full_like(values, -math.inf))
    return temperature * torch.logsumexp(z, dim=0)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def per_class_ce(logits: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class mean cross-entropy L_c = mean_{i: y_i = c} −log softmax(z_i)_c, and the mask of
    present classes. Absent classes get L_c = 0 (masked out by every objective below)."""
    logits = _check(logits, y, num_classes)
    ce = F.cross_entropy(logits, y, reduction="none")
    return _masked_mean_by(ce, y, num_classes)


def cross_entropy(logits: Tensor, y: Tensor, num_classes: int | None = None) -> Tensor:
    """Plain mean cross-entropy (1/B) Σ_i −log softmax(z_i)_{y_i}: the average-error surrogate."""
    return F.cross_entropy(_check(logits, y, num_classes), y)


def balanced_ce(logits: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """Balanced cross-entropy (1/|P|) Σ_{c ∈ P} L_c, P = classes present in y.

    A smooth surrogate of the balanced error 1 − mean_c recall_c: every present class counts
    equally however many validation samples it has. On a class-balanced batch it equals plain
    CE; on an imbalanced one it equals the inverse-frequency-weighted CE of the authors' code.
    """
    per_class, present = per_class_ce(logits, y, num_classes)
    return (per_class * present).sum() / present.sum()


def worst_class(logits: Tensor, y: Tensor, num_classes: int, temperature: float = 0.1) -> Tensor:
    """Smooth worst-class loss T · log Σ_{c ∈ P} exp(L_c / T) (a log-sum-exp soft maximum).

    It is an upper bound of max_c L_c with max_c L_c <= value <= max_c L_c + T·log|P|, so it tends
    to the worst-class CE as T → 0 and is smooth for T > 0. Its gradient is the
    softmax(L/T)-weighted average of the per-class gradients, concentrating on the worst classes
    as T shrinks. (Subtracting T·log|P| would give the log-mean-exp, a lower bound that tends to
    the balanced CE as T → ∞; it differs by a constant, so the gradient is the same.)
    """
    _check_temperature(temperature)
    per_class, present = per_class_ce(logits, y, num_classes)
    return _soft_max(per_class, present, temperature)


def blend(logits: Tensor, y: Tensor, num_classes: int, beta: float = 0.5) -> Tensor:
    """(1 − β) · balanced_ce + β · cross_entropy, β ∈ [0, 1]: trades balanced for average error."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    logits = _check(logits, y, num_classes)
    ce = F.cross_entropy(logits, y, reduction="none")
    per_class, present = _masked_mean_by(ce, y, num_classes)
    bal = (per_class * present).sum() / present.sum()
    return (1.0 - beta) * bal + beta * ce.mean()


def equal_opportunity_gap(
    logits: Tensor,
    y: Tensor,
    groups: Tensor,
    positive_class: int = 1,
    temperature: float = 0.1,
    *,
    num_groups: int | None = None,
    ce_weight: float = 0.0,
) -> Tensor:
    """Smooth equal-opportunity gap between groups, plus optionally ce_weight · plain CE.

    Equal opportunity compares true-positive rates TPR_g = P(ŷ = p | y = p, group = g) across
    groups (p = positive_class). As a differentiable stand-in for TPR_g we use

        s_g = mean_{i: y_i = p, a_i = g} log softmax(z_i)_p      (<= 0; higher ~ higher TPR)

    over the groups G present among positive samples, and the soft range

        gap = T·log Σ_{g∈G} exp(s_g / T) + T·log Σ_{g∈G} exp(−s_g / T)
            = softmax_T(s) − softmin_T(s),

    which is >= max_g s_g − min_g s_g (the hard gap), exceeds it by at most 2·T·log|G|, and tends
    to it as T → 0. With two groups and T → 0 it is |s_a − s_b|. It is 0 when fewer than two
    groups have positive samples (no gap can be measured). Minimising the gap alone can make all
    groups equally bad; ce_weight > 0 adds ce_weight · (plain mean CE over the whole batch).

    groups: [B] integer group ids in 0..num_groups-1 (num_groups defaults to max id + 1).
    """
    _check_temperature(temperature)
    logits = _check(logits, y)
    if groups.shape != y.shape:
        raise ValueError(
            f"groups must have the shape of y {list(y.shape)}, got {list(groups.shape)}"
        )
    groups = groups.long()
    g = int(num_groups) if num_groups is not None else int(groups.max()) + 1
    is_pos = y == positive_class
    logp = logits.log_softmax(dim=1)[:, positive_class]
    # Negatives are routed to an extra slot g, which is dropped, so shapes stay static.
    slot = torch.where(is_pos, groups, torch.full_like(groups, g))
    s, present = _masked_mean_by(logp, slot, g + 1)
    s, present = s[:g], present[:g]
    if int(present.sum()) < 2:
        gap = logits.sum() * 0.0  # keeps the graph (and dtype/device) of a real objective
    else:
        gap = _soft_max(s, present, temperature) + _soft_max(-s, present, temperature)
    if ce_weight:
        gap = gap + ce_weight * F.cross_entropy(logits, y)
    return gap


_CLASS_OBJECTIVES: dict[str, Callable[..., Tensor]] = {
    "ce": cross_entropy,
    "balanced_ce": balanced_ce,
    "worst_class": worst_class,
    "blend": blend,
}
_GROUP_OBJECTIVES: dict[str, Callable[..., Tensor]] = {
    "equal_opportunity_gap": equal_opportunity_gap,
}
OBJECTIVES: dict[str, Callable[..., Tensor]] = {**_CLASS_OBJECTIVES, **_GROUP_OBJECTIVES}


@dataclass(frozen=True)
class Objective:
    """A configured objective with one calling convention: obj(logits, y, groups=None).

    Class objectives ignore `groups`; group objectives (needs_groups=True) require it.
    """

    name: str
    fn: Callable[..., Tensor]
    kwargs: dict[str, Any] = field(default_factory=dict)
    needs_groups: bool = False

    def __call__(self, logits: Tensor, y: Tensor, groups: Tensor | None = None) -> Tensor:
        if self.needs_groups:
            if groups is None:
                raise ValueError(f"objective {self.name!r} needs group ids (groups=...)")
            return self.fn(logits, y, groups, **self.kwargs)
        return self.fn(logits, y, **self.kwargs)


def get_objective(name: str, **kwargs: Any) -> Objective:
    """Look up an objective by name and bind its settings, e.g.
    get_objective("worst_class", num_classes=10, temperature=0.05)(logits, y).

    Names: see OBJECTIVES. Unknown names and unknown keyword arguments raise ValueError now
    rather than at the first validation step.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    fn = OBJECTIVES[name]
    params = inspect.signature(fn).parameters
    settings = {k: p for k, p in params.items() if k not in ("logits", "y", "groups")}
    unknown = set(kwargs) - set(settings)
    if unknown:
        raise ValueError(f"objective {name!r} got unexpected settings {sorted(unknown)}")
    missing = [k for k, p in settings.items() if p.default is p.empty and k not in kwargs]
    if missing:
        raise ValueError(f"objective {name!r} needs settings {missing}")
    return Objective(name, fn, dict(kwargs), needs_groups=name in _GROUP_OBJECTIVES)
