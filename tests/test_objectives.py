import math

import pytest
import torch
import torch.nn.functional as F

from abdist.bilevel.objectives import (
    OBJECTIVES,
    Objective,
    balanced_ce,
    blend,
    cross_entropy,
    equal_opportunity_gap,
    get_objective,
    worst_class,
)

# Logits are log-probabilities, so every per-sample CE is −log of an entry below. Class 3 is
# absent from the labels.
PROBS = torch.tensor(
    [
        [0.5, 0.25, 0.15, 0.1],  # y = 0: CE = log 2
        [0.25, 0.5, 0.15, 0.1],  # y = 0: CE = log 4
        [0.1, 0.8, 0.05, 0.05],  # y = 1: CE = −log 0.8
        [0.2, 0.2, 0.5, 0.1],  # y = 2: CE = log 2
        [0.6, 0.1, 0.2, 0.1],  # y = 2: CE = −log 0.2
        [0.1, 0.1, 0.1, 0.7],  # y = 2: CE = log 10
    ],
    dtype=torch.float64,
)
Y = torch.tensor([0, 0, 1, 2, 2, 2])
L0 = (math.log(2) + math.log(4)) / 2
L1 = -math.log(0.8)
L2 = (math.log(2) - math.log(0.2) + math.log(10)) / 3
PLAIN = (2 * L0 + L1 + 3 * L2) / 6


def _soft_max(values, t):
    """t·log Σ exp(v/t), shifted by the max so small t does not overflow."""
    m = max(values)
    return m + t * math.log(sum(math.exp((v - m) / t) for v in values))


def _logits():
    return PROBS.log().clone().requires_grad_(True)


@pytest.mark.numerics
def test_balanced_ce_closed_form_ignores_absent_class():
    logits = _logits()
    value = balanced_ce(logits, Y, 4)
    # measured <= 1.1e-16 (all three) on every `make test-portable` setting
    assert value.item() == pytest.approx((L0 + L1 + L2) / 3, rel=1e-14)
    value.backward()
    assert torch.isfinite(logits.grad).all()
    # Equals the inverse-frequency-weighted CE (the authors' upper objective) on this batch.
    w = torch.tensor([1 / 2, 1.0, 1 / 3, 1.0], dtype=torch.float64)
    assert value.item() == pytest.approx(F.cross_entropy(PROBS.log(), Y, weight=w).item())
    assert cross_entropy(PROBS.log(), Y, 4).item() == pytest.approx(PLAIN, rel=1e-14)


@pytest.mark.numerics
def test_balanced_ce_equals_ce_on_a_balanced_batch_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    assert balanced_ce(logits, y, 3).item() == pytest.approx(F.cross_entropy(logits, y).item())
    y_missing = torch.tensor([0, 0, 2, 2, 2, 0])  # class 1 absent
    # gradcheck's atol 1e-5 / rtol 1e-3: measured <= 3.5e-10 on every `make test-portable` setting
    assert torch.autograd.gradcheck(lambda z: balanced_ce(z, y_missing, 3), (logits,))
    assert torch.autograd.gradcheck(lambda z: worst_class(z, y_missing, 3, 0.3), (logits,))


@pytest.mark.numerics
def test_worst_class_closed_form_and_limit():
    worst = max(L0, L1, L2)
    for t in (2.0, 0.5, 0.1, 0.01, 1e-3):
        value = worst_class(PROBS.log(), Y, 4, temperature=t).item()
        closed = _soft_max((L0, L1, L2), t)
        # measured <= 4.4e-16 here and 2.2e-16 at T = 1e-3 on every `make test-portable` setting
        assert value == pytest.approx(closed, rel=1e-12)
        assert worst - 1e-12 <= value <= worst + t * math.log(3) + 1e-12
    assert worst_class(PROBS.log(), Y, 4, temperature=1e-3).item() == pytest.approx(worst, abs=1e-9)
    with pytest.raises(ValueError, match="temperature"):
        worst_class(PROBS.log(), Y, 4, temperature=0.0)


@pytest.mark.numerics
def test_worst_class_gradient_concentrates_on_the_worst_class():
    # At small T the gradient equals that of the worst class's mean CE alone (class 2 here).
    logits = _logits()
    worst_class(logits, Y, 4, temperature=1e-3).backward()
    ref = PROBS.log().clone().requires_grad_(True)
    F.cross_entropy(ref[3:], Y[3:]).backward()
    # measured 3e-216 (exp(-gap / T) underflows) on every `make test-portable` setting
    torch.testing.assert_close(logits.grad, ref.grad, rtol=0, atol=1e-12)


