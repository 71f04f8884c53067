"""Models as ``backbone`` (images → features) + ``head`` (features → logits), built by name.

The split is explicit because the loss-learning methods work on the head separately (head-only
hypergradients, cosine heads, re-initialising the head for a retrain phase).
"""

from __future__ import annotations

import difflib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from abdist.errors import UserError
from abdist.models.resnet_cifar import DEPTHS, resnet_cifar
from abdist.models.small_cnn import SmallCNN

__all__ = ["Classifier", "CosineLinear", "create_model", "model_names"]

HEADS = ("linear", "cosine")
TV_PREFIX = "tv:"
# Attributes that hold the final classifier in torchvision models, in lookup order:
# fc (ResNet, RegNet, ShuffleNet, GoogLeNet, Inception), classifier (VGG, DenseNet, MobileNet,
# EfficientNet, ConvNeXt, MaxViT, MNASNet, AlexNet), head (Swin), heads (ViT).
_TV_HEAD_ATTRS = ("fc", "classifier", "head", "heads")


class CosineLinear(nn.Module):
    """Cosine-similarity head: ``normalize(x) @ normalize(W).T``, no bias; outputs in [-1, 1].

    Any temperature/scale belongs to the loss (e.g. LDAM's ``s``), so the head stays parameter-
    equivalent to a linear one.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # same init as nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()


class Classifier(nn.Module):
    """``forward(x) = head(backbone(x))``; ``features(x) = backbone(x)`` of size ``feature_dim``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feature_dim = feature_dim

    def features(self, x: Tensor) -> Tensor:
        """Backbone features ``[B, feature_dim]``."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def _tv_names() -> list[str]:
    import torchvision

    # module= restricts to classification models (not detection/segmentation/video).
    return torchvision.models.list_models(module=torchvision.models)


def model_names() -> list[str]:
    """Built-in model names; any ``tv:<name>`` torchvision classification model also works."""
    return ["small_cnn", *DEPTHS]


def _unknown(name: str, candidates: list[str], shown: list[str]) -> UserError:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return UserError(f"unknown model {name!r}; valid names: {', '.join(shown)}{hint}")


def _tv_backbone(tv_name: str, num_classes: int, in_channels: int, image_size: int):
    import torchvision

    names = _tv_names()
    if tv_name not in names:
        shown = [*model_names(), "tv:<torchvision name> (e.g. tv:resnet18)"]
        raise _unknown(TV_PREFIX + tv_name, [TV_PREFIX + n for n in names], shown)
    if in_channels != 3:
        raise UserError(
            f"torchvision model {tv_name!r} expects 3 input channels, got in_channels="
            f"{in_channels}; use small_cnn/resnet32 or convert images to RGB"
        )
    kwargs: dict = {}
    if tv_name.startswith("vit_"):
        # ViT's position embeddings are sized for image_size; the default 224 breaks on CIFAR.
        patch = int(tv_name.rsplit("_", 1)[1])
        if image_size % patch:
            raise UserError(
                f"{tv_name} needs image_size divisible by its patch size {patch}, got {image_size}"
            )
        kwargs["image_size"] = image_size
    if tv_name in ("googlenet", "inception_v3"):
        # Auxiliary heads return tuples in train mode, which the trainer does not expect.
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True  # silences the "default init will change" warning
    model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
    for attr in _TV_HEAD_ATTRS:
        layer = getattr(model, attr, None)
        if isinstance(layer, nn.Linear):
            setattr(model, attr, nn.Identity())
            return model, layer.in_features
        if isinstance(layer, nn.Sequential) and len(layer) and isinstance(layer[-1], nn.Linear):
            feature_dim = layer[-1].in_features
            layer[len(layer) - 1] = nn.Identity()  # keep the pre-logit layers (norm, dropout)
            return model, feature_dim
    raise UserError(
        f"cannot split torchvision model {tv_name!r}: no final nn.Linear in "
        f"{'/'.join(_TV_HEAD_ATTRS)}; pick another model"
    )


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    head: str = "linear",
) -> Classifier:
    """Build a :class:`Classifier` by name.

    Names: ``small_cnn`` (tiny images such as 8×8 digits), ``resnet8/20/32/44/56`` (CIFAR ResNets,
    option-A shortcuts), and ``tv:<name>`` for any torchvision classification model (random init,
    3 input channels only). ``head`` is ``"linear"`` (``nn.Linear``) or ``"cosine"``
    (:class:`CosineLinear`). Bad names or arguments raise ``UserError``.
    """
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{arg} must be a positive integer, got {value!r}")
    if not isinstance(name, str):
        raise UserError(f"model name must be a string such as 'resnet32', got {name!r}")
    if head not in HEADS:
        raise UserError(f"unknown head {head!r}; use one of {', '.join(HEADS)}")

    if name == "small_cnn":
        if image_size < 4:
            raise UserError(f"small_cnn needs image_size >= 4, got {image_size}")
        backbone: nn.Module = SmallCNN(in_channels)
        feature_dim = backbone.feature_dim
    elif name in DEPTHS:
        backbone = resnet_cifar(name, in_channels)
        feature_dim = backbone.feature_dim
    elif name.startswith(TV_PREFIX):
        backbone, feature_dim = _tv_backbone(
            name[len(TV_PREFIX) :], num_classes, in_channels, image_size
        )
    else:
        # A bare torchvision name ("resnet18") is a likely slip; offer its tv: form too.
        candidates = model_names() + [TV_PREFIX + n for n in _tv_names()]
        if name in _tv_names():
            raise UserError(f"unknown model {name!r}; did you mean 'tv:{name}'?")
        shown = [*model_names(), "tv:<torchvision name>"]
        raise _unknown(name, candidates, shown)

    head_layer = (
        nn.Linear(feature_dim, num_classes)
        if head == "linear"
        else CosineLinear(feature_dim, num_classes)
    )
    return Classifier(backbone, head_layer, feature_dim)
