"""IFT hypergradients checked against finite differences of the TRUE bilevel objective.

Test problem: a multinomial logistic-regression head (5 classes, 4 features, 60 imbalanced train
points, 30 balanced val points, float64) trained with the parametric loss

    z'_j = Δ_j z_j + l_j,   L_train = Σ_i w_{y_i} CE(z'_i, y_i) / Σ_i w_{y_i},   + (wd/2)‖θ‖²,

which is strongly convex in θ = (W, b). θ*(α) is found by Newton's method to a gradient norm
below 1e-12, and F(α) = balanced CE of the raw validation logits at θ*(α). Central differences of
F (re-solving the lower problem at α ± h) are the reference the three solvers must match.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abdist.bilevel.dictionary import build_dictionary, expand
from abdist.bilevel.hypergrad import OutputLoss, hypergradient
from abdist.bilevel.objectives import balanced_ce
from abdist.bilevel.solvers import NEUMANN_SAFETY, SOLVERS, power_iteration_lambda_max, solve

DT = torch.float64
C, D = 5, 4
TRAIN_COUNTS = [24, 16, 10, 6, 4]
WD = 0.1
FD_STEP = 1e-5
# Relative error ‖g − g_fd‖ / ‖g_fd‖ allowed per method. Measured: <= 3.2e-10 for all three on
# every `make test-portable` setting (CPU kernels, 1-2 threads; neumann with 300 terms, residual
# 5e-13), which is the central-difference error itself (h = 1e-4 and h = 1e-5 differences
# disagree by 2e-8, h = 1e-5 and 1e-6 by 2e-9). Neumann gets a looser bound
# because its truncation depends on the power-iteration estimate (100 terms: 1.2e-5).
RTOL = {"exact": 1e-7, "cg": 1e-7, "neumann": 1e-6}


def pce(logits, y, l, delta, w):
    """The parametric CE written out (z' = Δ·z + l, w-weighted mean), independent of losses.py."""
    z = logits * delta + l
    ce = F.cross_entropy(z, y, reduction="none")
    return (w[y] * ce).sum() / w[y].sum()


class Problem:
    def __init__(self, feature_scale: float = 1.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        means = 1.5 * torch.randn(C, D, generator=g, dtype=DT)

        def sample(counts):
            y = torch.repeat_interleave(torch.arange(C), torch.tensor(counts))
            x = means[y] + torch.randn(len(y), D, generator=g, dtype=DT)
            return feature_scale * x, y

        self.xtr, self.ytr = sample(TRAIN_COUNTS)
        self.xva, self.yva = sample([6] * C)
        pi = torch.tensor(TRAIN_COUNTS, dtype=DT) / sum(TRAIN_COUNTS)
        # A generic point: LA-like shift, Δ in (0.6, 1), unequal weights, so no term vanishes.
        self.alpha0 = {
            "l": 0.5 * pi.log(),
            "delta": torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6], dtype=DT),
            "w": torch.tensor([0.5, 0.8, 1.0, 1.5, 2.0], dtype=DT),
        }
        self._theta = torch.zeros(C * D + C, dtype=DT)

    @staticmethod
    def unflatten(theta):
        return {"W": theta[: C * D].view(C, D), "b": theta[C * D :]}

    @staticmethod
    def logits(p, x):
        return x @ p["W"].T + p["b"]

    def train_loss(self, p, a):
        return pce(self.logits(p, self.xtr), self.ytr, a["l"], a["delta"], a["w"])

    def val_loss(self, p, a):
        return balanced_ce(self.logits(p, self.xva), self.yva, C)

    def solve_lower(self, a, tol=1e-12):
        """θ*(α) by damped Newton (warm-started), to ‖∇J‖ <= tol plus one polishing step."""

        def objective(t):
            return self.train_loss(self.unflatten(t), a) + 0.5 * WD * (t @ t)

        def newton_step(t):
            grad = torch.func.grad(objective)(t)
            return grad, torch.linalg.solve(torch.func.hessian(objective)(t), grad)

        theta = self._theta.clone()
        for _ in range(100):
            grad, step = newton_step(theta)
            if grad.norm() <= tol:
                break
            t = 1.0
            # Backtracking only matters far from the optimum; near it, full Newton steps.
            if grad.norm() > 1e-6:
                f0 = objective(theta)
                while objective(theta - t * step) > f0 - 0.25 * t * (grad @ step) and t > 1e-8:
                    t *= 0.5
            theta = theta - t * step
        # Stopping at ‖∇J‖ ~ 1e-12 leaves θ errors of ~1e-11, which central differences with
        # h = 1e-5 would amplify to ~1e-7; one more (quadratically convergent) full Newton step
        # takes θ* to rounding level.
        theta = theta - step
        grad = torch.func.grad(objective)(theta)
        assert grad.norm() <= tol, f"lower problem not solved: ‖∇J‖ = {grad.norm():.2e}"
        self._theta = theta
        return self.unflatten(theta)

    def F(self, a):
        """The true bilevel objective: validation balanced CE at θ*(α)."""
        return self.val_loss(self.solve_lower(a), a).item()


