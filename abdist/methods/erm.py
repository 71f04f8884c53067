"""Empirical risk minimisation with a fixed parametric loss (CE, LA, LDAM-DRW, ... presets).

A method is the piece of the training loop that decides how a batch becomes a lower-level loss and
how its own hyperparameters change between steps. ERM's hyperparameters are fixed by its preset.
"""

from __future__ import annotations

import torch
from torch import nn

from abdist.losses import ParametricLoss


class ERM:
    name = "erm"

    def __init__(self, loss: ParametricLoss):
        self.loss = loss

    def on_epoch_start(self, epoch: int) -> None:
        # Schedules inside the loss (LDAM-DRW's deferred re-weighting) key off the epoch only, so a
        # resumed run that calls this again gets exactly the loss an uninterrupted run had.
        self.loss.set_epoch(epoch)

    def training_loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.loss(model(x).float(), y)  # g (the groups): no per-group loss here

    def after_step(self, step: int, model: nn.Module) -> dict:
        """Hook for methods that update hyperparameters between steps (AutoBalance). ERM: none."""
        return {}

    def loss_params(self) -> dict[str, list[float]]:
        return self.loss.per_class_params()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
