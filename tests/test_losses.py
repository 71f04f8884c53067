"""Tests for abdist.losses against an independent numpy/loop reference of the formulas."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from abdist.losses import (
    PRESETS,
    ParametricLoss,
    build_loss_spec,
    delta_from_logit,
    delta_to_logit,
    parametric_cross_entropy,
)

COUNTS = [500, 120, 37, 9, 2]  # distinct, strictly decreasing: a long-tailed profile
C = len(COUNTS)
# Every class present, several repeated, the rarest class three times.
TARGET = [0, 0, 1, 4, 4, 4, 2, 3, 1, 0, 2, 3]
REDUCTIONS = ("mean", "sum", "none")


@pytest.fixture
def float64_default():
    """Presets are built in the default dtype; float64 lets the reference match to 1e-10."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _logits(seed=0):
    """Random float64 logits [len(TARGET), C]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(TARGET), C, generator=g, dtype=torch.float64)


def ref_loss(z, y, w, l, delta, margin, scale, gamma, reduction):
    """Straight from the formula, with python loops and math on floats."""
    z = np.asarray(z, dtype=np.float64)
    per, wy = [], []
    for i, yi in enumerate(y):
        zp = [
            scale * (delta[j] * z[i, j] + l[j] - (margin[j] if j == yi else 0.0))
            for j in range(z.shape[1])
        ]
        m = max(zp)
        log_p = zp[yi] - (m + math.log(sum(math.exp(v - m) for v in zp)))
        p = math.exp(log_p)
        per.append(w[yi] * -((1.0 - p) ** gamma) * log_p)
        wy.append(w[yi])
    if reduction == "none":
        return np.array(per)
    if reduction == "sum":
        return np.array(sum(per))
    return np.array(sum(per) / sum(wy))


def expected_params(name, n, opts, epoch):
    """Each preset's parameters, computed independently from the paper formulas in numpy."""
    n = np.asarray(n, dtype=np.float64)
    c = len(n)
    tau, gamma = opts.get("tau", 1.0), opts.get("gamma", 0.0)
    p = {"w": np.ones(c), "l": np.zeros(c), "delta": np.ones(c), "margin": np.zeros(c)}
    p.update(scale=1.0, gamma=0.0)
    prior = n / n.sum()
    if name == "la":
        p["l"] = tau * np.log(prior)
    elif name == "balanced_softmax":
        p["l"] = np.log(prior)
    elif name in ("ldam", "ldam_drw"):
        m = 1.0 / n**0.25
        p["margin"] = m * opts.get("ldam_max_margin", 0.5) / m.max()
        p["scale"] = opts.get("ldam_scale", 30.0)
        if name == "ldam_drw" and epoch >= opts.get("drw_epoch", 160):
            beta = opts.get("drw_beta", 0.9999)
            w = (1.0 - beta) / (1.0 - beta**n)
            p["w"] = w / w.sum() * c
    elif name == "cdt":
        p["delta"] = (n / n.max()) ** gamma
    elif name == "vs":
        p["delta"] = (n / n.max()) ** gamma
        p["l"] = tau * np.log(prior)
    elif name == "focal":
        p["gamma"] = gamma
    return p


DRW_OPTS = {"ldam_max_margin": 0.3, "ldam_scale": 8.0, "drw_epoch": 5, "drw_beta": 0.999}
CASES = [
    ("ce", {}, 0),
    ("la", {"tau": 0.7}, 0),
    ("balanced_softmax", {}, 0),
    ("ldam", {}, 0),
    ("ldam_drw", DRW_OPTS, 4),  # last epoch before the switch: w neutral
    ("ldam_drw", DRW_OPTS, 5),  # first DRW epoch
    ("cdt", {"gamma": 0.3}, 0),
    ("vs", {"tau": 1.3, "gamma": 0.4}, 0),
    ("focal", {"gamma": 2.0}, 0),
]


def test_cases_cover_every_preset():
    assert {name for name, _, _ in CASES} == set(PRESETS)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name,opts,epoch", CASES)