def central_difference(fun, alpha, h=FD_STEP):
    """dF/dα by central differences, one coordinate at a time, in alpha's structure."""
    out = {}
    for k, v in alpha.items():
        g = torch.zeros_like(v)
        for j in range(v.numel()):
            plus = {kk: vv.clone() for kk, vv in alpha.items()}
            minus = {kk: vv.clone() for kk, vv in alpha.items()}
            plus[k].view(-1)[j] += h
            minus[k].view(-1)[j] -= h
            g.view(-1)[j] = (fun(plus) - fun(minus)) / (2 * h)
        out[k] = g
    return out


def flat(tree):
    return torch.cat([tree[k].reshape(-1) for k in sorted(tree)])


def rel_err(a, b):
    return ((flat(a) - flat(b)).norm() / flat(b).norm()).item()


@pytest.fixture(scope="module")
def problem():
    return Problem()


@pytest.fixture(scope="module")
def fd_reference(problem):
    """(θ*(α0), central-difference dF/dα at α0) for α = (l, Δ, w)."""
    theta = problem.solve_lower(problem.alpha0)
    ref = central_difference(problem.F, problem.alpha0)
    problem.solve_lower(problem.alpha0)  # leave the warm start at α0
    return theta, ref


@pytest.mark.parametrize("method", ["exact", "cg", "neumann"])
@pytest.mark.numerics
def test_hypergradient_matches_finite_differences_of_the_bilevel_objective(
    problem, fd_reference, method
):
    theta, ref = fd_reference
    grad, info = hypergradient(
        problem.train_loss,
        problem.val_loss,
        theta,
        problem.alpha0,
        method=method,
        weight_decay=WD,
        iterations=300 if method == "neumann" else 50,
    )
    # residual measured <= 9e-11 on every `make test-portable` setting
    assert info["method"] == method and info["residual"] < 1e-8
    # Every block of α matters here (no accidental zeros that would make the check vacuous).
    assert all(ref[k].abs().max() > 1e-3 for k in ref)
    assert rel_err(grad, ref) < RTOL[method]
    if method == "neumann":
        assert info["lambda_max"] is not None and info["neumann_step"] > 0


@pytest.mark.numerics
def test_a_one_percent_wrong_hessian_is_detectably_wrong(problem, fd_reference):
    # Guards the FD test itself: H off by 1% of the weight decay (0.001·I) must already miss the
    # tolerance by orders of magnitude (measured 3.3e-3), so passing it means something.
    theta, ref = fd_reference
    grad, _ = hypergradient(
        problem.train_loss, problem.val_loss, theta, problem.alpha0, method="exact",
        weight_decay=1.01 * WD,
    )  # fmt: skip
    assert rel_err(grad, ref) > 1e-3


@pytest.mark.numerics
def test_direct_term_tensor_alpha_and_both_hvp_modes(problem):
    # α = l only, as a plain tensor; the validation loss also depends on α directly through a
    # penalty 0.3·‖l‖², so dF/dα = 0.6·l − mixed·x must include the direct term.
    base = problem.alpha0

    def with_l(l):
        return {"l": l, "delta": base["delta"], "w": base["w"]}

    def train(p, l):
        return problem.train_loss(p, with_l(l))

    def val(p, l):
        return problem.val_loss(p, with_l(l)) + 0.3 * (l @ l)

    def bilevel(a):
        p = problem.solve_lower(with_l(a["l"]))
        return val(p, a["l"]).item()

    ref = central_difference(bilevel, {"l": base["l"]})["l"]
    theta = problem.solve_lower(base)
    flat_theta = torch.cat([theta["W"].reshape(-1), theta["b"]])

    def train_flat(t, l):
        return train(problem.unflatten(t), l)

    def val_flat(t, l):
        return val(problem.unflatten(t), l)

    for mode in ("reverse", "forward"):
        # params as one flat tensor this time
        grad, _ = hypergradient(
            train_flat, val_flat, flat_theta, base["l"], method="cg", weight_decay=WD,
            iterations=50, hvp_mode=mode,
        )  # fmt: skip
        assert isinstance(grad, torch.Tensor) and grad.shape == (C,)
        # measured <= 3.5e-11 on every `make test-portable` setting
        assert ((grad - ref).norm() / ref.norm()).item() < 1e-6


