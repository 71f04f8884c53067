"""Linear solvers for H x = v given only u ↦ H u (H symmetric): what the IFT hypergradient
(abdist/bilevel/hypergrad.py) solves with. ``exact`` materialises H, ``cg`` runs conjugate
gradients (stopping on negative curvature), ``neumann`` sums a truncated series with a step from
power iteration."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["HVP", "NEUMANN_SAFETY", "SOLVERS", "power_iteration_lambda_max", "solve"]

# η = NEUMANN_SAFETY / λ̂. The Rayleigh quotient λ̂ never exceeds λ_max, and the series converges
# for η·λ_max < 2, i.e. whenever λ̂ > 0.45·λ_max; a few power iterations are plenty for that.
NEUMANN_SAFETY = 0.9

HVP = Callable[[Tensor], Tensor]


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def _norm(a: Tensor) -> float:
    return float(torch.linalg.vector_norm(a))


def power_iteration_lambda_max(
    hvp: HVP,
    dim_or_like: int | Tensor,
    iters: int = 20,
    generator: torch.Generator | None = None,
) -> float:
    """Estimate λ_max(H) (largest |eigenvalue|) by power iteration on u ↦ H u.

    u_0 ~ N(0, I) drawn from `generator` (a fresh CPU generator seeded with 0 when None, so the
    estimate is deterministic), then u_{k+1} = H u_k / ‖H u_k‖. Returns |u_kᵀ H u_k| of the last
    iterate (u_k normalised): a Rayleigh quotient, so for symmetric PSD H it never overestimates
    λ_max, and its error decays like (λ_2/λ_1)^{2k}. `dim_or_like` is the vector length (default
    dtype, CPU) or a tensor whose shape, dtype and device the iterate takes. Costs `iters` HVPs.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if isinstance(dim_or_like, Tensor):
        shape, dtype, device = dim_or_like.shape, dim_or_like.dtype, dim_or_like.device
    else:
        shape, dtype, device = (int(dim_or_like),), torch.get_default_dtype(), torch.device("cpu")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    # Drawn on the generator's device in a full-precision dtype, then moved: works for any
    # (generator device, target device) pair and for half-precision targets.
    u = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float64)
    u = u.to(device=device, dtype=dtype)
    u = u / _norm(u)
    lam = 0.0
    for _ in range(iters):
        hu = hvp(u)
        lam = _dot(u, hu)
        norm = _norm(hu)
        if norm == 0.0 or not math.isfinite(norm):
            break
        u = hu / norm
    return abs(lam)


def _solve_exact(hvp: HVP, v: Tensor, **_: Any) -> tuple[Tensor, dict[str, Any]]:
    """Materialise H column by column (vmap over the basis) and solve H x = v directly."""
    n = v.numel()
    eye = torch.eye(n, dtype=v.dtype, device=v.device)
    h = torch.func.vmap(hvp)(eye)  # row i = H e_i = column i; H is symmetric up to rounding
    h = 0.5 * (h + h.T)
    x = torch.linalg.solve(h, v)
    eig = torch.linalg.eigvalsh(h)
    return x, {
        "iterations": 0,
        "hvp_calls": n,
        "lambda_max": float(eig.abs().max()),
        "lambda_min": float(eig.min()),
        "residual": _norm(h @ x - v) / max(_norm(v), 1e-300),
    }


