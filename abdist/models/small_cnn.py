"""A two-layer CNN for tiny images (8×8 digits): fast enough for tests and CPU smoke runs."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor


class SmallCNN(nn.Module):
    """Two 3×3 conv-BN-ReLU layers (32, 64 channels) and global average pooling → ``[B, 64]``.

    Padding 1 keeps the spatial size, so any input of at least 4×4 works; there is no pooling
    between the layers because 8×8 inputs have little resolution to spare. ReLUs are not
    in-place so the graph stays safe for the double backward of hypergradient steps.
    """

    def __init__(self, in_channels: int = 1, widths: tuple[int, int] = (32, 64)) -> None:
        super().__init__()
        c1, c2 = widths
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_dim = c2
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)
