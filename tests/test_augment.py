"""Class-aware augmentation: semantics against torchvision v2, per-class strengths, shared table."""

from __future__ import annotations

import pickle

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from abdist.data.augment import OPS, AugmentTable, ClassAwareAugment, RandomCropFlip
from abdist.errors import UserError


def _reference(x: torch.Tensor, p, i: int) -> torch.Tensor:
    """Sample i of the chain, op by op, with torchvision.transforms.v2.functional."""
    out = x
    angle, (tx, ty) = float(p.angle[i]), p.translate[i].tolist()
    if angle != 0 or tx or ty:
        out = TF.affine(
            out,
            angle=angle,
            translate=[tx, ty],
            scale=1.0,
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.NEAREST,
            fill=0,
        )
    if p.brightness[i] != 1:
        out = TF.adjust_brightness(out, float(p.brightness[i]))
    if p.contrast[i] != 1:
        out = TF.adjust_contrast(out, float(p.contrast[i]))
    if p.flip[i]:
        out = TF.horizontal_flip(out)
    top, left, h, w = p.cutout[i].tolist()
    if h > 0:
        out = TF.erase(out, top, left, h, w, torch.tensor(0.0))
    return out


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.numerics
def test_chain_matches_torchvision_v2_sample_by_sample(channels):
    g = torch.Generator().manual_seed(0)
    table = AugmentTable(4, magnitude=[0.2, 0.5, 0.8, 1.0], probability=0.9)
    aug = ClassAwareAugment(table, num_ops=3)
    x = torch.rand(256, channels, 16, 12, generator=g)
    y = torch.randint(0, 4, (256,), generator=g)
    params = aug.sample_params(y, 16, 12, g)
    out = aug.apply(x, params)
    assert params.chosen.any(0).all()  # every op was exercised
    for i in range(len(x)):
        # torchvision's blends round differently: measured <= 1.2e-7 (1 ulp) on every
        # `make test-portable` setting; a wrong op or factor is off by >= 1/255.
        torch.testing.assert_close(out[i], _reference(x[i], params, i), atol=2e-6, rtol=0)
    torch.testing.assert_close(x, x.clamp(0, 1))  # the input was not modified in place


def test_probability_zero_or_magnitude_zero_is_the_identity():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    for m, p in ((1.0, 0.0), (0.0, 1.0)):
        aug = ClassAwareAugment(AugmentTable(3, magnitude=m, probability=p))
        assert torch.equal(aug(x, y, g), x)
    # uint8 input comes back as float in [0, 1]
    aug = ClassAwareAugment(AugmentTable(3))
    xu = (x * 255).to(torch.uint8)
    assert torch.equal(aug(xu, y, g), xu.float() / 255)


def test_per_class_probability_and_op_choice():
    g = torch.Generator().manual_seed(2)
    table = AugmentTable(3, magnitude=0.5, probability=[0.0, 0.3, 1.0])
    aug = ClassAwareAugment(table, num_ops=2)
    y = torch.arange(3).repeat(3000)
    p = aug.sample_params(y, 32, 32, g)
    rate = [p.applied[y == c].float().mean().item() for c in range(3)]
    assert rate[0] == 0 and rate[2] == 1 and abs(rate[1] - 0.3) < 0.04
    assert torch.equal(p.chosen.sum(1), torch.where(p.applied, 2, 0))  # 2 distinct ops or none
    freq = p.chosen[p.applied].float().mean(0)  # each op picked 2/6 of the time
    assert torch.allclose(freq, torch.full((len(OPS),), 1 / 3), atol=0.03)


@pytest.mark.parametrize(
    "m, angle, shift, factor, cut", [(1.0, 30.0, 14, 0.9, 16), (0.5, 15.0, 7, 0.45, 8)]
)
@pytest.mark.numerics
def test_magnitude_maps_to_documented_op_strengths(m, angle, shift, factor, cut):
    g = torch.Generator().manual_seed(3)
    aug = ClassAwareAugment(AugmentTable(1, magnitude=m, probability=1.0), num_ops=6)
    p = aug.sample_params(torch.zeros(2000, dtype=torch.long), 32, 32, g)
    assert set(p.angle.abs().tolist()) == {angle}
    assert set(p.translate.abs().amax(1).tolist()) == {shift}  # floor(150/331 * m * 32)
    assert torch.all((p.translate != 0).sum(1) == 1)  # one axis at a time
    # measured <= 1.3e-7 relative on every `make test-portable` setting
    assert torch.allclose((p.brightness - 1).abs(), torch.tensor(factor))
    assert torch.allclose((p.contrast - 1).abs(), torch.tensor(factor))
    assert abs(p.flip.float().mean().item() - m) < 0.04  # mirrored with probability m
    inner = p.cutout[(p.cutout[:, 0] > 0) & (p.cutout[:, 1] > 0)]
    inner = inner[(inner[:, 0] + inner[:, 2] < 32) & (inner[:, 1] + inner[:, 3] < 32)]
    assert len(inner) and torch.all(inner[:, 2:] == cut)  # unclipped holes are L x L