def _solve_cg(
    hvp: HVP, v: Tensor, *, iterations: int, tol: float, **_: Any
) -> tuple[Tensor, dict[str, Any]]:
    """Conjugate gradient from x_0 = 0; stops at ‖r‖/‖v‖ <= tol, after `iterations` steps, or on
    non-positive curvature pᵀHp <= 0 (H not positive definite: add damping)."""
    x = torch.zeros_like(v)
    r = v.clone()
    p = r.clone()
    rs = _dot(r, r)
    v_norm = math.sqrt(rs)
    negative_curvature = False
    done = 0
    calls = 0
    if v_norm > 0:
        for _ in range(iterations):
            if math.sqrt(rs) <= tol * v_norm:
                break
            hp = hvp(p)
            calls += 1
            php = _dot(p, hp)
            if not php > 0:
                negative_curvature = True
                break
            step = rs / php
            x = x + step * p
            r = r - step * hp
            rs_new = _dot(r, r)
            p = r + (rs_new / rs) * p
            rs = rs_new
            done += 1
    # The recursive r drifts from v − Hx in finite precision; report the true residual.
    residual = _norm(v - hvp(x)) / v_norm if v_norm > 0 else 0.0
    return x, {
        "iterations": done,
        "hvp_calls": calls + (v_norm > 0),
        "residual": residual,
        "negative_curvature": negative_curvature,
    }


def _solve_neumann(
    hvp: HVP,
    v: Tensor,
    *,
    iterations: int,
    neumann_step: float | None,
    power_iterations: int,
    generator: torch.Generator | None,
    **_: Any,
) -> tuple[Tensor, dict[str, Any]]:
    """x_K = η Σ_{k<K} (I − ηH)^k v with K = iterations.

    Since ηH = I − A with A = I − ηH, H x_K = (I − A^K) v, so the residual v − H x_K is exactly
    the last series term A^K v: it is reported without an extra HVP. It shrinks iff every
    eigenvalue satisfies |1 − ηλ| < 1, i.e. 0 < η < 2/λ_max (for H positive definite).
    """
    info: dict[str, Any] = {}
    calls = 0
    if neumann_step is None:
        lam = power_iteration_lambda_max(hvp, v, power_iterations, generator)
        calls += power_iterations
        if not lam > 0:
            raise ValueError("power iteration found λ_max = 0; H is zero — add damping")
        neumann_step = NEUMANN_SAFETY / lam
        info["lambda_max"] = lam
    if not neumann_step > 0:
        raise ValueError(f"neumann_step must be > 0, got {neumann_step}")
    x = torch.zeros_like(v)
    term = v
    for _ in range(iterations):
        x = x + term
        term = term - neumann_step * hvp(term)
        calls += 1
    x = neumann_step * x
    v_norm = _norm(v)
    info.update(
        iterations=iterations,
        hvp_calls=calls,
        neumann_step=float(neumann_step),
        residual=_norm(term) / v_norm if v_norm > 0 else 0.0,
    )
    return x, info


SOLVERS: dict[str, Callable[..., tuple[Tensor, dict[str, Any]]]] = {
    "exact": _solve_exact,
    "cg": _solve_cg,
    "neumann": _solve_neumann,
}


def solve(
    hvp: HVP,
    v: Tensor,
    *,
    method: str = "cg",
    iterations: int = 20,
    tol: float = 1e-10,
    neumann_step: float | None = None,
    power_iterations: int = 20,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Approximate x = H⁻¹ v for a flat vector v given u ↦ H u (H symmetric).

    method: "exact" (H materialised, direct solve), "cg" (at most `iterations` CG steps, relative
    tolerance `tol`), "neumann" (`iterations` series terms, step `neumann_step` or
    NEUMANN_SAFETY/λ̂_max from `power_iterations` power-iteration steps). Returns (x, info) with
    info["method"], info["iterations"], info["hvp_calls"], info["residual"] = ‖Hx − v‖/‖v‖,
    info["converged"] (residual <= tol) and, where computed, info["lambda_max"].
    """
    if method not in SOLVERS:
        raise ValueError(f"unknown hypergradient method {method!r}; choose one of {list(SOLVERS)}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if v.dim() != 1:
        raise ValueError(f"v must be a flat vector, got shape {list(v.shape)}")
    x, info = SOLVERS[method](
        hvp,
        v,
        iterations=iterations,
        tol=tol,
        neumann_step=neumann_step,
        power_iterations=power_iterations,
        generator=generator,
    )
    info = {"method": method, "lambda_max": None, **info}
    info["converged"] = bool(info["residual"] <= tol)
    return x, info
