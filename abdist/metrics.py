"""Exact evaluation metrics for long-tailed and group-fair classification.

Everything is derived from integer counts (a confusion matrix, or per-group tallies), never from
running float averages, so results are exact, independent of batch size and order, and can be
summed across processes before any division happens.

Conventions used throughout:

* Confusion matrix rows are the TRUE class and columns the PREDICTED class.
* Per-class averages (balanced error, worst-class recall, G-/H-mean, shot buckets) are taken over
  the classes PRESENT in the evaluated set, i.e. classes with a nonzero confusion row. A class with
  no evaluation samples has no defined recall; counting it as 0 or 1 would silently bias every
  average, so it is reported as `None` in `per_class_recall` and left out of the averages.
* Many/medium/few-shot buckets follow the ImageNet-LT convention (Liu et al., 2019): many-shot
  classes have more than 100 TRAINING samples, few-shot fewer than 20, medium-shot the rest
  (20..100 inclusive). The thresholds are parameters; the bucket is decided by the class's training
  count, not by its count in the evaluated set.

Fairness over groups (per-group confusions) is in abdist/group_metrics.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "ConfusionAccumulator",
    "class_metrics",
    "as_index_tensor",
    "confusion_matrix",
]


# The scalar test metrics every run writes into metrics.json (what trackers and sweeps read).
SCALAR_METRICS = (
    "accuracy",
    "balanced_error",
    "worst_class_recall",
    "gmean_recall",
    "hmean_recall",
    "many_shot_accuracy",
    "medium_shot_accuracy",
    "few_shot_accuracy",
)
# ... and, when the data has group attributes, these (from group_confusion_metrics).
GROUP_SCALAR_METRICS = (
    "equal_opportunity_gap",
    "equalized_odds_gap",
    "demographic_parity_gap",
    "worst_group_accuracy",
)


def as_index_tensor(x: Any, what: str) -> torch.Tensor:
    """`x` as a flat int64 tensor; rejects floats so logits are never silently truncated."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if t.is_floating_point() or t.is_complex():
        raise ValueError(
            f"{what} must hold integer class indices, got dtype {t.dtype}; "
            "take logits.argmax(dim=-1) first"
        )
    # bool is accepted (binary tasks); int64 is what bincount and index arithmetic need.
    return t.reshape(-1).to(torch.long)


def _check_range(t: torch.Tensor, num_classes: int, what: str) -> None:
    """Raise ValueError unless every entry of `t` lies in [0, num_classes)."""
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what} contains {bad}, outside the valid range [0, {num_classes - 1}]")


def confusion_matrix(
    preds: Any, labels: Any, num_classes: int, groups: Any = None, num_groups: int | None = None
) -> torch.Tensor:
    """Count (true, predicted) pairs, optionally per group.

    Args:
        preds: predicted class indices, any shape (flattened); tensor or anything
            `torch.as_tensor` accepts. Must be integers (not logits).
        labels: true class indices, same number of elements as `preds`.
        num_classes: C, the number of classes.
        groups, num_groups: optional group ids in [0, G) (same number of elements) and G: then
            one confusion matrix per group.

    Returns:
        int64 tensor of shape [C, C] (with groups: [G, C, C]) on the device of `labels`, where
        entry [i, j] ([g, i, j]) counts samples of true class i (of group g) predicted as class j.

    Raises:
        ValueError: on non-integer inputs, mismatched sizes, or any label/prediction outside
            [0, C) (group outside [0, G)).
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    p = as_index_tensor(preds, "preds")
    y = as_index_tensor(labels, "labels")
    if p.numel() != y.numel():
        raise ValueError(f"preds has {p.numel()} elements but labels has {y.numel()}")
    p = p.to(y.device)
    # Out-of-range values would not fail in bincount; they would land in a neighbouring cell
    # (or grow the output), so they must be rejected up front.
    _check_range(y, num_classes, "labels")
    _check_range(p, num_classes, "preds")
    cell = y
    if groups is not None:
        g = as_index_tensor(groups, "groups").to(y.device)
        if g.numel() != y.numel() or num_groups is None:
            raise ValueError("groups needs num_groups and one id per label")
        _check_range(g, num_groups, "groups")
        cell = g * num_classes + y  # (group, true class) as one index
    cells = num_classes * (num_groups if groups is not None else 1)
    flat = torch.bincount(cell * num_classes + p, minlength=cells * num_classes)
    shape = (num_groups, num_classes, num_classes) if groups is not None else (num_classes,) * 2
    return flat.reshape(shape)


def _as_confusion(confusion: Any) -> torch.Tensor:
    """Validate a confusion matrix and return it as a CPU int64 tensor."""
    c = confusion if isinstance(confusion, torch.Tensor) else torch.as_tensor(confusion)
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"confusion must be a square [C, C] matrix, got shape {tuple(c.shape)}")
    # Allow float matrices that hold whole counts (e.g. after an all_reduce in float).
    if c.is_floating_point() and not torch.equal(c, c.round()):
        raise ValueError("confusion must hold whole-number counts")
    c = c.detach().to("cpu", torch.long)
    if c.numel() and int(c.min()) < 0:
        raise ValueError("confusion contains negative counts")
    return c


def _gmean(values: Sequence[float]) -> float:
    """Geometric mean; 0 as soon as one value is 0 (the log-sum would be -inf)."""
    if any(v == 0.0 for v in values):
        return 0.0
    # Sum of logs instead of a product: a product of many recalls < 1 underflows.
    return math.exp(math.fsum(math.log(v) for v in values) / len(values))


def _hmean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 as soon as one value is 0 (its reciprocal is infinite)."""
    if any(v == 0.0 for v in values):
        return 0.0
    return len(values) / math.fsum(1.0 / v for v in values)