@pytest.mark.numerics
def test_preset_loss_matches_reference(float64_default, name, opts, epoch, reduction):
    loss_fn = ParametricLoss(build_loss_spec(name, COUNTS, **opts))
    loss_fn.set_epoch(epoch)
    z = _logits()
    got = loss_fn(z, torch.tensor(TARGET), reduction=reduction)
    p = expected_params(name, COUNTS, opts, epoch)
    want = ref_loss(
        z.numpy(),
        TARGET,
        p["w"],
        p["l"],
        p["delta"],
        p["margin"],
        p["scale"],
        p["gamma"],
        reduction,
    )
    assert got.dtype == torch.float64
    # measured <= 1.9e-13 (losses) and 1.5e-14 (parameters) on every `make test-portable` setting
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10, atol=1e-12)
    # The per-class report shows the same numbers, neutral values filled in.
    params = loss_fn.per_class_params()
    for key in ("w", "l", "delta", "margin"):
        assert len(params[key]) == C
        np.testing.assert_allclose(params[key], p[key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("focal_gamma", [0.0, 1.5])
@pytest.mark.numerics
def test_core_with_all_parameters_matches_reference(reduction, focal_gamma):
    g = torch.Generator().manual_seed(1)
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.2
    l = torch.randn(C, generator=g, dtype=torch.float64)
    delta = torch.rand(C, generator=g, dtype=torch.float64) * 0.8 + 0.1
    margin = torch.rand(C, generator=g, dtype=torch.float64)
    z = _logits(seed=2)
    got = parametric_cross_entropy(
        z,
        torch.tensor(TARGET),
        w=w,
        l=l,
        delta=delta,
        margin=margin,
        scale=2.5,
        focal_gamma=focal_gamma,
        reduction=reduction,
    )
    want = ref_loss(
        z.numpy(),
        TARGET,
        w.numpy(),
        l.numpy(),
        delta.numpy(),
        margin.numpy(),
        2.5,
        focal_gamma,
        reduction,
    )
    # measured <= 3.6e-15 on every `make test-portable` setting
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.numerics
def test_weighted_ce_agrees_with_pytorch_convention():
    w = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.1], dtype=torch.float64)
    z, y = _logits(), torch.tensor(TARGET)
    for reduction in REDUCTIONS:
        got = parametric_cross_entropy(z, y, w=w, reduction=reduction)
        want = F.cross_entropy(z, y, weight=w, reduction=reduction)
        # measured: equal on every `make test-portable` setting
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.numerics
def test_mean_is_invariant_to_global_scale_of_w():
    w = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.1], dtype=torch.float64)
    z, y = _logits(), torch.tensor(TARGET)
    a = parametric_cross_entropy(z, y, w=w)
    b = parametric_cross_entropy(z, y, w=7.3 * w)
    # measured: equal (here and for sum) on every `make test-portable` setting
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    # ...whereas sum is not, so the invariance above is the normalisation, not an accident.
    s1 = parametric_cross_entropy(z, y, w=w, reduction="sum")
    s2 = parametric_cross_entropy(z, y, w=7.3 * w, reduction="sum")
    torch.testing.assert_close(s2, 7.3 * s1, rtol=1e-12, atol=0)
    # And the weights do matter relative to each other.
    assert not torch.allclose(a, parametric_cross_entropy(z, y))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("focal_gamma", [0.0, 2.0])
