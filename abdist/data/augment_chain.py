"""The RandAugment-style chain: per-sample parameter draws and their application to a batch.

Images are float ``[B, C, H, W]`` in ``[0, 1]`` (before mean/std normalisation). For each sample
``i`` of class ``y_i``, independently, with probability ``p = P[y_i]`` the chain runs at magnitude
``m = M[y_i]``; otherwise the sample is left as it is (``p = 0`` or ``m = 0`` is the identity).
The chain picks ``num_ops`` *distinct* ops uniformly at random from the configured set and applies
the chosen ones in this canonical order, each at the sample's magnitude ``m``; ``s`` is a random
sign, +1 or -1 with probability 1/2:

========== ====================================================================================
rotate     rotate by ``s * 30 * m`` degrees (counter-clockwise positive) about the centre
translate  shift by ``s * floor(150/331 * m * size)`` pixels along one axis chosen uniformly
           (x uses the width, y the height)
(both)     rotate and translate form ONE affine resampling: nearest neighbour, fill 0 (black);
           this equals ``torchvision.transforms.v2.functional.affine(img, angle, [tx, ty],
           scale=1, shear=[0, 0], interpolation=NEAREST, fill=0)``
brightness ``adjust_brightness(img, 1 + s * 0.9 * m)`` (v2: multiply, clamp to [0, 1])
contrast   ``adjust_contrast(img, 1 + s * 0.9 * m)`` (v2: blend with the mean of the
           grayscale image ``0.2989 R + 0.587 G + 0.114 B``, clamp to [0, 1])
hflip      mirror horizontally with probability ``m`` (so that ``m = 0`` stays the identity)
cutout     zero a ``L x L`` square, ``L = round(0.5 * m * min(H, W))``, centred on a uniformly
           drawn pixel and clipped at the border (DeVries & Taylor); equals v2 ``erase``
========== ====================================================================================

The magnitude scale is torchvision's RandAugment's (``transforms.v2.RandAugment``): our ``m`` in
[0, 1] is its ``magnitude / (num_magnitude_bins - 1)``; ``m = 1`` is its strongest setting for
rotate (30 degrees), translate (150/331 of the side) and brightness/contrast (0.9).

Random numbers are drawn in a fixed order, the same number of them whatever the strengths are
(so changing one class's strength never shifts another sample's randomness): ``u_apply [B]``,
``keys [B, K]`` (op ``k`` is chosen when its key is among the ``num_ops`` smallest),
``signs [B, 4]`` (rotate, translate, brightness, contrast), ``axis [B]``, ``u_flip [B]``, cutout
centre row ``[B]`` and column ``[B]``. The work is vectorised over the batch (one ``grid_sample``
for all rotated/translated samples, broadcast arithmetic for the rest): the same result as v2
called per sample (tests compare them), at a fraction of the per-sample Python overhead.

:func:`apply_smooth` is the same chain as a function of the magnitudes that autograd can
differentiate (AutoBalance's ``aug_mag``); see there for what it differentiates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from abdist.errors import UserError

# The op set, in the canonical order the chosen ops are applied.
OPS = ("rotate", "translate", "brightness", "contrast", "hflip", "cutout")
# Strength of each op at magnitude m = 1 (torchvision RandAugment's maxima; cutout: half the side).
MAX_ROTATE_DEG = 30.0
MAX_TRANSLATE_FRAC = 150.0 / 331.0
MAX_BRIGHTNESS = 0.9
MAX_CONTRAST = 0.9
MAX_CUTOUT_FRAC = 0.5
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale (used by adjust_contrast).
_LUMA = (0.2989, 0.587, 0.114)


def check_ops(ops: Sequence[str], num_ops: int) -> tuple[str, ...]:
    """The op subset in canonical order; a UserError for unknown names or a bad ``num_ops``
    (more ops than the set holds is fine: a sample then gets all of them)."""
    ops = list(ops)
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops or len(set(ops)) != len(ops):
        raise UserError(f"augment ops must be distinct names from {list(OPS)}, got {ops}")
    if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 1:
        raise UserError(f"num_ops must be a positive integer, got {num_ops!r}")
    return tuple(op for op in OPS if op in ops)


@dataclass
class AugmentParams:
    """The per-sample parameters of one batch's chain (tensors of length B).

    ``chosen[i, k]`` says op ``OPS[k]`` is applied to sample ``i`` (already false where the chain
    is not applied). Unchosen ops hold their identity value (angle 0, factor 1, size 0, ...).
    ``sign`` and ``along_x`` are the raw draws :func:`apply_smooth` recomputes strengths from.
    """

    applied: Tensor  # bool [B]: the chain ran for this sample (u_apply < p_y)
    magnitude: Tensor  # float [B]: m_y looked up for the sample
    chosen: Tensor  # bool [B, len(OPS)]
    sign: Tensor  # float [B, 4]: +-1 for rotate, translate, brightness, contrast
    along_x: Tensor  # bool [B]: the translation's axis
    angle: Tensor  # float [B], degrees, counter-clockwise
    translate: Tensor  # int64 [B, 2]: (tx, ty) pixels, + is right / down
    brightness: Tensor  # float [B] factor
    contrast: Tensor  # float [B] factor
    flip: Tensor  # bool [B]
    cutout: Tensor  # int64 [B, 4]: (top, left, height, width) after clipping; height 0 = none

    def select(self, idx: Tensor) -> AugmentParams:
        """The parameters of the samples ``idx`` (an index tensor)."""
        return AugmentParams(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def draw_params(
    y: Tensor,
    magnitude: Tensor,
    probability: Tensor,
    height: int,
    width: int,
    generator: torch.Generator | None,
    ops: tuple[str, ...] = OPS,
    num_ops: int = 2,
) -> AugmentParams:
    """Draw one batch's chain parameters for labels ``y [B]`` under per-class ``magnitude [C]``
    and ``probability [C]`` (see the module docstring for the layout of the draws)."""
    y = torch.as_tensor(y, dtype=torch.int64).reshape(-1).cpu()
    num_classes = len(magnitude)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise UserError(
            f"labels must lie in [0, {num_classes}), got {int(y.min())}..{int(y.max())}"
        )
    b, k = y.numel(), len(ops)
    m, p = magnitude[y], probability[y]

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator)

    # Every draw below happens whatever the strengths are (fixed stream layout).
    u_apply, keys, signs = rand(b), rand(b, k), rand(b, 4)
    axis, u_flip, cut_r, cut_c = rand(b), rand(b), rand(b), rand(b)
    sign = torch.where(signs < 0.5, -1.0, 1.0)
    applied = u_apply < p
    rank = keys.argsort(dim=1).argsort(dim=1)  # rank of each op's key within its sample
    picked = (rank < num_ops) & applied[:, None]
    chosen = torch.zeros(b, len(OPS), dtype=torch.bool)
    for j, op in enumerate(ops):
        chosen[:, OPS.index(op)] = picked[:, j]

    def on(op: str) -> Tensor:
        return chosen[:, OPS.index(op)]

    angle = torch.where(on("rotate"), sign[:, 0] * MAX_ROTATE_DEG * m, 0.0)
    along_x = axis < 0.5
    side = torch.where(along_x, float(width), float(height))
    # float64 before floor, so e.g. m = 1 on a 331-pixel side gives exactly 150 pixels.
    shift = torch.floor(MAX_TRANSLATE_FRAC * m.double() * side.double()).long()
    shift = torch.where(on("translate"), shift * sign[:, 1].long(), 0)
    translate = torch.stack([torch.where(along_x, shift, 0), torch.where(along_x, 0, shift)], 1)
    brightness = torch.where(on("brightness"), 1.0 + sign[:, 2] * MAX_BRIGHTNESS * m, 1.0)
    contrast = torch.where(on("contrast"), 1.0 + sign[:, 3] * MAX_CONTRAST * m, 1.0)
    flip = on("hflip") & (u_flip < m)
    length = torch.round(MAX_CUTOUT_FRAC * m.double() * min(height, width)).long()
    length = torch.where(on("cutout"), length, 0)
    centre_r = (cut_r * height).long().clamp_(max=height - 1)
    centre_c = (cut_c * width).long().clamp_(max=width - 1)
    top, left = centre_r - length // 2, centre_c - length // 2
    bottom, right = (top + length).clamp(max=height), (left + length).clamp(max=width)
    top, left = top.clamp(min=0), left.clamp(min=0)
    cutout = torch.stack([top, left, (bottom - top).clamp(min=0), (right - left).clamp(min=0)], 1)
    cutout[length == 0] = 0
    return AugmentParams(
        applied=applied,
        magnitude=m,
        chosen=chosen,
        sign=sign,
        along_x=along_x,
        angle=angle,
        translate=translate,
        brightness=brightness,
        contrast=contrast,
        flip=flip,
        cutout=cutout,
    )


def apply(x: Tensor, params: AugmentParams) -> Tensor:
    """Apply drawn parameters to a float batch ``[B, C, H, W]`` in [0, 1] (not in place).

    Only the samples an op touches are processed. Two exact rewrites keep it cheap: the flip is
    folded into the affine resampling (a mirror of the sampling grid, so ``hflip(affine(x))``
    bit for bit), and since a mirror commutes with brightness and contrast (pointwise, and the
    image mean is mirror-invariant) that equals the documented op order.
    """
    dev = x.device
    x = x.clone()
    geo = (params.angle != 0) | (params.translate != 0).any(1) | params.flip
    if geo.any():
        idx = geo.nonzero().squeeze(1)
        i = idx.to(dev)
        x[i] = _affine(
            x[i],
            params.angle[idx],
            params.translate[idx].to(torch.float32),
            params.flip[idx],
            mode="nearest",
        )
    tone = (params.brightness != 1) | (params.contrast != 1)
    if tone.any():
        idx = tone.nonzero().squeeze(1)
        i = idx.to(dev)
        # A factor of exactly 1 is an exact identity on [0, 1] values, so samples that have only
        # one of the two ops can share the batched arithmetic.
        x[i] = _tone(x[i], params.brightness[idx].to(dev), params.contrast[idx].to(dev))
    for n in (params.cutout[:, 2] > 0).nonzero().squeeze(1).tolist():
        top, left, ch, cw = params.cutout[n].tolist()
        x[n, :, top : top + ch, left : left + cw] = 0.0
    return x


def apply_smooth(x: Tensor, params: AugmentParams, magnitude: Tensor) -> Tensor:
    """The chain of ``params`` at per-sample magnitudes ``magnitude [B]``, differentiable in them.

    Everything random (which samples, which ops, signs, axes, flips, cutout holes) stays as drawn;
    only the strengths are recomputed from ``magnitude``. Brightness and contrast are the exact
    ops of :func:`apply` (their factors ``1 + s·0.9·m`` are smooth in ``m``). Rotation and
    translation use a smooth surrogate: bilinear instead of nearest resampling, and the
    continuous shift ``s·150/331·m·side`` instead of its floor, because the exact ops are piecewise
    constant in ``m`` (a zero derivative almost everywhere). The flip (a coin with probability
    ``m``) and cutout (an integer side) stay as drawn and carry no derivative. At
    ``magnitude = params.magnitude`` the output equals :func:`apply` for the photometric ops and
    differs from it only by the interpolation for the geometric ones.
    """
    dev = x.device
    m = magnitude.to(dev, x.dtype)
    on = params.chosen.to(dev)
    sign = params.sign.to(dev, x.dtype)
    rotate, translate = on[:, OPS.index("rotate")], on[:, OPS.index("translate")]
    angle = torch.where(rotate, sign[:, 0] * MAX_ROTATE_DEG * m, 0.0)
    h, w = x.shape[-2:]
    along_x = params.along_x.to(dev)
    side = torch.where(along_x, float(w), float(h)).to(x.dtype)
    shift = torch.where(translate, sign[:, 1] * MAX_TRANSLATE_FRAC * m * side, 0.0)
    t = torch.stack([torch.where(along_x, shift, 0.0), torch.where(along_x, 0.0, shift)], 1)
    flip = params.flip.to(dev)
    geo = rotate | translate | flip
    if bool(geo.any()):
        moved = _affine(x, angle, t, flip, mode="bilinear")
        x = torch.where(geo[:, None, None, None], moved, x)
    bright = torch.where(on[:, OPS.index("brightness")], 1.0 + sign[:, 2] * MAX_BRIGHTNESS * m, 1.0)
    contr = torch.where(on[:, OPS.index("contrast")], 1.0 + sign[:, 3] * MAX_CONTRAST * m, 1.0)
    tone = on[:, OPS.index("brightness")] | on[:, OPS.index("contrast")]
    if bool(tone.any()):
        x = torch.where(tone[:, None, None, None], _tone(x, bright, contr), x)
    if bool((params.cutout[:, 2] > 0).any()):
        keep = torch.ones_like(x[:, :1])
        for n in (params.cutout[:, 2] > 0).nonzero().squeeze(1).tolist():
            top, left, ch, cw = params.cutout[n].tolist()
            keep[n, :, top : top + ch, left : left + cw] = 0.0
        x = x * keep
    return x


def _tone(x: Tensor, brightness: Tensor, contrast: Tensor) -> Tensor:
    """v2 adjust_brightness then adjust_contrast with per-sample factors (not in place)."""
    sub = (x * brightness.to(x.dtype)[:, None, None, None]).clamp(0, 1)
    factor = contrast.to(x.dtype)[:, None, None, None]
    if x.shape[1] == 3:
        gray = sub[:, 0] * _LUMA[0] + sub[:, 1] * _LUMA[1] + sub[:, 2] * _LUMA[2]
    else:
        gray = sub[:, 0]
    mean = gray.mean(dim=(-2, -1))[:, None, None, None]
    return (sub * factor + mean * (1.0 - factor)).clamp(0, 1)


def _affine(x: Tensor, angle: Tensor, translate: Tensor, flip: Tensor, mode: str) -> Tensor:
    """Per-sample rotate+translate (then mirror where ``flip``), zero fill.

    torchvision's v2 ``affine`` builds the inverse matrix of ``T(t) C R(angle) C^-1`` in pixel
    units about the image centre, samples output pixel centres at ``j - (W - 1) / 2``, divides by
    ``W / 2`` and calls ``grid_sample(align_corners=False)``: the same steps here, one matrix per
    sample. Mirroring the grid along x gives ``horizontal_flip`` of that output exactly. The
    matrix is built in float64 (as v2 does) for nearest resampling; the smooth surrogate keeps
    the input's dtype so that autograd reaches the angle and shift.
    """
    b, _, h, w = x.shape
    exact = mode == "nearest"
    wide = torch.float64 if exact else x.dtype
    rot = torch.deg2rad(angle.to(wide))
    cos, sin = torch.cos(rot), torch.sin(rot)
    tx, ty = translate[:, 0].to(wide), translate[:, 1].to(wide)
    # Inverse rotation (shear 0, scale 1) applied to (p - t): the matrix v2 computes in float64.
    theta = torch.stack(
        [
            torch.stack([cos, sin, cos * -tx + sin * -ty], 1),
            torch.stack([-sin, cos, -sin * -tx + cos * -ty], 1),
        ],
        1,
    ).to(torch.float32 if exact else x.dtype)
    base = torch.empty(1, h, w, 3, dtype=theta.dtype, device=x.device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h).unsqueeze(-1))
    base[..., 2].fill_(1)
    scale = torch.tensor([0.5 * w, 0.5 * h], dtype=theta.dtype, device=theta.device)
    rescaled = theta.transpose(1, 2).div(scale).to(x.device)  # [B, 3, 2]
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(rescaled).view(b, h, w, 2)
    if bool(flip.any()):
        grid = torch.where(flip.to(x.device)[:, None, None, None], grid.flip(2), grid)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
