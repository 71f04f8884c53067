"""Fairness over groups, from one confusion matrix per group ([G, C, C] integer counts, rows =
true class; summable over batches and ranks, so every figure is exact).

`group_metrics` / `group_confusion_metrics`: per-group accuracy and the binary fairness gaps of
one positive class (equal opportunity, demographic parity, equalized odds), as fairlearn defines
them. `domain_metrics`: the multi-class figures over domains that CIFAR-10S reports.

Fairness figures over domains (groups) for multi-class data, from one confusion matrix per group
([G, C, C] integer counts, rows = true class): what CIFAR-10S (Wang et al., CVPR 2020) reports,
plus per-class equal opportunity.

- `domain_accuracy` {g: accuracy on group g's samples}; `mean_domain_accuracy` their mean.
- `class_domain_recall` {g: [recall of class c within group g, or None without samples]}.
- `eo_gap_per_class` [max_g - min_g of class c's recall, over the groups that have class c
  (None if none)], and `max_eo_gap` the largest: equal opportunity with every class in turn as
  the positive one.
- `bias`: for each predicted class c (with at least one prediction), how far the share of its
  predictions that come from group g is from g's share of the samples, the largest over g;
  averaged over those classes. With two domains of equal size (CIFAR-10S's test set: every image
  once in colour and once in grayscale) this is Wang et al.'s |share from grayscale - 0.5|.
- `worst_cell_accuracy`: the lowest recall over the (group, class) cells that have samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from abdist.metrics import as_index_tensor, confusion_matrix


def _gap(values: dict[int, float | None]) -> float | None:
    """max - min over the defined values; None when no group defines the rate."""
    defined = [v for v in values.values() if v is not None]
    return (max(defined) - min(defined)) if defined else None


def group_metrics(preds: Any, labels: Any, groups: Any, positive_class: int = 1) -> dict[str, Any]:
    """Per-group accuracy and fairness gaps.

    Groups are the distinct values in `groups`; a group with no samples simply does not appear.
    The positive class is treated one-vs-rest, so this also works for multi-class labels.

    Args:
        preds: predicted class indices (integers, any shape; flattened).
        labels: true class indices, same number of elements.
        groups: integer group id per sample (e.g. a sensitive attribute), same number of elements.
        positive_class: the class whose TPR / FPR / positive rate the fairness gaps compare.

    Returns:
        A JSON-serialisable dict (group ids are int keys):

        - `group_size`, `group_accuracy`: {group: value}
        - `worst_group_accuracy`: min group accuracy
        - `group_tpr`: {group: P(pred=pos | label=pos, group)}, `None` if the group has no positives
        - `group_fpr`: {group: P(pred=pos | label!=pos, group)}, `None` if it has no negatives
        - `group_positive_rate`: {group: P(pred=pos | group)}
        - `equal_opportunity_gap`: max - min TPR over groups where TPR is defined
        - `demographic_parity_gap`: max - min positive rate over groups
        - `equalized_odds_gap`: max(TPR gap, FPR gap)

        Gaps are `None` when no group defines the rate (with one group they are 0.0).

    Raises:
        ValueError: on non-integer inputs, mismatched sizes, or an empty input.
    """
    p = as_index_tensor(preds, "preds").cpu()
    y = as_index_tensor(labels, "labels").cpu()
    g = as_index_tensor(groups, "groups").cpu()
    if not (p.numel() == y.numel() == g.numel()):
        raise ValueError(
            f"preds, labels and groups must have the same number of elements, got "
            f"{p.numel()}, {y.numel()}, {g.numel()}"
        )
    if p.numel() == 0:
        raise ValueError("group_metrics needs at least one sample")

    num_classes = int(max(int(p.max()), int(y.max()), positive_class)) + 1
    ids, cell = torch.unique(g, return_inverse=True)  # any integer ids -> 0..G-1
    confusions = confusion_matrix(p, y, num_classes, groups=cell, num_groups=len(ids))
    return group_confusion_metrics(confusions, positive_class, group_ids=ids.tolist())


def group_confusion_metrics(
    confusions: Any, positive_class: int = 1, group_ids: Sequence[int] | None = None
) -> dict[str, Any]:
    """`group_metrics` from one [C, C] confusion matrix per group ([G, C, C] integer counts,
    summable over batches and processes); group g is reported as ``group_ids[g]`` (default g).
    Groups without samples do not appear."""
    conf = torch.as_tensor(confusions).long().cpu()
    if conf.dim() != 3 or conf.shape[1] != conf.shape[2]:
        raise ValueError(f"confusions must be [G, C, C], got {list(conf.shape)}")
    if not 0 <= positive_class < conf.shape[1]:
        raise ValueError(f"positive_class {positive_class} outside [0, {conf.shape[1]})")
    ids = list(range(len(conf))) if group_ids is None else [int(i) for i in group_ids]
    size: dict[int, int] = {}
    acc: dict[int, float] = {}
    tpr: dict[int, float | None] = {}
    fpr: dict[int, float | None] = {}
    pos_rate: dict[int, float] = {}
    for gid, c in zip(ids, conf, strict=True):
        n = int(c.sum())
        if n == 0:
            continue
        n_pos = int(c[positive_class].sum())  # rows: true class
        n_neg = n - n_pos
        tp = int(c[positive_class, positive_class])
        pred_pos = int(c[:, positive_class].sum())
        size[gid] = n
        acc[gid] = int(c.trace()) / n
        pos_rate[gid] = pred_pos / n
        tpr[gid] = tp / n_pos if n_pos else None
        fpr[gid] = (pred_pos - tp) / n_neg if n_neg else None
    if not size:
        raise ValueError("group_confusion_metrics needs at least one sample")

    eo_gap = _gap(tpr)
    fpr_gap = _gap(fpr)
    odds = [v for v in (eo_gap, fpr_gap) if v is not None]
    return {
        "group_size": size,
        "group_accuracy": acc,
        "worst_group_accuracy": min(acc.values()),
        "group_tpr": tpr,
        "group_fpr": fpr,
        "group_positive_rate": pos_rate,
        "equal_opportunity_gap": eo_gap,
        "demographic_parity_gap": _gap(pos_rate),
        "equalized_odds_gap": max(odds) if odds else None,
    }


def domain_metrics(confusions: Any, group_ids: list[int] | None = None) -> dict[str, Any]:
    conf = torch.as_tensor(confusions).long().cpu()
    if conf.dim() != 3 or conf.shape[1] != conf.shape[2]:
        raise ValueError(f"confusions must be [G, C, C], got {list(conf.shape)}")
    G, C = conf.shape[0], conf.shape[1]
    ids = list(range(G)) if group_ids is None else [int(i) for i in group_ids]
    size = conf.sum((1, 2))
    if int(size.sum()) == 0:
        raise ValueError("domain_metrics needs at least one sample")
    present = [g for g in range(G) if size[g] > 0]
    accuracy = {ids[g]: int(conf[g].trace()) / int(size[g]) for g in present}
    rows = conf.sum(2)  # [G, C]: samples of class c in group g
    recall: dict[int, list[float | None]] = {}
    for g in present:
        recall[ids[g]] = [
            int(conf[g, c, c]) / int(rows[g, c]) if rows[g, c] > 0 else None for c in range(C)
        ]
    gaps: list[float | None] = []
    for c in range(C):
        values = [r[c] for r in recall.values() if r[c] is not None]
        gaps.append(max(values) - min(values) if values else None)
    defined = [v for v in gaps if v is not None]
    predicted = conf.sum(1)  # [G, C]: predictions of class c among group g's samples
    share = size.double() / size.sum()
    per_class = [
        float((predicted[:, c].double() / predicted[:, c].sum() - share)[present].abs().max())
        for c in range(C)
        if predicted[:, c].sum() > 0
    ]
    cells = [v for r in recall.values() for v in r if v is not None]
    return {
        "domain_accuracy": accuracy,
        "mean_domain_accuracy": sum(accuracy.values()) / len(accuracy),
        "class_domain_recall": recall,
        "eo_gap_per_class": gaps,
        "max_eo_gap": max(defined) if defined else None,
        "bias": sum(per_class) / len(per_class),
        "worst_cell_accuracy": min(cells),
    }
