"""The network's optimiser and its learning-rate schedule (per optimiser step)."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, total_steps: int, steps_per_epoch: int, optim_cfg) -> float:
    """Multiplier of the base lr at optimiser step `step` (0-based): linear warm-up, then decay."""
    warmup = int(round(optim_cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if optim_cfg.schedule == "constant":
        return 1.0
    if optim_cfg.schedule == "step":
        epoch = step / steps_per_epoch
        return optim_cfg.gamma ** sum(epoch >= m for m in optim_cfg.milestones)
    progress_ = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