@pytest.mark.numerics
def test_hypergradient_through_a_frequency_dictionary(problem):
    # α_sub ∈ R^3 parameterises l = D·α_sub with an interpolation dictionary; the chain rule
    # through D must agree with finite differences in α_sub.
    dmat = build_dictionary(TRAIN_COUNTS, "interp", 3, dtype=DT)
    base = problem.alpha0

    def to_alpha(a_sub):
        return {"l": expand(dmat, a_sub), "delta": base["delta"], "w": base["w"]}

    def train(p, a):
        return problem.train_loss(p, to_alpha(a["l_sub"]))

    a0 = {"l_sub": torch.tensor([-1.0, -0.3, 0.0], dtype=DT)}
    ref = central_difference(lambda a: problem.F(to_alpha(a["l_sub"])), a0)
    theta = problem.solve_lower(to_alpha(a0["l_sub"]))
    grad, _ = hypergradient(train, problem.val_loss, theta, a0, method="exact", weight_decay=WD)
    # measured <= 2.4e-10 on every `make test-portable` setting
    assert rel_err(grad, ref) < 1e-6
    problem.solve_lower(base)


@pytest.mark.numerics
def test_real_parametric_loss_gives_the_same_hypergradient(problem, fd_reference):
    losses = pytest.importorskip("abdist.losses")
    theta, _ = fd_reference

    def train_real(p, a):
        return losses.parametric_cross_entropy(
            problem.logits(p, problem.xtr), problem.ytr, w=a["w"], l=a["l"], delta=a["delta"]
        )

    kw = dict(method="exact", weight_decay=WD)
    ours, _ = hypergradient(problem.train_loss, problem.val_loss, theta, problem.alpha0, **kw)
    real, _ = hypergradient(train_real, problem.val_loss, theta, problem.alpha0, **kw)
    # measured <= 1.8e-16 on every `make test-portable` setting
    assert rel_err(real, ours) < 1e-12


@pytest.mark.numerics
def test_neumann_with_unit_step_diverges_but_power_iteration_step_converges():
    # Features scaled ×3 push λ_max(H) above 2: the authors' fixed step η = 1 multiplies the top
    # eigencomponent by |1 − λ_max| > 1 per term, so the series blows up.
    prob = Problem(feature_scale=3.0)
    theta = prob.solve_lower(prob.alpha0)
    args = (prob.train_loss, prob.val_loss, theta, prob.alpha0)
    exact, exact_info = hypergradient(*args, method="exact", weight_decay=WD)
    lam = exact_info["lambda_max"]
    assert lam > 2.0

    diverged, info = hypergradient(
        *args, method="neumann", weight_decay=WD, neumann_step=1.0, iterations=40
    )
    assert info["residual"] > 1e6 and rel_err(diverged, exact) > 1e6

    converged, info = hypergradient(*args, method="neumann", weight_decay=WD, iterations=1000)
    assert info["lambda_max"] <= lam * (1 + 1e-9) and info["lambda_max"] > 0.9 * lam
    assert info["neumann_step"] == pytest.approx(NEUMANN_SAFETY / info["lambda_max"])
    assert info["neumann_step"] * lam < 2.0
    # measured: residual 1.4e-11, error 1.4e-11 on every `make test-portable` setting
    assert info["residual"] < 1e-8
    assert rel_err(converged, exact) < 1e-6


# ---------------------------------------------------------------------------------------------
# Linear solvers and power iteration on explicit matrices (closed-form answers).
# ---------------------------------------------------------------------------------------------


