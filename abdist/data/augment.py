"""Class-aware per-sample augmentation with a per-class strength table in shared memory.

AutoBalance tunes, per class ``y``, how strongly the training images of that class are augmented.
Two numbers per class live in an :class:`AugmentTable`: a probability ``p_y`` and a magnitude
``m_y``, both in ``[0, 1]``. The table's storage is a shared-memory tensor, so the training
process can change it (``table.set(...)``) while DataLoader worker processes keep running: each
batch a worker produces reads the table afresh.

Semantics of :class:`ClassAwareAugment` (the contract other backends, e.g. FFCV, must match)
------------------------------------------------------------------------------------------------
Images are float tensors in ``[0, 1]`` (uint8 input is divided by 255 first), shape ``[C, H, W]``
or ``[B, C, H, W]``, *before* mean/std normalisation. For each sample ``i`` of class ``y_i``,
independently:

1. ``base_transform`` (if any) is applied to the whole batch first, e.g. the standard CIFAR
   random crop with 4-pixel zero padding + horizontal flip (:class:`RandomCropFlip`). It does not
   depend on the class.
2. With probability ``p = P[y_i]`` the RandAugment-style chain below is applied with magnitude
   ``m = M[y_i]``; otherwise the sample is left as it is. ``p = 0`` or ``m = 0`` is the identity.
   The mask is Bernoulli(p_y) (one uniform per sample), so the expected loss over it is
   ``p_y * loss(chain_m(base(x))) + (1 - p_y) * loss(base(x))``: the form that
   :mod:`abdist.methods.autobalance` differentiates with respect to ``p`` (there, ``base(x)``
   plays the clean input).
3. The chain picks ``num_ops`` (default 2) *distinct* ops uniformly at random from ``ops``
   (default all six below) and applies the chosen ones in this canonical order, each at the
   sample's magnitude ``m``; ``s`` is a random sign, +1 or -1 with probability 1/2:

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

   The magnitude scale is torchvision's RandAugment's (``transforms.v2.RandAugment``): our
   ``m`` in [0, 1] is its ``magnitude / (num_magnitude_bins - 1)``; ``m = 1`` is its strongest
   setting for rotate (30 degrees), translate (150/331 of the side) and brightness/contrast (0.9).

The random numbers are drawn from the given ``torch.Generator`` in a fixed order, the same number
of them whatever the table says (so changing one class's strength never shifts another sample's
randomness): ``base_transform``'s draws, then ``u_apply [B]``, ``keys [B, K]`` (op ``k`` is
chosen when its key is among the ``num_ops`` smallest), ``signs [B, 4]`` (rotate, translate,
brightness, contrast), ``axis [B]``, ``u_flip [B]``, cutout centre row ``[B]`` and column ``[B]``.
Another backend must reproduce this *distribution*; reproducing the exact stream is not required.

The implementation is vectorised over the batch (one ``grid_sample`` for all rotated/translated
samples, broadcast arithmetic for the rest) instead of looping over v2 functional calls per
sample: same result (tests compare it sample by sample with ``torchvision.transforms.v2``), at a
fraction of the per-sample Python overhead, which matters on a 2-core loader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from abdist.errors import UserError

__all__ = [
    "AugmentParams",
    "AugmentTable",
    "ClassAwareAugment",
    "OPS",
    "RandomCropFlip",
]

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

# base_transform(x, generator) -> x on a float [B, C, H, W] batch in [0, 1]; the same signature as
# abdist.data.memory.Augment, so the in-memory augmentations can be reused here.
BaseTransform = Callable[[Tensor, "torch.Generator | None"], Tensor]


class AugmentTable:
    """Per-class augmentation strengths (magnitude and probability, each in [0, 1]).

    The values live in one ``[2, num_classes]`` float32 tensor in shared memory, created here,
    i.e. before any DataLoader worker starts. Workers inherit (fork) or receive (spawn, through
    torch's shared-memory pickling) the same storage, so :meth:`set` in the training process is
    seen by running workers at their next batch: no restart, no queue.

    Reads take a consistent snapshot with a sequence counter (a seqlock): a reader never mixes the
    magnitudes of one update with the probabilities of another. There must be a single writer
    per table (the training process of that rank).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        magnitude: float | Sequence[float] | Tensor = 0.0,
        probability: float | Sequence[float] | Tensor = 0.0,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
        self._values = torch.zeros(2, num_classes, dtype=torch.float32).share_memory_()
        # Even: stable; odd: a write is in progress. Shared like the values.
        self._version = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.set(magnitude=magnitude, probability=probability)

    @property
    def num_classes(self) -> int:
        """Number of classes (length of each row)."""
        return self._values.shape[1]

    @property
    def version(self) -> int:
        """The seqlock counter: +2 per completed write (including the constructor's); odd while
        a write is in progress. Readers can compare it to notice an update."""
        return int(self._version.item())

    def _as_row(self, name: str, value: Any) -> Tensor:
        row = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
        if row.ndim == 0:
            row = row.expand(self.num_classes)
        if row.shape != (self.num_classes,):
            raise UserError(
                f"{name} must be a scalar or have one value per class ({self.num_classes}), "
                f"got shape {tuple(row.shape)}"
            )
        if not torch.isfinite(row).all() or (row < 0).any() or (row > 1).any():
            bad = row[~(torch.isfinite(row) & (row >= 0) & (row <= 1))][0].item()
            raise UserError(f"{name} values must lie in [0, 1], got {bad}")
        return row

    def set(
        self,
        *,
        magnitude: float | Sequence[float] | Tensor | None = None,
        probability: float | Sequence[float] | Tensor | None = None,
    ) -> None:
        """Update magnitudes and/or probabilities: a scalar (all classes) or one value per class.

        Validates everything before writing anything, then writes in place (the shared storage
        must never be replaced, or workers would keep reading the old one).
        """
        rows = {}
        if magnitude is not None:
            rows[0] = self._as_row("magnitude", magnitude)
        if probability is not None:
            rows[1] = self._as_row("probability", probability)
        if not rows:
            return
        self._version.add_(1)
        for i, row in rows.items():
            self._values[i].copy_(row)
        self._version.add_(1)

    def snapshot(self) -> tuple[Tensor, Tensor]:
        """Consistent copies ``(magnitude [C], probability [C])`` of the current table."""
        while True:
            before = int(self._version.item())
            if before % 2 == 0:
                values = self._values.clone()
                if int(self._version.item()) == before:
                    return values[0], values[1]

    @property
    def magnitude(self) -> Tensor:
        """A copy of the per-class magnitudes ``[C]``."""
        return self.snapshot()[0]

    @property
    def probability(self) -> Tensor:
        """A copy of the per-class probabilities ``[C]``."""
        return self.snapshot()[1]

    def state_dict(self) -> dict[str, Tensor]:
        """Magnitudes and probabilities, for checkpoints."""
        magnitude, probability = self.snapshot()
        return {"magnitude": magnitude, "probability": probability}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict` output (in place, so workers keep seeing the table)."""
        self.set(magnitude=state["magnitude"], probability=state["probability"])

    def __repr__(self) -> str:
        m, p = self.snapshot()
        return (
            f"AugmentTable(num_classes={self.num_classes}, magnitude={m.tolist()}, "
            f"probability={p.tolist()})"
        )


class RandomCropFlip:
    """Picklable base transform: random crop with ``pad`` zero padding, optional h-flip.

    The standard CIFAR augmentation (``RandomCrop(size, padding=pad)`` + ``RandomHorizontalFlip``)
    on a batch ``[B, C, H, W]`` of any dtype; zero padding is black, as torchvision's default
    fill. It draws the same numbers and returns the same tensor as
    :func:`abdist.data.memory.random_shift` (tests check this), but as one ``gather`` over
    precomputed source indices, about 2.5x faster, and as a class, so that it can be pickled into
    spawned DataLoader workers (a closure cannot).
    """

    def __init__(self, pad: int = 4, flip: bool = True) -> None:
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise UserError(f"pad must be a non-negative integer, got {pad!r}")
        self.pad, self.flip = pad, bool(flip)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Crop/flip each sample of ``x`` independently, drawing from ``generator``."""
        pad = self.pad
        if pad == 0 and not self.flip:
            return x
        b, c, h, w = x.shape
        gdev = generator.device if generator is not None else torch.device("cpu")
        # Draw order as random_shift: dy, dx, then the mirror coin.
        dy = dx = torch.zeros(b, dtype=torch.int64)
        if pad > 0:
            dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev).cpu()
            dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev).cpu()
        cols = torch.arange(w).expand(b, w)
        if self.flip:
            mirror = (torch.rand(b, generator=generator, device=gdev) < 0.5).cpu()
            cols = torch.where(mirror[:, None], w - 1 - cols, cols)
        rows = torch.arange(h)[None, :] + dy[:, None] - pad  # [B, H] source rows
        cols = cols + dx[:, None] - pad  # [B, W] source columns
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        src = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]
        src = torch.where(inside, src, h * w).view(b, 1, h * w).expand(b, c, h * w)
        # Index h*w points at an appended zero pixel: the padding.
        flat = torch.cat([x.reshape(b, c, h * w), x.new_zeros(b, c, 1)], dim=2)
        return flat.gather(2, src.to(x.device)).view(b, c, h, w)

    def __repr__(self) -> str:
        return f"RandomCropFlip(pad={self.pad}, flip={self.flip})"


@dataclass
class AugmentParams:
    """The per-sample parameters of one batch's class-aware chain (all tensors of length B).

    ``chosen[i, k]`` says op ``OPS[k]`` is applied to sample ``i`` (already false where the chain
    is not applied). Unchosen ops hold their identity value (angle 0, factor 1, size 0, ...).
    """

    applied: Tensor  # bool [B]: the chain ran for this sample (u_apply < p_y)
    magnitude: Tensor  # float [B]: m_y looked up for the sample
    chosen: Tensor  # bool [B, len(OPS)]
    angle: Tensor  # float [B], degrees, counter-clockwise
    translate: Tensor  # int64 [B, 2]: (tx, ty) pixels, + is right / down
    brightness: Tensor  # float [B] factor
    contrast: Tensor  # float [B] factor
    flip: Tensor  # bool [B]
    cutout: Tensor  # int64 [B, 4]: (top, left, height, width) after clipping; height 0 = none


class ClassAwareAugment:
    """``x, y -> x``: per-sample, class-dependent RandAugment-style chain (see module docstring).

    ``table`` gives each class's probability and magnitude; it is read once per call, so a
    running worker follows :meth:`AugmentTable.set` from its next batch on. ``ops`` restricts
    the op set (a subset of :data:`OPS`, applied in canonical order) and ``num_ops`` is how many
    distinct ops a sample gets when the chain runs.
    """

    def __init__(
        self,
        table: AugmentTable,
        base_transform: BaseTransform | None = None,
        *,
        num_ops: int = 2,
        ops: Sequence[str] = OPS,
    ) -> None:
        if not isinstance(table, AugmentTable):
            raise UserError(f"table must be an AugmentTable, got {type(table).__name__}")
        unknown = [op for op in ops if op not in OPS]
        if unknown or not ops or len(set(ops)) != len(ops):
            raise UserError(f"ops must be distinct names from {OPS}, got {list(ops)}")
        if (
            isinstance(num_ops, bool)
            or not isinstance(num_ops, int)
            or not 1 <= num_ops <= len(ops)
        ):
            raise UserError(f"num_ops must be an integer in [1, {len(ops)}], got {num_ops!r}")
        self.table = table
        self.base_transform = base_transform
        self.num_ops = num_ops
        self.ops = tuple(op for op in OPS if op in ops)  # canonical order

    @property
    def num_classes(self) -> int:
        """Number of classes of the strength table."""
        return self.table.num_classes

    def sample_params(
        self, y: Tensor, height: int, width: int, generator: torch.Generator | None = None
    ) -> AugmentParams:
        """Draw one batch's chain parameters for labels ``y [B]`` (see the module docstring)."""
        y = torch.as_tensor(y, dtype=torch.int64).reshape(-1).cpu()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise UserError(
                f"labels must lie in [0, {self.num_classes}), got {int(y.min())}..{int(y.max())}"
            )
        b, k = y.numel(), len(self.ops)
        magnitude_c, probability_c = self.table.snapshot()
        m, p = magnitude_c[y], probability_c[y]

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator)

        # Every draw below happens whatever the table holds (fixed stream layout).
        u_apply, keys, signs = rand(b), rand(b, k), rand(b, 4)
        axis, u_flip, cut_r, cut_c = rand(b), rand(b), rand(b), rand(b)
        sign = torch.where(signs < 0.5, -1.0, 1.0)
        applied = u_apply < p
        rank = keys.argsort(dim=1).argsort(dim=1)  # rank of each op's key within its sample
        picked = (rank < self.num_ops) & applied[:, None]
        chosen = torch.zeros(b, len(OPS), dtype=torch.bool)
        for j, op in enumerate(self.ops):
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
        cutout = torch.stack(
            [top, left, (bottom - top).clamp(min=0), (right - left).clamp(min=0)], 1
        )
        cutout[length == 0] = 0
        return AugmentParams(
            applied=applied,
            magnitude=m,
            chosen=chosen,
            angle=angle,
            translate=translate,
            brightness=brightness,
            contrast=contrast,
            flip=flip,
            cutout=cutout,
        )

    @staticmethod
    def apply(x: Tensor, params: AugmentParams) -> Tensor:
        """Apply drawn parameters to a float batch ``[B, C, H, W]`` in [0, 1] (not in place).

        Only the samples an op touches are processed. Two exact rewrites keep it cheap: the flip
        is folded into the affine resampling (a mirror of the sampling grid, so ``hflip(affine(x))``
        bit for bit), and since a mirror commutes with brightness and contrast (pointwise, and
        the image mean is mirror-invariant) that equals the documented op order.
        """
        b, c, h, w = x.shape
        dev = x.device
        x = x.clone()
        geo = (params.angle != 0) | (params.translate != 0).any(1) | params.flip
        if geo.any():
            idx = geo.nonzero().squeeze(1)
            i = idx.to(dev)
            x[i] = _affine_nearest(
                x[i], params.angle[idx], params.translate[idx].to(torch.float32), params.flip[idx]
            )
        tone = (params.brightness != 1) | (params.contrast != 1)
        if tone.any():
            idx = tone.nonzero().squeeze(1)
            i = idx.to(dev)
            # A factor of exactly 1 is an exact identity on [0, 1] values, so samples that have
            # only one of the two ops can share the batched arithmetic.
            sub = x[i].mul_(params.brightness[idx].to(dev, x.dtype)[:, None, None, None])
            sub.clamp_(0, 1)
            factor = params.contrast[idx].to(dev, x.dtype)[:, None, None, None]
            if c == 3:
                gray = sub[:, 0] * _LUMA[0] + sub[:, 1] * _LUMA[1] + sub[:, 2] * _LUMA[2]
            else:
                gray = sub[:, 0]
            mean = gray.mean(dim=(-2, -1))[:, None, None, None]
            x[i] = sub.mul_(factor).add_(mean * (1.0 - factor)).clamp_(0, 1)
        for n in (params.cutout[:, 2] > 0).nonzero().squeeze(1).tolist():
            top, left, ch, cw = params.cutout[n].tolist()
            x[n, :, top : top + ch, left : left + cw] = 0.0
        return x

    def __call__(
        self, x: Tensor, y: Tensor | int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Augment one image ``[C, H, W]`` (``y`` an int) or a batch ``[B, C, H, W]`` (``y [B]``).

        Returns float32 in [0, 1]; uint8 input is divided by 255 first.
        """
        single = x.ndim == 3
        if single:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise UserError(f"images must be [C, H, W] or [B, C, H, W], got {tuple(x.shape)}")
        x = x.float().div_(255) if x.dtype == torch.uint8 else x
        y = torch.as_tensor(y).reshape(-1)
        if y.numel() != x.shape[0]:
            raise UserError(f"got {y.numel()} labels for {x.shape[0]} images")
        if self.base_transform is not None:
            x = self.base_transform(x, generator)
        params = self.sample_params(y, x.shape[-2], x.shape[-1], generator)
        x = self.apply(x, params)
        return x[0] if single else x

    def __repr__(self) -> str:
        return (
            f"ClassAwareAugment(num_classes={self.num_classes}, ops={list(self.ops)}, "
            f"num_ops={self.num_ops}, base_transform={self.base_transform!r})"
        )


def _affine_nearest(x: Tensor, angle: Tensor, translate: Tensor, flip: Tensor) -> Tensor:
    """Per-sample rotate+translate (then mirror where ``flip``), nearest neighbour, zero fill.

    torchvision's v2 ``affine`` builds the inverse matrix of ``T(t) C R(angle) C^-1`` in pixel
    units about the image centre, samples output pixel centres at ``j - (W - 1) / 2``, divides
    by ``W / 2`` and calls ``grid_sample(align_corners=False)``: the same steps here, one matrix
    per sample. Mirroring the grid along x gives ``horizontal_flip`` of that output exactly.
    """
    b, _, h, w = x.shape
    rot = torch.deg2rad(angle.double())
    cos, sin = torch.cos(rot), torch.sin(rot)
    tx, ty = translate[:, 0].double(), translate[:, 1].double()
    # Inverse rotation (shear 0, scale 1) applied to (p - t): the matrix v2 computes in float64.
    theta = torch.stack(
        [
            torch.stack([cos, sin, cos * -tx + sin * -ty], 1),
            torch.stack([-sin, cos, -sin * -tx + cos * -ty], 1),
        ],
        1,
    ).to(torch.float32)
    base = torch.empty(1, h, w, 3, dtype=torch.float32, device=x.device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h).unsqueeze(-1))
    base[..., 2].fill_(1)
    scale = torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32)
    rescaled = theta.transpose(1, 2).div(scale).to(x.device)  # [B, 3, 2]
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(rescaled).view(b, h, w, 2)
    if flip.any():
        grid = torch.where(flip.to(x.device)[:, None, None, None], grid.flip(2), grid)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
