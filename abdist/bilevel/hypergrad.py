"""Implicit-function-theorem hypergradients for loss-parameter search (AutoBalance).

Lower problem:   θ*(α) = argmin_θ  L_train(θ, α) + (wd/2)·‖θ‖²
Upper problem:   F(α)  = L_val(θ*(α), α)

At a stationary point ∇_θ L_train(θ*, α) + wd·θ* = 0 the implicit function theorem gives

    dθ*/dα = −H⁻¹ · ∂²L_train/∂θ∂α,        H = ∇²_θ L_train(θ*, α) + wd·I,
    dF/dα  = ∂_α L_val − (∂²L_train/∂θ∂α)ᵀ · H⁻¹ · ∇_θ L_val.

The only hard part is x = H⁻¹ v with v = ∇_θ L_val; three solvers are offered (`SOLVERS`, in
abdist/bilevel/solvers.py):

* "exact":   materialise H (dim² memory) and solve directly. For small problems and tests.
* "cg":      conjugate gradient on Hessian-vector products; needs H positive definite (add
             `damping` for a non-convex full network). Default.
* "neumann": x ≈ η Σ_{k<K} (I − ηH)^k v. It converges only if η < 2/λ_max(H); the authors' fixed
             η = 1 diverges as soon as λ_max > 2 (measured: λ_max ≈ 3.5 on a tiny real problem).
             Here η defaults to 0.9/λ̂_max from a power iteration.

`damping` λ replaces H by H + λI in the solve (a regulariser that biases the answer towards
−(1/λ)·mixed·v for large λ); `weight_decay` is part of the true H and does not bias anything.

Contract for the two loss closures (`train_loss_fn(params, alpha)`, `val_loss_fn(params, alpha)`):

* they return a scalar and are pure functions of (params, alpha): the batches are closed over and
  FIXED (the same batches on every call), and the model is evaluated with
  `torch.func.functional_call(model, {**params, **frozen}, x)`;
* they must not mutate state: put BatchNorm in eval mode (or pass copies of its buffers) so the
  many re-evaluations of the graph never write validation or HVP statistics into running stats;
* they do NOT include the weight-decay term; pass it as `weight_decay` (if only some parameters
  are decayed, put that term inside `train_loss_fn` yourself and pass weight_decay=0);
* `params` holds exactly the tensors H is taken over. Scope "head": the classifier head's weight
  and bias with features precomputed (detached) by the frozen backbone, so H is (d·C)² and
  "exact"/"cg" are cheap and accurate. Scope "full": every network parameter; use "cg" with
  damping, or "neumann".

Parameters are passed as a dict name → tensor (what functional_call takes) or a single tensor;
internally they are flattened into one vector θ. alpha is a tensor or a dict name → tensor (e.g.
{"l": ..., "delta": ..., "w": ...}); the hypergradient comes back in the same structure. Nothing
here updates parameters, builds a graph that outlives the call, or touches module state; results
are detached.

Curvature. `curvature="hessian"` (default) uses the true ∇²_θ L_train. For a full non-convex network
that matrix is indefinite and CG stops on negative curvature after a step or two (measured: every
full-scope step on ResNet-32). `curvature="gauss_newton"` uses G = Jᵀ ∇²_z ℓ J instead, with
z = outputs(θ) the logits and ℓ the loss of the logits: positive semi-definite whenever ℓ is convex
in z (the parametric cross-entropy is, an affine map of z into a weighted CE; with a focal term it
is not, and neither is G), equal to the Hessian when the outputs are linear in θ (head scope), and
the standard curvature for IFT on deep networks. It needs the loss written as
`OutputLoss(outputs, loss)`. The mixed term stays exact: when α enters through ℓ only,
∂²L/∂θ∂α = Jᵀ ∂²ℓ/∂z∂α; when it moves the outputs too (`takes_alpha`), it is taken directly.

Forward-over-reverse (`hvp_mode="forward"`) recomputes one forward+backward per HVP and keeps no
graph; reverse-over-reverse (`hvp_mode="reverse"`, default) builds the gradient graph once and
reuses it for every HVP (faster, more memory). Neither works through DDP wrappers or
torch.compile: pass the unwrapped module and reduce the small hypergradient yourself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from abdist.bilevel.solvers import HVP, NEUMANN_SAFETY, SOLVERS, power_iteration_lambda_max, solve

# The solvers live in abdist/bilevel/solvers.py; re-exported for existing imports.
__all__ = [
    "NEUMANN_SAFETY",
    "OutputLoss",
    "SOLVERS",
    "hypergradient",
    "power_iteration_lambda_max",
    "solve",
]

Tree = Tensor | Mapping[str, Tensor]


@dataclass(frozen=True)
class OutputLoss:
    """A training loss written as ``loss(outputs(params), alpha)``, what Gauss-Newton needs.

    `outputs(params)` returns a tensor or a tuple of tensors (the logits of the fixed batches);
    `loss(outputs, alpha)` a scalar. Calling it is the plain loss, so it can be passed wherever a
    `train_loss_fn` goes. `takes_alpha`: the outputs depend on alpha too, `outputs(params,
    alpha)` (e.g. an input augmented at a tuned magnitude); Gauss-Newton then keeps the exact
    mixed term (see `_gauss_newton`).

    `outputs_fixed(params)`, with `takes_alpha`: the same outputs at the alpha the hypergradient
    is taken at, computed more cheaply (e.g. with the augmented batch's features computed once:
    no network pass back to alpha). Every curvature product of the solve uses it, and only the
    one mixed-term product goes through `outputs(params, alpha)`. None: `outputs(params, alpha)`
    at that alpha, and still only the mixed term differentiates in alpha.
    """

    outputs: Callable[..., Any]
    loss: Callable[[Any, Tree], Tensor]
    takes_alpha: bool = False
    outputs_fixed: Callable[[Tree], Any] | None = None

    def outputs_at(self, params: Tree, alpha: Tree) -> Any:
        return self.outputs(params, alpha) if self.takes_alpha else self.outputs(params)

    def at_fixed_alpha(self, alpha: Tree) -> Callable[[Tree], Any]:
        """params -> outputs at this (fixed) alpha."""
        if self.takes_alpha and self.outputs_fixed is not None:
            return self.outputs_fixed
        return lambda params: self.outputs_at(params, alpha)

    def __call__(self, params: Tree, alpha: Tree) -> Tensor:
        return self.loss(self.outputs_at(params, alpha), alpha)


# ----------------------------------------------------------------------------------------------
# Hypergradient.
# ----------------------------------------------------------------------------------------------


def _flatten(params: Tree) -> tuple[Tensor, Callable[[Tensor], Tree]]:
    """One flat detached vector θ and a map θ ↦ params-like structure of views into θ."""
    if isinstance(params, Tensor):
        shape = params.shape
        return params.detach().reshape(-1), lambda flat: flat.view(shape)
    if not isinstance(params, Mapping) or not params:
        raise ValueError("params must be a tensor or a non-empty dict name -> tensor")
    names = list(params)
    tensors = [params[k].detach() for k in names]
    dtypes = {t.dtype for t in tensors}
    devices = {t.device for t in tensors}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(f"params must share one dtype and device, got {dtypes} on {devices}")
    shapes = [t.shape for t in tensors]
    sizes = [t.numel() for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(theta: Tensor) -> dict[str, Tensor]:
        return {k: c.view(s) for k, c, s in zip(names, theta.split(sizes), shapes, strict=True)}

    return flat, unflatten


def _detach_tree(alpha: Tree) -> Tree:
    if isinstance(alpha, Tensor):
        return alpha.detach()
    if not isinstance(alpha, Mapping):
        raise ValueError("alpha must be a tensor or a dict name -> tensor")
    return {k: a.detach() for k, a in alpha.items()}


def _sub_tree(a: Tree, b: Tree) -> Tree:
    if isinstance(a, Tensor):
        return a - b
    return {k: a[k] - b[k] for k in a}


def hypergradient(
    train_loss_fn: Callable[[Tree, Tree], Tensor],
    val_loss_fn: Callable[[Tree, Tree], Tensor],
    params: Tree,
    alpha: Tree,
    *,
    method: str = "cg",
    weight_decay: float = 0.0,
    damping: float = 0.0,
    iterations: int = 20,
    neumann_step: float | None = None,
    tol: float = 1e-10,
    power_iterations: int = 20,
    generator: torch.Generator | None = None,
    hvp_mode: str = "reverse",
    curvature: str = "hessian",
) -> tuple[Tree, dict[str, Any]]:
    """IFT hypergradient dF/dα of F(α) = L_val(θ*(α), α) at θ = params (assumed ≈ θ*(α)):

        dF/dα = ∂_α L_val − (∂²L_train/∂θ∂α)ᵀ x,   x = (∇²_θ L_train + (wd + λ)·I)⁻¹ ∇_θ L_val,

    wd = weight_decay (the true Hessian of the (wd/2)‖θ‖² term, which train_loss_fn must NOT
    contain), λ = damping (an extra regulariser; 0 gives the exact IFT answer). x is found by
    `solve` with `method` / `iterations` / `tol` / `neumann_step` / `power_iterations` /
    `generator` (see there). The mixed term is a vector–Jacobian product of ∇_θ L_train with
    respect to α, so no C×dim matrix is formed.

    train_loss_fn(params, alpha) and val_loss_fn(params, alpha) are scalar closures over FIXED
    batches that evaluate the model through torch.func.functional_call and never mutate module
    state (see the module docstring). params: dict name → tensor or one tensor, the variables H
    is taken over. alpha: tensor or dict name → tensor. `curvature="gauss_newton"` replaces
    ∇²_θ L_train by its Gauss-Newton part (see the module docstring; train_loss_fn must then be
    an `OutputLoss`, and `hvp_mode` is not used).

    Returns (grad_alpha in alpha's structure, detached; info) where info is solve's dict plus
    "weight_decay", "damping", "hvp_mode" and "curvature". The result is exact only at a
    stationary point of the lower problem; info["residual"] measures the linear solve, not the
    lower-level optimality.
    """
    if hvp_mode not in ("reverse", "forward"):
        raise ValueError(f"hvp_mode must be 'reverse' or 'forward', got {hvp_mode!r}")
    if curvature not in ("hessian", "gauss_newton"):
        raise ValueError(f"curvature must be 'hessian' or 'gauss_newton', got {curvature!r}")
    if curvature == "gauss_newton" and not isinstance(train_loss_fn, OutputLoss):
        raise ValueError(
            "curvature='gauss_newton' needs train_loss_fn as OutputLoss(outputs, loss)"
        )
    if weight_decay < 0 or damping < 0:
        raise ValueError("weight_decay and damping must be >= 0")
    # torch.func transforms ignore an outer no_grad, but it stops tensors the closures capture
    # that require grad (e.g. backbone parameters in head scope) from growing an outer autograd
    # graph on every HVP.
    with torch.no_grad():
        return _hypergradient(
            train_loss_fn,
            val_loss_fn,
            params,
            alpha,
            method=method,
            weight_decay=weight_decay,
            damping=damping,
            iterations=iterations,
            neumann_step=neumann_step,
            tol=tol,
            power_iterations=power_iterations,
            generator=generator,
            hvp_mode=hvp_mode,
            curvature=curvature,
        )


def _hypergradient(
    train_loss_fn: Callable[[Tree, Tree], Tensor],
    val_loss_fn: Callable[[Tree, Tree], Tensor],
    params: Tree,
    alpha: Tree,
    *,
    method: str,
    weight_decay: float,
    damping: float,
    iterations: int,
    neumann_step: float | None,
    tol: float,
    power_iterations: int,
    generator: torch.Generator | None,
    hvp_mode: str,
    curvature: str,
) -> tuple[Tree, dict[str, Any]]:
    theta, unflatten = _flatten(params)
    alpha = _detach_tree(alpha)
    shift = float(weight_decay) + float(damping)

    def f_train(t: Tensor, a: Tree) -> Tensor:
        loss = train_loss_fn(unflatten(t), a)
        if loss.dim() != 0:
            raise ValueError(f"train_loss_fn must return a scalar, got shape {list(loss.shape)}")
        return loss

    def f_val(t: Tensor, a: Tree) -> Tensor:
        loss = val_loss_fn(unflatten(t), a)
        if loss.dim() != 0:
            raise ValueError(f"val_loss_fn must return a scalar, got shape {list(loss.shape)}")
        return loss

    grad_train = torch.func.grad(f_train, argnums=0)
    v, direct = torch.func.grad(f_val, argnums=(0, 1))(theta, alpha)
    # alpha moves the network's outputs (an input augmented at a tuned magnitude): the curvature
    # products run at the fixed alpha, so none of them differentiates the input path back to
    # alpha (a network-sized pass per product); the mixed term does that once.
    moves = isinstance(train_loss_fn, OutputLoss) and train_loss_fn.takes_alpha
    if moves:
        fixed = train_loss_fn.at_fixed_alpha(alpha)
        grad_fixed = torch.func.grad(lambda t: train_loss_fn.loss(fixed(unflatten(t)), alpha))

        def mixed_once(x: Tensor) -> Tree:
            return torch.func.vjp(lambda a: grad_train(theta, a), alpha)[1](x)[0]

    if curvature == "gauss_newton":
        hvp, mixed = _gauss_newton(train_loss_fn, theta, unflatten, alpha, shift)
    elif moves and hvp_mode == "reverse":
        _, vjp_theta = torch.func.vjp(grad_fixed, theta)

        def hvp(u: Tensor) -> Tensor:
            return vjp_theta(u)[0] + shift * u

        mixed = mixed_once
    elif moves:

        def hvp(u: Tensor) -> Tensor:
            return torch.func.jvp(grad_fixed, (theta,), (u,))[1] + shift * u

        mixed = mixed_once
    elif hvp_mode == "reverse":
        # One graph of ∇_θ L_train over (θ, α); each call of vjp_fn is a backward through it,
        # returning (H u, (∂²L/∂θ∂α)ᵀ u) at once. The α half is tiny next to the network pass.
        _, vjp_fn = torch.func.vjp(grad_train, theta, alpha)
        # The solvers end with a residual check hvp(x); mixed(x) needs the α half of that very
        # pass, so keep it instead of running the (network-sized) backward a second time.
        last: dict[str, Any] = {}

        def hvp(u: Tensor) -> Tensor:
            hu, mu = vjp_fn(u)
            last.update(u=u, mixed=mu)
            return hu + shift * u

        def mixed(x: Tensor) -> Tree:
            return last["mixed"] if last.get("u") is x else vjp_fn(x)[1]
    else:

        def hvp(u: Tensor) -> Tensor:
            return torch.func.jvp(lambda t: grad_train(t, alpha), (theta,), (u,))[1] + shift * u

        def mixed(x: Tensor) -> Tree:
            return torch.func.vjp(lambda a: grad_train(theta, a), alpha)[1](x)[0]

    x, info = solve(
        hvp,
        v.detach(),
        method=method,
        iterations=iterations,
        tol=tol,
        neumann_step=neumann_step,
        power_iterations=power_iterations,
        generator=generator,
    )
    grad = _sub_tree(direct, mixed(x))
    grad = grad.detach() if isinstance(grad, Tensor) else {k: g.detach() for k, g in grad.items()}
    info.update(
        weight_decay=float(weight_decay), damping=float(damping), hvp_mode=hvp_mode,
        curvature=curvature,
    )  # fmt: skip
    return grad, info


def _gauss_newton(
    f: OutputLoss, theta: Tensor, unflatten: Callable, alpha: Tree, shift: float
) -> tuple[HVP, Callable[[Tensor], Tree]]:
    """u ↦ (Jᵀ ∇²_z ℓ J + shift·I) u and x ↦ (∂²L/∂θ∂α)ᵀ x = (∂²ℓ/∂z∂α)ᵀ J x.

    One forward-mode pass through the network gives J u, a double derivative of ℓ on the (small)
    logits gives ∇²_z ℓ J u, and one backward through the graph built once gives Jᵀ(·).
    """

    at_alpha = f.at_fixed_alpha(alpha)

    def outputs(t: Tensor):
        return at_alpha(unflatten(t))

    z, vjp_out = torch.func.vjp(outputs, theta)
    grad_z = torch.func.grad(f.loss, argnums=0)
    last: dict[str, Any] = {}

    def jvp_out(u: Tensor):
        return torch.func.jvp(outputs, (theta,), (u,))[1]

    def hvp(u: Tensor) -> Tensor:
        ju = jvp_out(u)
        hz = torch.func.jvp(lambda zz: grad_z(zz, alpha), (z,), (ju,))[1]
        last.update(u=u, ju=ju)  # the solvers' final residual check is hvp(x); mixed(x) reuses J x
        return vjp_out(hz)[0] + shift * u

    def mixed(x: Tensor) -> Tree:
        if f.takes_alpha:
            # alpha also moves the outputs, so ∂²L/∂θ∂α has terms Gauss-Newton's split cannot
            # express: take it exactly, ∇_α of the directional derivative ⟨∇_θ L(θ, α), x⟩.
            def along_x(a: Tree) -> Tensor:
                return torch.func.jvp(lambda t: f(unflatten(t), a), (theta,), (x,))[1]

            return torch.func.grad(along_x)(alpha)
        jx = last["ju"] if last.get("u") is x else jvp_out(x)
        return torch.func.vjp(lambda a: grad_z(z, a), alpha)[1](jx)[0]

    return hvp, mixed
