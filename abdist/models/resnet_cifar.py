"""CIFAR ResNets of He et al. (2016), section 4.2: 3 stages × n BasicBlocks, widths 16/32/64.

Depth = 6n + 2 (resnet20: n=3, resnet32: n=5, ...). The classifier head is not part of this
module: it returns pooled 64-d features and :class:`abdist.models.Classifier` adds the head, so
the loss-learning code can swap or re-initialise heads without touching the backbone.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

DEPTHS = {"resnet8": 1, "resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}
WIDTHS = (16, 32, 64)


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters).

    A module rather than a lambda so models stay picklable (checkpoints, DDP spawn).
    """

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        half = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (option A) or 1×1-conv (option B) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = _PadShortcut(planes - in_planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet backbone mapping ``[B, in_channels, H, W]`` images to ``[B, 64]`` features."""

    def __init__(self, n: int, in_channels: int = 3, shortcut: str = "A") -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.conv1 = nn.Conv2d(in_channels, WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        layers = []
        in_planes = WIDTHS[0]
        for stage, planes in enumerate(WIDTHS):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.feature_dim = WIDTHS[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        # Adaptive pooling (not a fixed 8×8 window) so non-32px inputs also work.
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


def resnet_cifar(name: str, in_channels: int = 3, shortcut: str = "A") -> ResNetCifar:
    """Build the backbone for ``name`` in :data:`DEPTHS` (e.g. ``"resnet32"``)."""
    return ResNetCifar(DEPTHS[name], in_channels=in_channels, shortcut=shortcut)