@pytest.mark.numerics
def test_blend_interpolates():
    z = PROBS.log()
    bal = (L0 + L1 + L2) / 3
    # measured <= 2.2e-16 on every `make test-portable` setting
    assert blend(z, Y, 4, 0.0).item() == pytest.approx(bal, rel=1e-14)
    assert blend(z, Y, 4, 1.0).item() == pytest.approx(PLAIN, rel=1e-14)
    assert blend(z, Y, 4, 0.3).item() == pytest.approx(0.7 * bal + 0.3 * PLAIN, rel=1e-14)
    with pytest.raises(ValueError, match="beta"):
        blend(z, Y, 4, 1.5)


def _eo_batch():
    # positive_class = 1. Group 0 positives: p1 = 0.8, 0.6; group 1 positives: p1 = 0.3.
    # Group 2 has only a negative sample, so it has no TPR and must be ignored.
    p1 = torch.tensor([0.8, 0.6, 0.3, 0.9, 0.2, 0.5], dtype=torch.float64)
    probs = torch.stack([1 - p1, p1], 1)
    y = torch.tensor([1, 1, 1, 0, 0, 0])
    groups = torch.tensor([0, 0, 1, 0, 1, 2])
    s0 = (math.log(0.8) + math.log(0.6)) / 2
    s1 = math.log(0.3)
    return probs.log(), y, groups, s0, s1


@pytest.mark.numerics
def test_equal_opportunity_gap_closed_form_and_limit():
    logits, y, groups, s0, s1 = _eo_batch()
    for t in (1.0, 0.1, 1e-3):
        value = equal_opportunity_gap(logits, y, groups, positive_class=1, temperature=t).item()
        closed = _soft_max((s0, s1), t) + _soft_max((-s0, -s1), t)
        # measured: equal, here and below on every `make test-portable` setting
        assert value == pytest.approx(closed, rel=1e-12)
        assert abs(s0 - s1) - 1e-12 <= value <= abs(s0 - s1) + 2 * t * math.log(2) + 1e-12
    value = equal_opportunity_gap(logits, y, groups, 1, 1e-3).item()
    assert value == pytest.approx(abs(s0 - s1), abs=1e-9)
    # Negatives do not enter: changing their logits leaves the gap unchanged.
    changed = logits.clone()
    changed[3:] = torch.randn(3, 2, dtype=torch.float64)
    assert equal_opportunity_gap(changed, y, groups, 1, 0.1).item() == pytest.approx(
        equal_opportunity_gap(logits, y, groups, 1, 0.1).item(), rel=1e-14
    )
    with_ce = equal_opportunity_gap(logits, y, groups, 1, 0.1, ce_weight=0.5).item()
    base = equal_opportunity_gap(logits, y, groups, 1, 0.1).item()
    assert with_ce == pytest.approx(base + 0.5 * F.cross_entropy(logits, y).item(), rel=1e-14)


def test_equal_opportunity_gap_needs_two_groups_and_has_gradient():
    logits, y, groups, *_ = _eo_batch()
    one_group = torch.tensor([0, 0, 0, 1, 1, 1])  # positives only in group 0
    z = logits.clone().requires_grad_(True)
    value = equal_opportunity_gap(z, y, one_group, 1, 0.1)
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))
    z = logits.clone().requires_grad_(True)
    equal_opportunity_gap(z, y, groups, 1, 0.1, num_groups=4).backward()
    # Raising group 1's positive logit (the worse group) must shrink the gap.
    assert z.grad[2, 1] < 0 and torch.isfinite(z.grad).all()
    assert torch.equal(z.grad[3:], torch.zeros(3, 2, dtype=torch.float64))


def test_registry():
    assert {"ce", "balanced_ce", "worst_class", "blend", "equal_opportunity_gap"} <= set(OBJECTIVES)
    obj = get_objective("worst_class", num_classes=4, temperature=0.01)
    assert isinstance(obj, Objective) and not obj.needs_groups
    assert obj(PROBS.log(), Y).item() == worst_class(PROBS.log(), Y, 4, 0.01).item()
    logits, y, groups, *_ = _eo_batch()
    eo = get_objective("equal_opportunity_gap", positive_class=1, temperature=0.1)
    assert eo.needs_groups
    assert eo(logits, y, groups).item() == equal_opportunity_gap(logits, y, groups, 1, 0.1).item()
    with pytest.raises(ValueError, match="needs group"):
        eo(logits, y)
    with pytest.raises(ValueError, match="unknown objective"):
        get_objective("accuracy")
    with pytest.raises(ValueError, match="unexpected"):
        get_objective("balanced_ce", num_classes=4, temperature=0.1)
    with pytest.raises(ValueError, match="needs settings"):
        get_objective("balanced_ce")


@pytest.mark.numerics
def test_shape_errors_and_half_precision():
    with pytest.raises(ValueError, match="logits"):
        balanced_ce(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="expected 5"):
        balanced_ce(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="empty"):
        balanced_ce(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 4)
    half = balanced_ce(PROBS.log().half(), Y, 4)
    assert half.dtype == torch.float32
    # measured 1.8e-5 relative on every `make test-portable` setting
    assert half.item() == pytest.approx((L0 + L1 + L2) / 3, rel=1e-3)
