"""Evaluation for the training loop: the confusion matrix of a split (each sample once), and the
tally of corrupt samples the streaming loaders skipped."""

from __future__ import annotations

import torch
from torch import nn

from abdist.metrics import confusion_matrix


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split,
    *,
    num_classes: int,
    batch_size: int,
    device,
    autocast,
    num_groups: int | None = None,
):
    """Confusion matrix of argmax(raw logits) over every sample of `split`, each counted once:
    [C, C], or one per group, [G, C, C], with `num_groups` (the split must carry groups)."""
    model.eval()
    shape = (num_groups, num_classes, num_classes) if num_groups else (num_classes, num_classes)
    conf = torch.zeros(shape, dtype=torch.long)  # a rank's slice may be empty
    for batch in split.batches(batch_size, shuffle=False, with_groups=bool(num_groups)):
        with autocast:
            logits = model(batch[0].to(device))
        groups = batch[2].cpu() if num_groups else None
        conf += confusion_matrix(logits.argmax(1).cpu(), batch[1].cpu(), num_classes, groups,
                                 num_groups)  # fmt: skip
    return conf


class BadSampleTally:
    """Corrupt samples the streaming loaders skipped, per pass and over all ranks.

    The loaders count every skip in this process (a sample once per pass); `since_last()` is the
    all-ranks count since the previous call, so each epoch's figure covers that epoch's passes
    only and a resumed run reports the same figures as an uninterrupted one. In-memory shards from
    which samples were skipped have one too (each full pass adds its split's skips); digits and
    undamaged shards have none, and the tally is then inactive.
    """

    def __init__(self, data, dist) -> None:
        self.data, self.dist = data, dist
        self.active = hasattr(data, "bad_sample_counts")
        self.seen = 0

    def since_last(self) -> dict[str, int]:
        if not self.active:
            return {}
        local = torch.tensor(self.data.bad_sample_counts.get("total", 0))
        total = int(self.dist.all_reduce_sum(local))
        new, self.seen = total - self.seen, total
        return {"bad_samples": new}
