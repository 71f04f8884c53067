"""SelMix's objectives and gain matrix against exact answers: finite differences of each
objective's surrogate in the confusion matrix, hand-derived gradients, and, for the gain, the
step itself taken for every pair on a tiny problem (the brute force the derivation must match)."""

from __future__ import annotations

import itertools

import pytest
import torch

from abdist.methods.selmix_gain import gains, gains_k4, logit_gradient, pair_distribution
from abdist.methods.selmix_objectives import OBJECTIVES, Objective, recalls, tail_classes

K, d = 5, 4
TAIL = tail_classes([50, 40, 30, 5, 3], 0.4)  # the two rarest: classes 3 and 4
pytestmark = pytest.mark.numerics  # float comparisons of two computations, tolerances measured


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _objective(name, **kw):
    return Objective(name, tail=TAIL if name == "min_head_tail_recall" else None, **kw)


def _confusion(seed, k=K):
    g = torch.Generator().manual_seed(seed)
    pi = torch.rand(k, generator=g) + 0.5
    rows = torch.softmax(2 * torch.randn(k, k, generator=g) + 2 * torch.eye(k), 1)
    return rows * (pi / pi.sum())[:, None]


@pytest.mark.parametrize("name", OBJECTIVES)
def test_gradient_matches_finite_differences_within_rows(name):
    """Moving mass h from (i, k) to (i, j) keeps the class shares; the surrogate's change is
    (g_ij - g_ik) h to first order (coverage multipliers held at their value at C)."""
    obj = _objective(name, alpha=0.99, eta=20.0)
    C = _confusion(1)
    g = obj.grad(C)
    lam = obj.multipliers(C) if obj.base != name else None
    if lam is not None:
        assert lam.max() > 0  # the test exercises the constraint
    h = 1e-6
    for i, j, k in [(0, 1, 2), (3, 3, 0), (4, 2, 4), (1, 1, 4)]:
        step = torch.zeros(K, K)
        step[i, j] += h
        step[i, k] -= h
        fd = (obj.surrogate(C + step, lam) - obj.surrogate(C - step, lam)) / (2 * h)
        assert fd.item() == pytest.approx((g[i, j] - g[i, k]).item(), rel=1e-6, abs=1e-9)


def test_hand_derived_gradients_on_the_diagonal():
    C = _confusion(2)
    pi, r = C.sum(1), recalls(C)
    diag = lambda g: torch.diagonal(g)  # noqa: E731  (off-diagonal entries are 0 for these)
    torch.testing.assert_close(diag(_objective("mean_recall").grad(C)), 1 / (K * pi))
    gm = r.log().mean().exp()
    torch.testing.assert_close(diag(_objective("gmean").grad(C)), gm / (K * r * pi))
    hm = K / (1 / r).sum()
    torch.testing.assert_close(diag(_objective("hmean").grad(C)), hm**2 / (K * r**2 * pi))
    for name in ("mean_recall", "gmean", "hmean"):
        g = _objective(name).grad(C)
        assert torch.count_nonzero(g - torch.diag(torch.diagonal(g))) == 0
    # min recall: softmin multipliers; a sharp one puts all the weight on the worst class.
    worst = int(r.argmin())
    g = _objective("min_recall", eta=1e4).grad(C)
    expected = torch.zeros(K)
    expected[worst] = 1 / pi[worst]
    torch.testing.assert_close(diag(g), expected, atol=1e-9, rtol=1e-6)
    g = _objective("min_recall", eta=10.0).grad(C)
    torch.testing.assert_close(diag(g) * pi, torch.softmax(-10.0 * r, 0))