def _mean_or_none(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def class_metrics(
    confusion: Any,
    class_counts: Sequence[int] | torch.Tensor | None = None,
    many_shot_min: int = 100,
    few_shot_max: int = 20,
) -> dict[str, Any]:
    """Accuracy and per-class summaries from a confusion matrix (rows = true class).

    Per-class averages use only classes PRESENT in the evaluated set (nonzero confusion row);
    absent classes have `None` recall and are excluded (see the module docstring for why).

    Args:
        confusion: [C, C] counts, e.g. from `confusion_matrix` or `ConfusionAccumulator`.
        class_counts: optional TRAINING-set sample count per class (length C). Enables the
            many/medium/few-shot accuracies.
        many_shot_min: classes with training count > this are many-shot (ImageNet-LT: 100).
        few_shot_max: classes with training count < this are few-shot (ImageNet-LT: 20); those
            with few_shot_max <= count <= many_shot_min are medium-shot.

    Returns:
        A JSON-serialisable dict of plain Python values:

        - `num_samples` (int), `accuracy` (float)
        - `per_class_recall`: list of C floats, `None` for absent classes
        - `balanced_error`: 1 - mean recall over present classes
        - `worst_class_recall`: min recall over present classes
        - `gmean_recall`, `hmean_recall`: geometric / harmonic mean of present-class recalls
          (0.0 when any present class has recall 0)
        - only when `class_counts` is given: `many_shot_accuracy`, `medium_shot_accuracy`,
          `few_shot_accuracy` -- mean recall over the present classes of the bucket, `None` when
          the bucket has no present class.

    Raises:
        ValueError: for a malformed matrix, an empty one (no samples: nothing is defined),
            `class_counts` of the wrong length or negative, or `few_shot_max > many_shot_min`.
    """
    c = _as_confusion(confusion)
    num_classes = c.shape[0]
    support = c.sum(dim=1).tolist()
    correct = c.diagonal().tolist()
    total = sum(support)
    if total == 0:
        raise ValueError("confusion matrix has no samples; metrics are undefined")

    recall: list[float | None] = [
        (tp / n) if n > 0 else None for tp, n in zip(correct, support, strict=True)
    ]
    present = [r for r in recall if r is not None]
    out: dict[str, Any] = {
        "num_samples": int(total),
        "accuracy": sum(correct) / total,
        "balanced_error": 1.0 - math.fsum(present) / len(present),
        "per_class_recall": recall,
        "worst_class_recall": min(present),
        "gmean_recall": _gmean(present),
        "hmean_recall": _hmean(present),
    }

    if class_counts is not None:
        if few_shot_max > many_shot_min:
            raise ValueError(
                f"few_shot_max ({few_shot_max}) must not exceed many_shot_min ({many_shot_min})"
            )
        counts = (
            class_counts.tolist() if isinstance(class_counts, torch.Tensor) else list(class_counts)
        )
        if len(counts) != num_classes:
            raise ValueError(
                f"class_counts has {len(counts)} entries but the confusion matrix has "
                f"{num_classes} classes"
            )
        if any(n < 0 for n in counts):
            raise ValueError("class_counts must be non-negative")
        many, medium, few = [], [], []
        for r, n in zip(recall, counts, strict=True):
            if r is None:
                continue
            if n > many_shot_min:
                many.append(r)
            elif n < few_shot_max:
                few.append(r)
            else:
                medium.append(r)
        out["many_shot_accuracy"] = _mean_or_none(many)
        out["medium_shot_accuracy"] = _mean_or_none(medium)
        out["few_shot_accuracy"] = _mean_or_none(few)
    return out


class ConfusionAccumulator:
    """Sums confusion matrices over batches (and, via `merge`, over processes or shards).

    Keeping integer counts rather than averaged metrics makes the final result exact and
    independent of how the evaluation set was split.

    Example:
        acc = ConfusionAccumulator(10)
        for x, y in loader:
            acc.update(model(x).argmax(-1), y)
        metrics = acc.compute(class_counts=train_counts)
    """

    def __init__(self, num_classes: int):
        """Start with an all-zero [num_classes, num_classes] matrix."""
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self._confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, preds: Any, labels: Any) -> None:
        """Add one batch of predicted and true class indices."""
        batch = confusion_matrix(preds, labels, self.num_classes)
        # Follow the data's device so GPU evaluation does not copy every batch to the host.
        if batch.device != self._confusion.device:
            self._confusion = self._confusion.to(batch.device)
        self._confusion += batch

    def merge(self, other: ConfusionAccumulator | torch.Tensor) -> ConfusionAccumulator:
        """Add another accumulator's counts (or a raw [C, C] count tensor) into this one.

        Returns self, so partial results can be folded: `reduce(ConfusionAccumulator.merge, ...)`.
        """
        if isinstance(other, ConfusionAccumulator):
            other_c = other._confusion
        else:
            other_c = _as_confusion(other)
        if tuple(other_c.shape) != (self.num_classes, self.num_classes):
            raise ValueError(
                f"cannot merge a {tuple(other_c.shape)} confusion matrix into a "
                f"{self.num_classes}-class accumulator"
            )
        self._confusion += other_c.to(self._confusion.device, torch.long)
        return self

    @property
    def confusion(self) -> torch.Tensor:
        """A copy of the accumulated [C, C] int64 matrix (rows = true, cols = predicted)."""
        return self._confusion.clone()

    def reset(self) -> None:
        """Zero the counts (e.g. at the start of each evaluation epoch)."""
        self._confusion.zero_()

    def compute(
        self, class_counts: Sequence[int] | torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """`class_metrics` of the accumulated matrix; kwargs are passed through."""
        return class_metrics(self._confusion, class_counts=class_counts, **kwargs)