def _spd(n=8, seed=0, cond=30.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    eig = torch.logspace(0, math.log10(cond), n, dtype=DT)
    return q @ torch.diag(eig) @ q.T, eig, torch.randn(n, generator=g, dtype=DT)


@pytest.mark.parametrize("method", list(SOLVERS))
@pytest.mark.numerics
def test_solvers_on_an_explicit_spd_matrix(method):
    a, eig, v = _spd()
    # Neumann contracts by 1 − 0.9/κ per term (κ = 30): 1000 terms reach ~1e-13.
    iterations = 1000 if method == "neumann" else 50
    x, info = solve(lambda u: a @ u, v, method=method, iterations=iterations, tol=1e-12)
    x_true = torch.linalg.solve(a, v)
    # measured: error <= 3.9e-14, residuals agree to 6.9e-16, cg takes 9 steps,
    # on every `make test-portable` setting
    assert ((x - x_true).norm() / x_true.norm()).item() < 1e-9
    true_residual = ((a @ x - v).norm() / v.norm()).item()
    assert info["residual"] == pytest.approx(true_residual, rel=1e-3, abs=1e-14)
    assert info["converged"]
    if method == "cg":
        assert info["iterations"] <= 8 + 2  # n steps in exact arithmetic, a little slack
    if method == "exact":
        assert info["lambda_max"] == pytest.approx(eig.max().item(), rel=1e-12)


def test_cg_flags_negative_curvature_and_unknown_method_raises():
    a = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=DT))
    _, info = solve(lambda u: a @ u, torch.ones(3, dtype=DT), method="cg", iterations=10)
    assert info["negative_curvature"] and not info["converged"]
    with pytest.raises(ValueError, match="unknown hypergradient method"):
        solve(lambda u: a @ u, torch.ones(3, dtype=DT), method="lissa")


@pytest.mark.numerics
def test_power_iteration_estimates_lambda_max_from_below_and_is_deterministic():
    a, eig, _ = _spd(n=20, cond=10.0)
    lam = power_iteration_lambda_max(lambda u: a @ u, torch.zeros(20, dtype=DT), iters=50)
    assert lam <= eig.max().item() * (1 + 1e-12) and lam == pytest.approx(eig.max().item(), 1e-3)
    # An int dimension gives a default-dtype (float32) iterate; same generator state, same value.
    a32 = a.float()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    lam1 = power_iteration_lambda_max(lambda u: a32 @ u, 20, 3, g1)
    assert lam1 == power_iteration_lambda_max(lambda u: a32 @ u, 20, 3, g2)
    assert 0 < lam1 <= eig.max().item() * (1 + 1e-6)
    diag = torch.tensor([1.0, -7.0, 3.0], dtype=DT)  # largest |λ| is the negative one
    assert power_iteration_lambda_max(lambda u: diag * u, torch.ones(3, dtype=DT), 200) == (
        pytest.approx(7.0, rel=1e-9)
    )


# ---------------------------------------------------------------------------------------------
# "Full" scope through functional_call: damping, module state untouched.
# ---------------------------------------------------------------------------------------------