def test_same_generator_state_same_augmentation():
    table = AugmentTable(2, magnitude=0.7, probability=0.6)
    aug = ClassAwareAugment(table)
    x = torch.rand(32, 3, 8, 8)
    y = torch.randint(0, 2, (32,))
    a = aug(x, y, torch.Generator().manual_seed(5))
    b = aug(x, y, torch.Generator().manual_seed(5))
    c = aug(x, y, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    single = aug(x[0], int(y[0]), torch.Generator().manual_seed(5))  # one [C, H, W] sample
    assert single.shape == (3, 8, 8)


def _pad_and_crop(x, pad, generator):
    """The textbook crop + flip, sample by sample: zero-pad, cut at (dy, dx), mirror on a coin;
    the draws in RandomCropFlip's documented order (dy [B], dx [B], coins [B])."""
    b, _, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    mirror = torch.rand(b, generator=generator) < 0.5
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    return torch.where(mirror[:, None, None, None], out.flip(-1), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_random_crop_flip_is_pad_crop_and_mirror(dtype):
    x = (torch.rand(64, 3, 10, 10) * 255).to(dtype)
    a = _pad_and_crop(x, 4, torch.Generator().manual_seed(9))
    b = RandomCropFlip(4, flip=True)(x, None, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    again = pickle.loads(pickle.dumps(RandomCropFlip(4)))  # spawned workers need this
    assert torch.equal(again(x, None, torch.Generator().manual_seed(9)), b)


def test_table_validates_and_round_trips():
    table = AugmentTable(3)
    assert torch.equal(table.magnitude, torch.zeros(3))
    table.set(magnitude=[0.1, 0.2, 0.3])
    table.set(probability=0.5)
    assert torch.allclose(table.magnitude, torch.tensor([0.1, 0.2, 0.3]))
    assert torch.equal(table.probability, torch.full((3,), 0.5))
    for bad in ([0.1, 0.2], [0.1, 1.5, 0.2], float("nan"), -0.1):
        with pytest.raises(UserError):
            table.set(magnitude=bad)
    assert torch.allclose(table.magnitude, torch.tensor([0.1, 0.2, 0.3]))  # unchanged
    other = AugmentTable(3)
    other.load_state_dict(table.state_dict())
    assert torch.equal(other.magnitude, table.magnitude)
    with pytest.raises(UserError, match="num_ops"):
        ClassAwareAugment(table, num_ops=0)
    assert ClassAwareAugment(table, num_ops=7).num_ops == len(OPS)  # all of them, no more
    with pytest.raises(UserError, match="ops"):
        ClassAwareAugment(table, ops=["rotate", "solarize"])
    with pytest.raises(UserError, match="labels"):
        ClassAwareAugment(table)(torch.rand(2, 3, 4, 4), torch.tensor([0, 3]))


@pytest.mark.numerics
@pytest.mark.parametrize("ops", [("brightness", "contrast"), ("rotate", "translate"), OPS])
def test_apply_smooth_gradient_in_magnitude_matches_finite_differences(ops):
    """aug_mag's estimator: d chain(x; m) / dm by autograd equals central differences (float64)."""
    from abdist.data.augment_chain import apply_smooth, draw_params

    g = torch.Generator().manual_seed(5)
    x = torch.rand(6, 3, 10, 10, generator=g, dtype=torch.float64)
    y = torch.arange(6) % 3
    p = draw_params(y, torch.full((3,), 0.5), torch.ones(3), 10, 10, g, ops=ops, num_ops=2)
    m = torch.tensor([0.15, 0.3, 0.45, 0.6, 0.75, 0.9], dtype=torch.float64, requires_grad=True)
    # gradcheck perturbs each m by 1e-6: bilinear resampling and the [0, 1] clamp are smooth there
    assert torch.autograd.gradcheck(lambda m: apply_smooth(x, p, m), (m,))
    assert apply_smooth(x, p, m).sum().requires_grad  # the estimator carries a derivative


def test_apply_smooth_at_the_drawn_magnitude_is_apply_for_photometric_ops():
    from abdist.data.augment_chain import apply, apply_smooth, draw_params

    g = torch.Generator().manual_seed(2)
    x = torch.rand(8, 3, 9, 9, generator=g)
    y = torch.arange(8) % 4
    mag = torch.tensor([0.2, 0.4, 0.6, 0.8])
    p = draw_params(y, mag, torch.ones(4), 9, 9, g, ops=("brightness", "contrast"), num_ops=2)
    torch.testing.assert_close(apply_smooth(x, p, mag[y]), apply(x, p), rtol=0, atol=1e-6)
