"""One parametric cross-entropy, and the long-tail losses (CE, LA, LDAM, CDT, VS, ...) as presets.

Every preset is a `LossSpec`: per-class vectors w (weight), l (additive shift), delta
(multiplicative scale) and margin, plus a global scale and a focal exponent. AutoBalance learns
w, l and delta, so the functional core is differentiable with respect to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

REDUCTIONS = ("mean", "sum", "none")


def parametric_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    w: Tensor | None = None,
    l: Tensor | None = None,
    delta: Tensor | None = None,
    margin: Tensor | None = None,
    scale: float = 1.0,
    focal_gamma: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Parametric cross-entropy of logits [B, C] against target [B] (long).

    w, l, delta, margin are per-class tensors [C]; None means neutral (w=1, l=0, delta=1, margin=0).

      z'_j = scale * (delta_j * z_j + l_j - margin_j * [j == y])   for every class j
      p = softmax(z'),  ℓ_i = -(1 - p_y)^focal_gamma * log p_y   (focal_gamma = 0 gives plain CE)

    reduction "mean": Σ_i w_{y_i} ℓ_i / Σ_i w_{y_i} (PyTorch's weighted-mean convention), "sum":
    Σ_i w_{y_i} ℓ_i, "none": per-sample w_{y_i} ℓ_i. Normalising by Σ w makes a global scale of w
    have no effect, so when w is learned its overall size cannot act as a hidden learning rate;
    only the relative class weights matter.

    Differentiable with respect to logits, w, l, delta (and margin).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"need logits [B, C] and target [B], got {logits.shape}, {target.shape}")
    num_classes = logits.shape[1]
    for name, v in (("w", w), ("l", l), ("delta", delta), ("margin", margin)):
        if v is not None and v.shape != (num_classes,):
            raise ValueError(f"{name} must have shape [{num_classes}], got {list(v.shape)}")
    # Half-precision log-softmax loses the small probabilities that tail classes live on.
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if delta is not None:
        z = z * delta.to(z.dtype)
    if l is not None:
        z = z + l.to(z.dtype)
    if margin is not None:
        # A boolean mask instead of F.one_hot: no device sync, and margin stays differentiable.
        is_target = torch.arange(num_classes, device=z.device) == target[:, None]
        z = z - margin.to(z.dtype) * is_target
    logp_y = (scale * z).log_softmax(dim=1).gather(1, target[:, None]).squeeze(1)
    loss = -logp_y
    if focal_gamma != 0:  # gamma = 0 is plain CE: skip the extra ops
        # 1 - p_y via expm1 stays accurate when p_y is near 1 (where focal down-weights most);
        # the clamp guards a fractional power against a rounding-negative base on other backends.
        loss = loss * (-torch.expm1(logp_y)).clamp(min=0).pow(focal_gamma)
    if w is not None:
        w_y = w.to(z.dtype)[target]
        loss = loss * w_y
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean() if w is None else loss.sum() / w_y.sum()


def delta_from_logit(t: Tensor) -> Tensor:
    """Map a free parameter t to delta = sigmoid(t) in (0, 1), where the learnable Δ lives."""
    return torch.sigmoid(t)


def delta_to_logit(delta: Tensor, eps: float = 1e-4) -> Tensor:
    """Inverse of `delta_from_logit`: logit(clamp(delta, eps, 1 - eps)).

    The clamp keeps presets with delta_j = 1 (the largest class in CDT/VS) at a finite logit.
    """
    return torch.logit(torch.as_tensor(delta).clamp(eps, 1 - eps))


@dataclass
class DRWSchedule:
    """Deferred re-weighting: from epoch `epoch` on, the loss uses class weights `w`."""

    epoch: int
    w: Tensor


@dataclass
class LossSpec:
    """The parameters of `parametric_cross_entropy` for one loss; None vectors are neutral."""

    num_classes: int
    w: Tensor | None = None
    l: Tensor | None = None
    delta: Tensor | None = None
    margin: Tensor | None = None
    scale: float = 1.0
    focal_gamma: float = 0.0
    drw: DRWSchedule | None = None


def _log_prior(n: Tensor) -> Tensor:
    return torch.log(n / n.sum())


def _ce(n: Tensor, **_) -> LossSpec:
    """Plain cross-entropy: every parameter neutral."""
    return LossSpec(len(n))


def _la(n: Tensor, *, tau: float, **_) -> LossSpec:
    """Logit adjustment (Menon et al. 2021): l_j = tau * log π_j."""
    return LossSpec(len(n), l=tau * _log_prior(n))


def _balanced_softmax(n: Tensor, **_) -> LossSpec:
    """Balanced softmax (Ren et al. 2020): l_j = log π_j, i.e. exactly `la` with tau = 1."""
    return LossSpec(len(n), l=_log_prior(n))


def _ldam(n: Tensor, *, ldam_max_margin: float, ldam_scale: float, **_) -> LossSpec:
    """LDAM (Cao et al. 2019): margin_j = C / n_j^{1/4} with C chosen so max_j margin_j =
    ldam_max_margin, i.e. margin_j = ldam_max_margin * (n_min / n_j)^{1/4}; scale = ldam_scale.

    The paper's s = 30 assumes a cosine (normalised) classifier; with a plain linear head,
    scaling raw logits by 30 makes the softmax nearly hard, so lower ldam_scale there.
    """
    m = n.pow(-0.25)
    return LossSpec(len(n), margin=m * (ldam_max_margin / m.max()), scale=ldam_scale)


def _ldam_drw(n: Tensor, *, drw_epoch: int, drw_beta: float, **kw) -> LossSpec:
    """LDAM plus deferred re-weighting (Cao et al. 2019): neutral w before epoch drw_epoch, then
    the class-balanced effective-number weights of Cui et al. 2019,
    w_j = (1 - β) / (1 - β^{n_j}), normalised so that Σ_j w_j = C (β = drw_beta)."""
    if not 0.0 < drw_beta < 1.0:
        raise ValueError(f"drw_beta must be in (0, 1), got {drw_beta}")
    # -expm1(n log β) = 1 - β^n without cancellation when β^n is close to 1.
    w = (1.0 - drw_beta) / -torch.expm1(n * math.log(drw_beta))
    spec = _ldam(n, **kw)
    spec.drw = DRWSchedule(epoch=drw_epoch, w=w * (len(n) / w.sum()))
    return spec


def _cdt(n: Tensor, *, gamma: float, **_) -> LossSpec:
    """Class-dependent temperatures (Ye et al. 2020): delta_j = (n_j / n_max)^gamma."""
    return LossSpec(len(n), delta=(n / n.max()).pow(gamma))


def _vs(n: Tensor, *, tau: float, gamma: float, **_) -> LossSpec:
    """Vector-scaling loss (Kini et al. 2021): delta_j = (n_j/n_max)^gamma, l_j = tau * log π_j."""
    return LossSpec(len(n), delta=(n / n.max()).pow(gamma), l=tau * _log_prior(n))


def _focal(n: Tensor, *, gamma: float, **_) -> LossSpec:
    """Focal loss (Lin et al. 2017): focal_gamma = gamma, all vectors neutral."""
    return LossSpec(len(n), focal_gamma=gamma)


_BUILDERS = {
    "ce": _ce,
    "la": _la,
    "balanced_softmax": _balanced_softmax,
    "ldam": _ldam,
    "ldam_drw": _ldam_drw,
    "cdt": _cdt,
    "vs": _vs,
    "focal": _focal,
}
PRESETS = tuple(_BUILDERS)


def build_loss_spec(
    name: str,
    class_counts,
    *,
    tau: float = 1.0,
    gamma: float = 0.0,
    ldam_max_margin: float = 0.5,
    ldam_scale: float = 30.0,
    drw_epoch: int = 160,
    drw_beta: float = 0.9999,
) -> LossSpec:
    """Build the `LossSpec` of preset `name` (one of `PRESETS`) from training counts n_j.

    π_j = n_j / Σ_k n_k; each preset's builder (`_la`, `_ldam`, ...) documents its formula.
    Vectors are computed in float64 and returned in torch's default dtype.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(PRESETS)}")
    n = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    if n.numel() == 0:
        raise ValueError("class_counts is empty")
    for j, n_j in enumerate(n.tolist()):
        if not (n_j > 0 and math.isfinite(n_j)):
            raise ValueError(
                f"class_counts[{j}] = {n_j}: every class needs a positive count "
                "(log π_j of an empty class would be -inf)"
            )
    spec = _BUILDERS[name](
        n,
        tau=tau,
        gamma=gamma,
        ldam_max_margin=ldam_max_margin,
        ldam_scale=ldam_scale,
        drw_epoch=drw_epoch,
        drw_beta=drw_beta,
    )
    dtype = torch.get_default_dtype()
    for field in ("w", "l", "delta", "margin"):
        if getattr(spec, field) is not None:
            setattr(spec, field, getattr(spec, field).to(dtype))
    if spec.drw is not None:
        spec.drw.w = spec.drw.w.to(dtype)
    return spec


