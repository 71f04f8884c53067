"""Empirical risk minimisation with a fixed parametric loss (CE, LA, LDAM-DRW, ... presets).

ERM's loss parameters are fixed by its preset; nothing happens between steps. Its augmentation is
the configured one, the same for every class (`data.augment_ops` at `data.augment_prob` and
`data.augment_magnitude`: the control for AutoBalance's tuned per-class values). With
`loss.sample_weights` each sample's loss is weighted by 1/n(class) or 1/n(group, class) (the
group-balanced reweighting baseline).
"""

from __future__ import annotations

import torch
from torch import nn

from abdist.losses import ParametricLoss
from abdist.methods.protocol import Batch, MethodSpec, SetupContext
from abdist.methods.registry import register


class ERM:
    name = "erm"

    def __init__(self, loss: ParametricLoss, augment=None, class_counts=(), weighted=False):
        self.loss = loss
        self.augment = augment
        self.class_counts = list(class_counts)
        # loss.sample_weights: batches then carry per-sample weights (mean 1 over train).
        self.needs = frozenset({"weights"} if weighted else ())

    @classmethod
    def build(cls, ctx: SetupContext) -> ERM:
        loss = ParametricLoss(ctx.loss_spec).to(ctx.device)
        weighted = ctx.cfg.loss.sample_weights != "none"
        return cls(loss, ctx.augment, ctx.data.class_counts, weighted)

    def train_augment(self):
        return self.augment

    def on_epoch_start(self, epoch: int) -> None:
        # Schedules inside the loss (LDAM-DRW's deferred re-weighting) key off the epoch only, so a
        # resumed run that calls this again gets exactly the loss an uninterrupted run had.
        self.loss.set_epoch(epoch)

    def training_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch.x).float()
        if batch.weights is None:
            return self.loss(logits, batch.y)
        # A plain mean of w_i·ℓ_i (the weights have mean 1 over train): ranks' means average to
        # the global batch's loss. The preset's class weights, if any, stay inside ℓ_i.
        return (self.loss(logits, batch.y, reduction="none") * batch.weights).mean()

    def before_step(self, step: int, module: nn.Module, lr: float) -> None:
        pass

    def after_step(self, step: int, module: nn.Module) -> dict:
        return {}

    def artifacts(self) -> dict:
        # The preset's per-class vectors, so every run's report can plot its loss parameters.
        return {"alpha.json": {"class_counts": self.class_counts, **self.loss.per_class_params()}}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


SPEC = register(MethodSpec("erm", ERM.build))
