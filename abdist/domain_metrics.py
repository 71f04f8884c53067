"""Fairness figures over domains (groups) for multi-class data, from one confusion matrix per group
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

from typing import Any

import torch


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