class ParametricLoss(nn.Module):
    """`parametric_cross_entropy` with the vectors of a `LossSpec` held as buffers."""

    _VECTORS = ("w", "l", "delta", "margin")
    _NEUTRAL = {"w": 1.0, "l": 0.0, "delta": 1.0, "margin": 0.0}

    def __init__(self, spec: LossSpec):
        """Copy the spec's vectors into buffers (None stays None) and start at epoch 0."""
        super().__init__()
        self.num_classes = spec.num_classes
        self.scale = spec.scale
        self.focal_gamma = spec.focal_gamma
        self.drw_epoch = None if spec.drw is None else spec.drw.epoch
        # Non-persistent: the buffers are a pure function of config and class counts, and the
        # DRW switch would change the state_dict keys (w None -> tensor) and break resumes;
        # a resumed run rebuilds the spec and calls set_epoch instead.
        for name in self._VECTORS:
            self.register_buffer(name, getattr(spec, name), persistent=False)
        self.register_buffer("_w_base", spec.w, persistent=False)
        self.register_buffer("_w_drw", None if spec.drw is None else spec.drw.w, persistent=False)
        self.set_epoch(0)

    def forward(self, logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """The loss of logits [B, C] against target [B]; see `parametric_cross_entropy`."""
        return parametric_cross_entropy(
            logits,
            target,
            w=self.w,
            l=self.l,
            delta=self.delta,
            margin=self.margin,
            scale=self.scale,
            focal_gamma=self.focal_gamma,
            reduction=reduction,
        )

    def set_epoch(self, epoch: int) -> None:
        """Apply the DRW schedule for `epoch`: DRW weights iff epoch >= drw_epoch.

        Depends only on `epoch`, not on call history, so a resumed run calling set_epoch(k) gets
        the same loss as an uninterrupted one.
        """
        use_drw = self.drw_epoch is not None and epoch >= self.drw_epoch
        self.w = self._w_drw if use_drw else self._w_base

    def per_class_params(self) -> dict[str, list[float]]:
        """Current {"w", "l", "delta", "margin"} as lists of length C, neutral values filled in."""
        out = {}
        for name in self._VECTORS:
            v = getattr(self, name)
            out[name] = [self._NEUTRAL[name]] * self.num_classes if v is None else v.tolist()
        return out
