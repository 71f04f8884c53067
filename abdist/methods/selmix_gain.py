"""SelMix's gain matrix: the first-order change of the objective from one head step on a mixup of
classes (i, j), for every pair, in O(K^2 d + K^3) time and O(K^2) memory.

The model, for the derivation: class prototypes z_q (mean validation features, [K, d]), a linear
head A(z) = W z + b, and the surrogate confusion C_qj = pi_q s_qj with s_q = softmax(A(z_q)): class
q's row moves as its prototype's prediction does. The step for pair (i, j) is one SGD step of unit
size on cross-entropy of the mixed feature m = lbar z_i + (1 - lbar) z_j labelled i
(lbar = (lambda_min + 1) / 2, the mean mixing weight), on W and (if the head has one) b:

    grad_W = (p - e_i) m^T,  grad_b = p - e_i,  p = softmax(W m + b)
    dA_ql = -(p_l - [l = i]) (<m, z_q> + beta)        (beta = 1 with a bias, else 0)

and the gain is the objective's change along it, to first order:

    G_ij = sum_{q,l} D_ql dA_ql,   D_ql = dM/dA_ql = pi_q s_ql (g_ql - <g_q, s_q>),  g = dM/dC

With Gram = Z Z^T, E = Gram D and e = 1^T D (all K x K or K), <m, z_q> is lbar Gram_iq +
(1 - lbar) Gram_jq, so

    G_ij = -( sum_l p_ij,l V_ij,l - (lbar E_ii + (1 - lbar) E_ji + beta e_i) ),
    V_ij,l = lbar E_il + (1 - lbar) E_jl + beta e_l

which needs nothing of size K^4. Nor of size K^3: the mixed logits are an i-part plus a j-part,
so the softmax's numerators factorise and each sum over l is a K x K matrix product (`gains`);
time O(K^2 d + K^3) in three matrix products, memory O(K^2). The public code instead builds
the K^4 "logit change rate" with <z_i, z_q> in the label term where the derivation gives
<m_ij, z_q> (and no bias term); `gains_k4` below is that formulation, exact or as published,
for cross-checks on small K (tests/test_selmix_gain.py takes the step for every pair on a tiny
problem and finds the derivation's version right).

`s` (the rows the Jacobian dC/dA is taken at) is by default the empirical row-normalised
validation confusion, as the public code does; with the prototypes' own softmax the derivation
is exact for the surrogate, and that is what the brute-force test uses.
"""

from __future__ import annotations

import torch
from torch import Tensor

SAFE_NORM = 1e-250  # a normaliser above this is a sum of normal float64 numbers (to ~1e-58)


def logit_gradient(g: Tensor, C: Tensor) -> Tensor:
    """D[q, l] = dM/dA_ql through C_qj = pi_q softmax(A_q)_j, at the rows s = C / pi."""
    pi = C.sum(1, keepdim=True)
    s = C / pi.clamp_min(1e-30)
    return pi * s * (g - (g * s).sum(1, keepdim=True))


