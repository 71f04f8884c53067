"""Model construction by name, backbone/head split and output shapes."""

import pytest
import torch
import torch.nn as nn

from abdist.errors import UserError
from abdist.models import Classifier, CosineLinear, create_model


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_small_cnn_digits_shapes():
    model = create_model("small_cnn", 10, in_channels=1, image_size=8)
    x = torch.randn(4, 1, 8, 8)
    assert model(x).shape == (4, 10)
    assert model.features(x).shape == (4, model.feature_dim) == (4, 64)
    assert model(torch.randn(2, 1, 4, 4)).shape == (2, 10)  # smallest supported size


def test_resnet32_shape_and_size():
    model = create_model("resnet32", 10)
    assert isinstance(model, Classifier)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert 0.44e6 <= _n_params(model) <= 0.48e6
    # Option-A shortcuts add no parameters: every conv is 3×3 (plus none for shortcuts).
    assert all(m.kernel_size == (3, 3) for m in model.modules() if isinstance(m, nn.Conv2d))


def test_resnet_depths_parameter_counts():
    # He et al. 2016, table 6: resnet20 0.27M, resnet56 0.85M.
    assert 0.26e6 <= _n_params(create_model("resnet20", 10)) <= 0.28e6
    assert 0.84e6 <= _n_params(create_model("resnet56", 10)) <= 0.86e6
    model = create_model("resnet8", 3, in_channels=1)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_torchvision_resnet18():
    model = create_model("tv:resnet18", 7)
    assert isinstance(model.backbone.fc, nn.Identity)
    assert model.feature_dim == 512
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_torchvision_sequential_classifier():
    model = create_model("tv:mobilenet_v3_small", 5).eval()
    assert isinstance(model.backbone.classifier[-1], nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_torchvision_rejects_non_rgb():
    with pytest.raises(UserError, match="in_channels"):
        create_model("tv:resnet18", 7, in_channels=1)


def test_cosine_head_bounded():
    model = create_model("small_cnn", 6, in_channels=1, image_size=8, head="cosine")
    assert isinstance(model.head, CosineLinear)
    assert not any("bias" in n for n, _ in model.head.named_parameters())
    out = model(torch.randn(8, 1, 8, 8) * 100)
    assert out.shape == (8, 6)
    assert out.abs().max() <= 1.0 + 1e-5


def test_unknown_name_suggests_closest():
    with pytest.raises(UserError, match=r"did you mean 'resnet32'") as err:
        create_model("resnet33", 10)
    assert "small_cnn" in str(err.value)  # lists the valid names
    with pytest.raises(UserError, match=r"did you mean 'tv:resnet18'"):
        create_model("tv:resnet19", 10)
    with pytest.raises(UserError, match=r"did you mean 'tv:resnet18'"):
        create_model("resnet18", 10)


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_classes=0), dict(head="mlp"), dict(image_size=2), dict(in_channels=0)],
)
def test_bad_arguments(kwargs):
    args = dict(name="small_cnn", num_classes=10, in_channels=1, image_size=8) | kwargs
    with pytest.raises(UserError):
        create_model(**args)