def test_values_are_the_figures():
    C = _confusion(3)
    r = recalls(C)
    assert _objective("min_recall").value(C) == pytest.approx(float(r.min()))
    assert _objective("mean_recall").value(C) == pytest.approx(float(r.mean()))
    assert _objective("hmean").value(C) == pytest.approx(float(K / (1 / r).sum()))
    head_tail = min(float(r[:3].mean()), float(r[3:].mean()))
    assert _objective("min_head_tail_recall").value(C) == pytest.approx(head_tail)
    C0 = C.clone()
    C0[2, 2], C0[2, 0] = 0.0, C0[2, 0] + C[2, 2]  # class 2 never recalled
    assert _objective("gmean").value(C0) == 0.0 and _objective("hmean").value(C0) == 0.0
    assert torch.isfinite(_objective("gmean").grad(C0)).all()  # the eps floor


def test_head_and_tail_are_by_training_count_not_index():
    assert tail_classes([5, 1, 3, 1], 0.5).tolist() == [False, True, False, True]
    assert tail_classes([1, 2, 3], 0.0).tolist() == [True, False, False]  # at least one
    assert tail_classes([1, 2, 3], 1.0).tolist() == [True, True, False]  # never all


def test_coverage_multipliers_are_zero_when_satisfied_and_shift_a_column_when_not():
    C = torch.full((K, K), 0.02) + torch.eye(K) * 0.1  # every class predicted 1/K of the time
    obj = _objective("mean_recall_coverage", alpha=0.95)
    assert obj.multipliers(C).max() == 0
    torch.testing.assert_close(obj.grad(C), _objective("mean_recall").grad(C))
    C2 = C.clone()
    C2[:, 3] *= 0.5
    C2[:, 0] += C[:, 3] * 0.5  # class 3 under-predicted
    lam = obj.multipliers(C2)
    assert lam[3] > 0 and (lam[[0, 1, 2, 4]] == 0).all()
    base = _objective("mean_recall").grad(C2)
    torch.testing.assert_close(obj.grad(C2), (base + lam[None, :]) / (lam.max() + 1))


def _surrogate_confusion(Z, W, b, pi):
    logits = Z @ W.T + (0 if b is None else b)
    return pi[:, None] * torch.softmax(logits, 1)


def _brute_gain(obj, Z, W, b, pi, lam, i, j, lam_bar, h=1e-5):
    """Take the unit-direction step for pair (i, j) at +-h and difference the surrogate."""
    m = lam_bar * Z[i] + (1 - lam_bar) * Z[j]
    p = torch.softmax(W @ m + (0 if b is None else b), 0)
    err = p - torch.eye(len(p))[i]
    values = []
    for s in (h, -h):
        W2 = W - s * torch.outer(err, m)
        b2 = None if b is None else b - s * err
        values.append(obj.surrogate(_surrogate_confusion(Z, W2, b2, pi), lam))
    return ((values[0] - values[1]) / (2 * h)).item()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", OBJECTIVES)
def test_gain_equals_the_brute_force_change_of_the_surrogate(name, bias):
    g = torch.Generator().manual_seed(4)
    Z, W = torch.randn(K, d, generator=g), torch.randn(K, d, generator=g)
    b = torch.randn(K, generator=g) if bias else None
    pi = torch.rand(K, generator=g) + 0.5
    pi = pi / pi.sum()
    obj, lam_bar = _objective(name, alpha=0.99, eta=20.0), 0.8
    C = _surrogate_confusion(Z, W, b, pi)
    lam = obj.multipliers(C) if obj.base != name else None
    D = logit_gradient(obj.grad(C), C)
    G = gains(Z, W, b, D, lam_bar=lam_bar, chunk_elements=2 * K * K)  # several chunks
    brute = torch.tensor(
        [[_brute_gain(obj, Z, W, b, pi, lam, i, j, lam_bar) for j in range(K)] for i in range(K)]
    )
    scale = brute.abs().max()
    assert scale > 0
    torch.testing.assert_close(G, brute, rtol=0, atol=1e-7 * scale)
    torch.testing.assert_close(gains_k4(Z, W, b, D, lam_bar=lam_bar), G, rtol=1e-10, atol=1e-12)