def gains(
    Z: Tensor,
    W: Tensor,
    b: Tensor | None,
    D: Tensor,
    *,
    lam_bar: float,
    chunk_elements: int = 1 << 24,
    factorised: bool = True,
) -> Tensor:
    """G [K, K]: gain of a unit head step on the (i, j) mixup labelled i (module docstring).

    Z: prototypes [K, d]; W: head weight [K, d]; b: head bias [K] or None; D: dM/dA [K, K].
    Computed in float64 and returned in Z's dtype.

    The mixed logits are a sum of an i-part and a j-part, so the softmax's numerators factorise,
    exp(a_ijl) = alpha_il beta_jl, and every sum over l is a K x K matrix product
    (``factorised``: three K^3 products, no K^3 tensor). Each factor is shifted by its own row
    maximum; a row with a pair whose normaliser comes near float64's underflow (logit margins
    beyond ~575, where the factors turn subnormal and lose digits) is recomputed by the exact
    softmax, a chunk of rows at a time (at most ``chunk_elements``
    elements of [rows, K, K] held at once), which is also the path with factorised=False.
    """
    dtype = Z.dtype
    Z, W, D = Z.double(), W.double(), D.double()
    K = Z.shape[0]
    U = Z @ W.T  # U[q, l]: logit l of prototype q without the bias
    E = (Z @ Z.T) @ D
    beta = 0.0 if b is None else 1.0
    e = D.sum(0)
    bias = torch.zeros(K, dtype=Z.dtype, device=Z.device) if b is None else b.double()
    Ui, Uj = lam_bar * U, (1 - lam_bar) * U + bias  # [i, l], [j, l]: the mixed logits' parts
    Ei, Ej = lam_bar * E, (1 - lam_bar) * E + beta * e  # V_ij,l's parts
    # The label term lbar E_ii + (1 - lbar) E_ji + beta e_i.
    label = (lam_bar * torch.diagonal(E) + beta * e)[:, None] + (1 - lam_bar) * E.T
    redo = torch.ones(K, dtype=torch.bool, device=Z.device)
    out = torch.empty(K, K, dtype=Z.dtype, device=Z.device)
    if factorised:
        alpha = torch.exp(Ui - Ui.max(1, keepdim=True).values)
        beta_ = torch.exp(Uj - Uj.max(1, keepdim=True).values)
        norm = alpha @ beta_.T
        pv = ((alpha * Ei) @ beta_.T + alpha @ (beta_ * Ej).T) / norm
        out = -(pv - label)
        # Near float64's underflow the factors are subnormal and lose digits: redo those rows.
        redo = ~(torch.isfinite(out).all(1) & (norm > SAFE_NORM).all(1))
    rows = [int(r) for r in torch.nonzero(redo).flatten()]
    step = max(1, chunk_elements // (K * K))
    for a in range(0, len(rows), step):
        i = torch.tensor(rows[a : a + step], device=Z.device)
        p = torch.softmax(Ui[i, None, :] + Uj[None], dim=-1)  # [c, j, l]
        pv = torch.einsum("cjl,cl->cj", p, Ei[i]) + torch.einsum("cjl,jl->cj", p, Ej)
        out[i] = -(pv - label[i])
    return out.to(dtype)


def gains_k4(Z, W, b, D, *, lam_bar: float, published: bool = False) -> Tensor:
    """The same gains through the explicit K^4 logit-change tensor (small K only).

    published=True: as the public code builds it (<z_i, z_q> in the label term, no bias term)."""
    K = Z.shape[0]
    mix = lam_bar * Z[:, None, :] + (1 - lam_bar) * Z[None, :, :]  # [i, j, d]
    bias = 0 if b is None else b
    p = torch.softmax(mix @ W.T + bias, dim=-1)  # [i, j, l]
    inner = torch.einsum("ijd,qd->ijq", mix, Z)  # <m_ij, z_q>
    eye = torch.eye(K, dtype=Z.dtype, device=Z.device)
    if published:
        own = torch.einsum("id,qd->iq", Z, Z)[:, None, :].expand(K, K, K)  # <z_i, z_q>
        lcr = -inner[..., None] * p[:, :, None, :] + eye[:, None, None, :] * own[..., None]
    else:
        beta = 0.0 if b is None else 1.0
        h = inner + beta
        lcr = -h[..., None] * (p[:, :, None, :] - eye[:, None, None, :])
    return torch.einsum("ijql,ql->ij", lcr, D)


def pair_distribution(
    G: Tensor, temperature: float, allowed: Tensor | None = None, relative: bool = False
) -> Tensor:
    """P [K, K] = softmax(G / T) over the `allowed` pairs with positive gain (0 elsewhere);
    uniform over the allowed pairs when none of them gains (`allowed`: bool [K, K], default all;
    SelMix allows the pairs whose two classes have training samples to draw). `relative`: T is
    in units of the largest gain, softmax(G / (T max G)), so P does not depend on the gains'
    scale (feature norms, the unit step) -- only on how they compare."""
    allowed = torch.ones_like(G, dtype=torch.bool) if allowed is None else allowed
    if not bool(allowed.any()):
        raise ValueError("no pair is allowed")
    positive = (G > 0) & allowed
    if not bool(positive.any()):
        return allowed.to(G.dtype) / allowed.sum()
    scale = G[positive].max() if relative else 1.0
    logits = torch.where(positive, G / (temperature * scale), torch.full_like(G, -torch.inf))
    return torch.softmax(logits.flatten(), 0).view_as(G)