@pytest.mark.numerics
def test_full_network_scope_with_damping_leaves_module_state_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, C))
    model = model.double()
    with torch.no_grad():  # non-trivial running stats, so "untouched" means something
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()  # the contract: BN reads its buffers and never writes them
    prob = Problem()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    before = {k: v.clone() for k, v in buffers.items()}

    def forward(p, x):
        return torch.func.functional_call(model, {**p, **buffers}, (x,))

    def train(p, a):
        return pce(forward(p, prob.xtr), prob.ytr, a["l"], a["delta"], a["w"])

    def val(p, a):
        return balanced_ce(forward(p, prob.xva), prob.yva, C)

    args = (train, val, params, prob.alpha0)
    _, info0 = hypergradient(*args, method="exact", weight_decay=1e-3)
    # A random network is not at a minimum: H may be indefinite, which is what damping is for.
    damping = max(0.0, -info0["lambda_min"]) + 0.05
    exact, info = hypergradient(*args, method="exact", weight_decay=1e-3, damping=damping)
    assert info["lambda_min"] > 0.04
    cg, info = hypergradient(*args, method="cg", weight_decay=1e-3, damping=damping, iterations=300)
    # measured 1.8e-11 and 0 on every `make test-portable` setting
    assert rel_err(cg, exact) < 1e-8 and not info["negative_curvature"]
    # Damping is a plain shift of H: λ more damping equals λ more weight decay in the solve.
    shifted, _ = hypergradient(*args, method="exact", weight_decay=1e-3 + damping)
    assert rel_err(shifted, exact) < 1e-12
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["exact", "cg"])
@pytest.mark.numerics
def test_gauss_newton_is_the_exact_hessian_for_a_linear_head(problem, fd_reference, method):
    # The logits are linear in θ = (W, b), so Jᵀ∇²_zℓ J is the whole Hessian: the Gauss-Newton
    # hypergradient must match the finite differences of the true bilevel objective as tightly.
    theta, ref = fd_reference
    train = OutputLoss(
        lambda p: problem.logits(p, problem.xtr),
        lambda z, a: pce(z, problem.ytr, a["l"], a["delta"], a["w"]),
    )
    grad, info = hypergradient(
        train, problem.val_loss, theta, problem.alpha0, method=method, weight_decay=WD,
        iterations=50, curvature="gauss_newton",
    )  # fmt: skip
    # measured: residual <= 9.6e-11, error <= 3.2e-10 on every `make test-portable` setting
    assert info["curvature"] == "gauss_newton" and info["residual"] < 1e-8
    assert rel_err(grad, ref) < RTOL[method]


def _tiny_mlp_problem():
    """A tanh MLP (not linear in θ) at a random, non-stationary point: an indefinite Hessian."""
    prob = Problem()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C)).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def forward(p, x):
        return torch.func.functional_call(model, p, (x,))

    def loss(z, a):
        return pce(z, prob.ytr, a["l"], a["delta"], a["w"])

    train = OutputLoss(lambda p: forward(p, prob.xtr), loss)

    def val(p, a):
        return balanced_ce(forward(p, prob.xva), prob.yva, C)

    return prob, params, train, val, loss, forward


@pytest.mark.numerics
def test_gauss_newton_matches_explicit_jacobians_and_is_psd_where_the_hessian_is_not():
    prob, params, train, val, loss, forward = _tiny_mlp_problem()
    a0 = prob.alpha0
    names = list(params)
    theta = torch.cat([params[k].reshape(-1) for k in names])
    sizes = [params[k].numel() for k in names]

    def unflat(t):
        return {k: c.view(params[k].shape) for k, c in zip(names, t.split(sizes))}

    def logits(t):
        return forward(unflat(t), prob.xtr).reshape(-1)

    # Reference, built from explicit matrices: G = Jᵀ ∇²_zℓ J, M = Jᵀ ∂²ℓ/∂z∂α (α flattened).
    keys = sorted(a0)
    a_flat = torch.cat([a0[k] for k in keys])

    def unflat_a(v):
        return dict(zip(keys, v.split([a0[k].numel() for k in keys])))

    z = logits(theta)

    def ell(zf, av):
        return loss(zf.view(-1, C), unflat_a(av))

    J = torch.func.jacrev(logits)(theta)
    Hz = torch.func.hessian(ell, argnums=0)(z, a_flat)
    Mz = torch.func.jacrev(torch.func.grad(ell, argnums=0), argnums=1)(z, a_flat)
    G, M = J.T @ Hz @ J, J.T @ Mz
    wd = 1e-3
    v, direct = torch.func.grad(lambda t, av: val(unflat(t), unflat_a(av)), argnums=(0, 1))(
        theta, a_flat
    )
    expected = direct - M.T @ torch.linalg.solve(G + wd * torch.eye(len(theta), dtype=DT), v)

    got, info = hypergradient(
        train, val, params, a0, method="exact", weight_decay=wd, curvature="gauss_newton"
    )
    # measured <= 2.8e-14; lambda_min - wd = -1.1e-17; CG <= 5.4e-13,
    # on every `make test-portable` setting
    assert torch.allclose(torch.cat([got[k] for k in keys]), expected, rtol=1e-9, atol=1e-12)
    assert info["lambda_min"] >= wd - 1e-9  # G is PSD: its spectrum starts at the weight decay
    _, info_h = hypergradient(train, val, params, a0, method="exact", weight_decay=wd)
    assert info_h["lambda_min"] < 0  # ... while the true Hessian here is indefinite
    cg, info_cg = hypergradient(
        train, val, params, a0, method="cg", weight_decay=wd, iterations=500, tol=1e-12,
        curvature="gauss_newton",
    )  # fmt: skip
    assert not info_cg["negative_curvature"] and rel_err(cg, got) < 1e-6