def test_the_published_label_term_is_not_the_step_s_gain():
    """The public code's <z_i, z_q> (and no bias term) against the brute force: measured here,
    its error is of the order of the gains themselves, the derivation's is ~1e-10 of them."""
    g = torch.Generator().manual_seed(5)
    Z, W = torch.randn(K, d, generator=g), torch.randn(K, d, generator=g)
    pi = torch.full((K,), 1.0 / K)
    obj = _objective("mean_recall")
    C = _surrogate_confusion(Z, W, None, pi)
    D = logit_gradient(obj.grad(C), C)
    brute = torch.tensor(
        [[_brute_gain(obj, Z, W, None, pi, None, i, j, 0.8) for j in range(K)] for i in range(K)]
    )
    ours = gains(Z, W, None, D, lam_bar=0.8)
    published = gains_k4(Z, W, None, D, lam_bar=0.8, published=True)
    scale = brute.abs().max()
    assert (ours - brute).abs().max() < 1e-7 * scale
    assert (published - brute).abs().max() > 0.05 * scale
    # They agree on the diagonal (i = j: the mixup is z_i itself).
    torch.testing.assert_close(torch.diagonal(published), torch.diagonal(ours))


def test_factorised_gains_equal_the_exact_softmax_path_and_fall_back_on_underflow():
    g = torch.Generator().manual_seed(6)
    k, dim = 40, 16
    Z, W, b = torch.randn(k, dim, generator=g), torch.randn(k, dim, generator=g), torch.randn(k)
    D = torch.randn(k, k, generator=g)
    exact = gains(Z, W, b, D, lam_bar=0.8, factorised=False, chunk_elements=k**3)
    for rows in (1, 7):
        chunked = gains(Z, W, b, D, lam_bar=0.8, factorised=False, chunk_elements=rows * k * k)
        torch.testing.assert_close(chunked, exact)
    torch.testing.assert_close(gains(Z, W, b, D, lam_bar=0.8), exact)
    # float32 in, float32 out, computed in float64.
    f32 = gains(Z.float(), W.float(), b.float(), D.float(), lam_bar=0.8)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max())
    # Logit margins of ~1000: the separately shifted factors underflow for some pairs; those rows
    # are recomputed exactly (the result stays finite and equal to the exact path).
    huge = 300 * W
    exact = gains(Z, huge, b, D, lam_bar=0.8, factorised=False)
    got = gains(Z, huge, b, D, lam_bar=0.8)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, exact)


def test_pair_distribution_lives_on_positive_gains():
    G = torch.tensor([[0.3, -0.1], [0.0, 0.1]])
    P = pair_distribution(G, temperature=0.1)
    assert P.sum().item() == pytest.approx(1.0)
    assert P[0, 1] == 0 and P[1, 0] == 0
    assert P[0, 0] / P[1, 1] == pytest.approx(torch.exp(torch.tensor(2.0)).item())
    none = pair_distribution(-G.abs(), temperature=0.1)
    assert torch.equal(none, torch.full((2, 2), 0.25))
    # Only allowed pairs (classes with training samples) carry mass, also in the fallback.
    allowed = torch.tensor([[True, False], [True, True]])
    P = pair_distribution(torch.tensor([[-1.0, 5.0], [0.2, -1.0]]), 0.1, allowed=allowed)
    assert P[0, 1] == 0 and P[1, 0] == 1
    # relative: the same P for gains at any scale, softmax(G / (T max G)).
    rel = pair_distribution(G, 0.1, relative=True)
    torch.testing.assert_close(rel, pair_distribution(1000 * G, 0.1, relative=True))
    torch.testing.assert_close(rel, pair_distribution(G, 0.1 * 0.3))  # max G = 0.3
    none = pair_distribution(-G.abs(), 0.1, allowed=allowed)
    assert none[0, 1] == 0 and torch.allclose(none[allowed], torch.full((3,), 1 / 3))
    for i, j in itertools.product(range(2), range(2)):
        assert P[i, j] >= 0