@pytest.mark.numerics
def test_gradcheck_wrt_logits_w_l_delta(reduction, focal_gamma):
    g = torch.Generator().manual_seed(3)
    b, c = 6, 4
    y = torch.tensor([0, 3, 3, 1, 2, 0])
    z = torch.randn(b, c, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    l = torch.randn(c, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(c, generator=g, dtype=torch.float64, requires_grad=True)  # free Δ parameter
    margin = torch.rand(c, generator=g, dtype=torch.float64, requires_grad=True)

    def f(z, w, l, t, margin):
        return parametric_cross_entropy(
            z,
            y,
            w=w,
            l=l,
            delta=delta_from_logit(t),
            margin=margin,
            scale=1.5,
            focal_gamma=focal_gamma,
            reduction=reduction,
        )

    # gradcheck's atol 1e-5 / rtol 1e-3: measured <= 2.5e-9 on every `make test-portable` setting
    assert torch.autograd.gradcheck(f, (z, w, l, t, margin))


@pytest.mark.numerics
def test_ldam_margins():
    counts = [3, 1000, 40, 7, 250]  # unsorted on purpose
    spec = build_loss_spec("ldam", counts, ldam_max_margin=0.4, ldam_scale=12.0)
    m = spec.margin.double().numpy()
    assert spec.scale == 12.0
    # measured <= 4.2e-8 relative (both checks) on every `make test-portable` setting
    assert m.max() == pytest.approx(0.4, rel=1e-6)
    assert np.argmax(m) == int(np.argmin(counts))
    order = np.argsort(counts)
    assert np.all(np.diff(m[order]) < 0), "margin must decrease as the class grows"
    # m_j * n_j^{1/4} is the constant C of the paper.
    np.testing.assert_allclose(m * np.array(counts, float) ** 0.25, 0.4 * 3**0.25, rtol=1e-6)


@pytest.mark.numerics
def test_drw_switches_exactly_at_drw_epoch_and_sums_to_c():
    spec = build_loss_spec("ldam_drw", COUNTS, drw_epoch=7, drw_beta=0.99)
    assert spec.w is None and spec.drw.epoch == 7
    loss_fn = ParametricLoss(spec)
    assert loss_fn.w is None  # epoch 0 by construction
    loss_fn.set_epoch(6)
    assert loss_fn.per_class_params()["w"] == [1.0] * C
    loss_fn.set_epoch(7)
    w = np.array(loss_fn.per_class_params()["w"])
    # measured <= 2.3e-8 relative (both checks) on every `make test-portable` setting
    assert w.sum() == pytest.approx(C, rel=1e-6)
    assert np.all(np.diff(w) > 0), "rarer classes (later in COUNTS) get larger weights"
    n = np.array(COUNTS, float)
    want = (1 - 0.99) / (1 - 0.99**n)
    np.testing.assert_allclose(w, want / want.sum() * C, rtol=1e-6)


def test_set_epoch_is_idempotent_for_resume():
    z, y = _logits().float(), torch.tensor(TARGET)
    spec_kw = {"drw_epoch": 3, "ldam_scale": 5.0}
    run = ParametricLoss(build_loss_spec("ldam_drw", COUNTS, **spec_kw))
    for epoch in range(6):
        run.set_epoch(epoch)
    resumed = ParametricLoss(build_loss_spec("ldam_drw", COUNTS, **spec_kw))
    resumed.set_epoch(5)
    resumed.set_epoch(5)
    torch.testing.assert_close(run(z, y), resumed(z, y), rtol=0, atol=0)
    # Going back before drw_epoch turns the weights off again (no hidden toggle state).
    resumed.set_epoch(2)
    plain_ldam = ParametricLoss(build_loss_spec("ldam", COUNTS, ldam_scale=5.0))
    torch.testing.assert_close(resumed(z, y), plain_ldam(z, y), rtol=0, atol=0)
    assert not torch.allclose(run(z, y), resumed(z, y))
    # Buffers are derived, not state: nothing in state_dict that could change key set at DRW.
    assert len(run.state_dict()) == 0


def test_balanced_softmax_equals_la_with_tau_one():
    bs = build_loss_spec("balanced_softmax", COUNTS)
    la = build_loss_spec("la", COUNTS, tau=1.0)
    torch.testing.assert_close(bs.l, la.l, rtol=0, atol=0)
    z, y = _logits().float(), torch.tensor(TARGET)
    torch.testing.assert_close(ParametricLoss(bs)(z, y), ParametricLoss(la)(z, y), rtol=0, atol=0)
    assert not torch.equal(la.l, build_loss_spec("la", COUNTS, tau=0.5).l)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.numerics
def test_focal_with_gamma_zero_equals_ce(reduction):
    y = torch.tensor(TARGET)
    z1 = _logits().requires_grad_()
    z2 = _logits().requires_grad_()
    focal = ParametricLoss(build_loss_spec("focal", COUNTS, gamma=0.0))(z1, y, reduction)
    ce = ParametricLoss(build_loss_spec("ce", COUNTS))(z2, y, reduction)
    # measured: equal (values and gradients) on every `make test-portable` setting
    torch.testing.assert_close(focal, ce, rtol=1e-12, atol=1e-12)
    focal.sum().backward()
    ce.sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-12, atol=1e-12)
    focal2 = ParametricLoss(build_loss_spec("focal", COUNTS, gamma=2.0))(z1, y, reduction)
    assert torch.all(focal2 < ce), "gamma > 0 must down-weight every sample"


@pytest.mark.parametrize("focal_gamma", [0.0, 2.0])
def test_gradient_is_finite_when_softmax_saturates(focal_gamma):
    # p_y rounds to exactly 1 here: (1 - p_y)^gamma sits at 0^gamma.
    z = torch.tensor([[800.0, 0.0, 0.0], [0.0, 800.0, 0.0]], dtype=torch.float64)
    z.requires_grad_()
    loss = parametric_cross_entropy(z, torch.tensor([0, 2]), focal_gamma=focal_gamma)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert z.grad[1].abs().sum() > 0, "the misclassified sample must still get a gradient"


@pytest.mark.numerics
def test_delta_round_trip():
    t = torch.linspace(-6, 6, 25, dtype=torch.float64)
    # measured <= 4.8e-14 (all three) on every `make test-portable` setting
    torch.testing.assert_close(delta_to_logit(delta_from_logit(t)), t, rtol=1e-9, atol=1e-9)
    d = torch.tensor([0.001, 0.2, 0.5, 0.93], dtype=torch.float64)
    torch.testing.assert_close(delta_from_logit(delta_to_logit(d)), d, rtol=1e-12, atol=1e-12)
    assert torch.all((delta_from_logit(t) > 0) & (delta_from_logit(t) < 1))
    # delta = 1 (the head class of CDT/VS) and 0 clamp to a finite logit.
    edge = delta_to_logit(torch.tensor([0.0, 1.0], dtype=torch.float64), eps=1e-3)
    want = [math.log(1e-3 / (1 - 1e-3)), math.log((1 - 1e-3) / 1e-3)]
    torch.testing.assert_close(edge, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-9)


@pytest.mark.numerics
def test_default_dtype_and_half_precision_logits():
    spec = build_loss_spec("vs", COUNTS, gamma=0.5)
    assert spec.l.dtype == torch.float32 and spec.delta.dtype == torch.float32
    loss_fn = ParametricLoss(spec)
    z, y = _logits().float(), torch.tensor(TARGET)
    full = loss_fn(z, y)
    assert full.dtype == torch.float32
    half = loss_fn(z.bfloat16(), y)
    assert half.dtype == torch.float32  # computed in float32, not bf16
    # measured 3.2e-6 relative on every `make test-portable` setting
    torch.testing.assert_close(half, full, rtol=2e-2, atol=0)


@pytest.mark.parametrize(
    "counts,bad_index", [([5, 0, 3], 1), ([5, 2, -4], 2), ([1, 2, 3, float("nan")], 3)]
)
def test_bad_counts_raise_naming_the_class(counts, bad_index):
    with pytest.raises(ValueError, match=rf"class_counts\[{bad_index}\]"):
        build_loss_spec("la", counts)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown loss 'ldamm'") as info:
        build_loss_spec("ldamm", COUNTS)
    assert all(name in str(info.value) for name in PRESETS)


def test_bad_shapes_and_reduction_raise():
    z, y = _logits(), torch.tensor(TARGET)
    with pytest.raises(ValueError, match="shape"):
        parametric_cross_entropy(z, y, l=torch.zeros(C + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="reduction"):
        parametric_cross_entropy(z, y, reduction="avg")
    with pytest.raises(ValueError, match="target"):
        parametric_cross_entropy(z, y[:-1])