def test_argument_errors():
    prob = Problem()
    theta = {"W": torch.zeros(C, D, dtype=DT), "b": torch.zeros(C, dtype=DT)}
    with pytest.raises(ValueError, match="scalar"):
        hypergradient(
            lambda p, a: prob.logits(p, prob.xtr).sum(0), prob.val_loss, theta, prob.alpha0
        )
    with pytest.raises(ValueError, match="hvp_mode"):
        hypergradient(prob.train_loss, prob.val_loss, theta, prob.alpha0, hvp_mode="fd")
    with pytest.raises(ValueError, match="curvature"):
        hypergradient(prob.train_loss, prob.val_loss, theta, prob.alpha0, curvature="fisher")
    with pytest.raises(ValueError, match="OutputLoss"):
        hypergradient(prob.train_loss, prob.val_loss, theta, prob.alpha0, curvature="gauss_newton")
    with pytest.raises(ValueError, match="dtype"):
        hypergradient(prob.train_loss, prob.val_loss, {**theta, "b": theta["b"].float()}, 0)


class InputProblem(Problem):
    """`Problem` whose training INPUTS depend on α too: x_i + s_{y_i}·u_i (u fixed, drawn once),
    a per-class magnitude of a smooth augmentation, the shape of AutoBalance's `aug_mag`."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.u = torch.randn(self.xtr.shape, generator=g, dtype=DT)
        self.alpha0 = {**self.alpha0, "s": torch.tensor([0.3, 0.5, 0.2, 0.6, 0.4], dtype=DT)}

    def x_aug(self, a):
        return self.xtr + a["s"][self.ytr, None] * self.u

    def train_loss(self, p, a):
        return pce(self.logits(p, self.x_aug(a)), self.ytr, a["l"], a["delta"], a["w"])


@pytest.mark.parametrize(
    "curvature, hvp_mode, form",
    [
        ("hessian", "reverse", "closure"),  # a plain train_loss_fn: one graph over (θ, α)
        ("hessian", "reverse", "output_loss"),
        ("hessian", "forward", "output_loss"),
        ("hessian", "reverse", "output_loss_fixed"),
        ("gauss_newton", "reverse", "output_loss"),
        ("gauss_newton", "reverse", "output_loss_fixed"),
    ],
)
@pytest.mark.numerics
def test_hypergradient_through_an_alpha_dependent_input_matches_finite_differences(
    curvature, hvp_mode, form
):
    # The mixed term ∂²ℓ/∂θ∂s runs through the input only; every form must keep it (Gauss-Newton
    # is exact here: logits linear in θ). Given as OutputLoss(takes_alpha=True), the curvature
    # products run at the fixed α and only the one mixed-term product goes through the α-moving
    # outputs (what keeps AutoBalance's aug_mag hyper step at the cost of the others).
    prob = InputProblem()
    ref = central_difference(prob.F, prob.alpha0)
    theta = prob.solve_lower(prob.alpha0)
    train, calls = prob.train_loss, []

    def outputs(p, a):
        calls.append(1)
        return prob.logits(p, prob.x_aug(a))

    if form != "closure":
        fixed_x = prob.x_aug(prob.alpha0)  # computed once, as the hyper step does
        train = OutputLoss(
            outputs,
            lambda z, a: pce(z, prob.ytr, a["l"], a["delta"], a["w"]),
            takes_alpha=True,
            outputs_fixed=(lambda p: prob.logits(p, fixed_x)) if form.endswith("fixed") else None,
        )
    grad, info = hypergradient(
        train, prob.val_loss, theta, prob.alpha0, method="cg", weight_decay=WD, iterations=50,
        curvature=curvature, hvp_mode=hvp_mode,
    )  # fmt: skip
    # measured: residual <= 3.7e-11, error <= 2.5e-10 under default/avx2 kernels, 1-2 threads
    assert info["residual"] < 1e-8 and info["iterations"] > 3
    assert ref["s"].abs().max() > 1e-3  # the input's magnitude matters to F
    assert rel_err(grad, ref) < RTOL["cg"]
    if form == "output_loss_fixed":
        assert len(calls) == 1  # the mixed term only
