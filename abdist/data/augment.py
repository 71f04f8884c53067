"""The training augmentation: one system for every data path (in memory, WebDataset, FFCV).

A training batch gets, in this order:

1. the **class-aware chain** (:mod:`abdist.data.augment_chain`): with probability ``p_y`` a
   RandAugment-style chain of ``data.augment_num_ops`` ops from ``data.augment_ops`` at magnitude
   ``m_y``, both per class, read from an :class:`~abdist.data.augment_table.AugmentTable` at the
   version the batch's index selects (so a run is bitwise reproducible while AutoBalance tunes
   the table). It works on ``[0, 1]`` pixels: in the loader workers before normalisation for
   streamed WebDataset shards; on normalised tensors (un-normalised for the chain, samples the
   chain leaves alone untouched) in memory and on FFCV. Its random numbers come from a generator
   seeded by (``train.seed``, the rank's stream, the batch index), never from the epoch's
   generator, so switching the chain on or off leaves every other draw of the run as it was.
2. the **base crop/flip** (:class:`RandomCropFlip`: ``data.augment_pad`` zero padding of the
   normalised image, i.e. the dataset mean, and ``data.augment_flip``), class-independent: in
   the loader workers after normalisation for streamed WebDataset shards, each batch drawing
   from a generator seeded by (the pass seed, the rank, the batch index); in the training
   process, drawn from the epoch's generator, in memory and on FFCV.

Every callable here has one signature, ``augment(x, y, generator=None, batch=None) -> x``: images,
their labels, the generator to draw from (or None) and the batch's index (what the table lookup
needs; None: the newest values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from abdist.data import augment_chain
from abdist.data.augment_chain import OPS, AugmentParams, check_ops
from abdist.data.augment_table import AugmentTable
from abdist.data.planning import derive_seed
from abdist.errors import UserError

__all__ = ["OPS", "AugmentTable", "ClassAwareAugment", "RandomCropFlip", "TrainAugment"]


class RandomCropFlip:
    """Random crop with ``pad`` zero padding and an optional horizontal flip, per sample.

    The standard CIFAR augmentation (``RandomCrop(size, padding=pad)`` + ``RandomHorizontalFlip``)
    on a batch ``[B, C, H, W]`` of any dtype, as one ``gather`` over precomputed source indices.
    Draws ``dy [B]``, ``dx [B]`` (when ``pad > 0``), then the mirror coins ``[B]`` (with ``flip``).
    A class, so it pickles into spawned workers.
    """

    def __init__(self, pad: int = 4, flip: bool = True) -> None:
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise UserError(f"pad must be a non-negative integer, got {pad!r}")
        self.pad, self.flip = pad, bool(flip)

    def __call__(
        self,
        x: Tensor,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        batch: int | None = None,
    ) -> Tensor:
        pad = self.pad
        if pad == 0 and not self.flip:
            return x
        b, c, h, w = x.shape
        gdev = generator.device if generator is not None else torch.device("cpu")
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
        src = torch.where(inside, src, h * w).view(b, h * w, 1).expand(b, h * w, c)
        # Index h*w points at an appended zero pixel: the padding. The gather runs over
        # [B, H*W, C] and returns permute(...).contiguous(), the layout the original shift
        # produced: with C=1 that leaves channels-last strides, which select the convolution
        # kernels, so runs stay bitwise what they were.
        flat = torch.cat([x.reshape(b, c, h * w).transpose(1, 2), x.new_zeros(b, 1, c)], dim=1)
        out = flat.gather(1, src.to(x.device)).view(b, h, w, c)
        return out.permute(0, 3, 1, 2).contiguous()

    def __repr__(self) -> str:
        return f"RandomCropFlip(pad={self.pad}, flip={self.flip})"


class ClassAwareAugment:
    """``x, y -> x`` on ``[0, 1]`` images: the per-class chain with strengths from ``table``.

    With ``batch`` given, the strengths are the table's version for that training batch and,
    without a ``generator``, the draws come from one seeded by (``seed``, ``stream``, ``batch``);
    ``stream`` tells apart batches of the same index made elsewhere (a rank's stream). Without
    ``batch``: the newest strengths and the given generator.
    """

    def __init__(
        self,
        table: AugmentTable,
        *,
        num_ops: int = 2,
        ops: Sequence[str] = OPS,
        seed: int = 0,
    ) -> None:
        if not isinstance(table, AugmentTable):
            raise UserError(f"table must be an AugmentTable, got {type(table).__name__}")
        self.table, self.seed = table, seed
        self.ops = check_ops(ops, num_ops)
        self.num_ops = min(num_ops, len(self.ops))

    @property
    def num_classes(self) -> int:
        return self.table.num_classes

    def strengths(self, batch: int | None) -> tuple[Tensor, Tensor]:
        return self.table.latest() if batch is None else self.table.for_batch(batch)

    def sample_params(
        self,
        y: Tensor,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        *,
        batch: int | None = None,
        magnitude: Tensor | None = None,
        probability: Tensor | None = None,
    ) -> AugmentParams:
        """One batch's chain parameters; ``magnitude`` / ``probability`` ``[C]`` override the
        table's (e.g. probability 1: the chain on every sample, as the hyper step draws it)."""
        m, p = self.strengths(batch)
        m = m if magnitude is None else torch.as_tensor(magnitude, dtype=torch.float32).cpu()
        p = p if probability is None else torch.as_tensor(probability, dtype=torch.float32).cpu()
        return augment_chain.draw_params(y, m, p, height, width, generator, self.ops, self.num_ops)

    apply = staticmethod(augment_chain.apply)
    apply_smooth = staticmethod(augment_chain.apply_smooth)

    def generator_for(self, batch: int, stream: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, "chain", stream, batch))

    def __call__(
        self,
        x: Tensor,
        y: Tensor | int,
        generator: torch.Generator | None = None,
        batch: int | None = None,
        stream: int = 0,
    ) -> Tensor:
        """Augment one image ``[C, H, W]`` (``y`` an int) or a batch ``[B, C, H, W]``; returns
        float in [0, 1] (uint8 input is divided by 255 first)."""
        single = x.ndim == 3
        if single:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise UserError(f"images must be [C, H, W] or [B, C, H, W], got {tuple(x.shape)}")
        x = x.float().div_(255) if x.dtype == torch.uint8 else x
        y = torch.as_tensor(y).reshape(-1)
        if y.numel() != x.shape[0]:
            raise UserError(f"got {y.numel()} labels for {x.shape[0]} images")
        if generator is None and batch is not None:
            generator = self.generator_for(batch, stream)
        params = self.sample_params(y, x.shape[-2], x.shape[-1], generator, batch=batch)
        x = self.apply(x, params)
        return x[0] if single else x

    def __repr__(self) -> str:
        return (
            f"ClassAwareAugment(num_classes={self.num_classes}, ops={list(self.ops)}, "
            f"num_ops={self.num_ops}, lag={self.table.lag})"
        )


@dataclass
class TrainAugment:
    """The training augmentation of a run: ``chain`` then ``base`` (the module docstring).

    ``mean`` / ``std`` (per channel) are the normalisation of the tensors it is called on, so the
    chain can work on ``[0, 1]`` pixels. Called on a normalised batch (in memory, FFCV); a
    streamed loader instead runs :attr:`chain` in its workers and :attr:`base` here.
    """

    chain: ClassAwareAugment | None
    base: RandomCropFlip | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def table(self) -> AugmentTable | None:
        return None if self.chain is None else self.chain.table

    def publish(self, batch: int) -> None:
        """The training loop finished ``batch`` (see :class:`AugmentTable`)."""
        if self.chain is not None:
            self.chain.table.publish(batch)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = x.shape[1]
        if len(self.mean) != c:
            raise UserError(f"augment normalisation has {len(self.mean)} channels, images {c}")
        shape = (1, c, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        return mean, torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)

    def chain_normalised(
        self, x: Tensor, params: AugmentParams, magnitude: Tensor | None = None
    ) -> Tensor:
        """``params``' chain on a normalised batch: un-normalise, chain, normalise. Only the
        samples the chain touches go through the round trip; ``magnitude [B]`` (a tensor that may
        require grad): :func:`~abdist.data.augment_chain.apply_smooth` at those magnitudes."""
        mean, std = self._stats(x)
        if magnitude is not None:
            return (augment_chain.apply_smooth(x * std + mean, params, magnitude) - mean) / std
        idx = params.chosen.any(1).nonzero().squeeze(1)
        if not len(idx):
            return x
        i = idx.to(x.device)
        x = x.clone()
        x[i] = (augment_chain.apply(x[i] * std + mean, params.select(idx)) - mean) / std
        return x

    def __call__(
        self,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        batch: int | None = None,
    ) -> Tensor:
        if self.chain is not None:
            g = self.chain.generator_for(batch) if batch is not None else generator
            params = self.chain.sample_params(y, x.shape[-2], x.shape[-1], g, batch=batch)
            x = self.chain_normalised(x, params)
        if self.base is not None:
            x = self.base(x, y, generator)
        return x


def build_train_augment(
    cfg, num_classes: int, normalization: tuple | None, seed: int
) -> TrainAugment | None:
    """The run's :class:`TrainAugment` from the ``data`` config section, or None (nothing on).

    ``normalization``: the data's per-channel ``(mean, std)``; the chain needs it.
    """
    base = RandomCropFlip(cfg.augment_pad, cfg.augment_flip)
    base = None if cfg.augment_pad == 0 and not cfg.augment_flip else base
    chain = None
    if cfg.augment_ops:
        if normalization is None:
            raise UserError(
                "data.augment_ops needs the data's pixel mean/std, which this data does not "
                "record; re-run abdist prepare, or drop data.augment_ops"
            )
        table = AugmentTable(
            num_classes,
            magnitude=cfg.augment_magnitude,
            probability=cfg.augment_prob,
            lag=cfg.augment_lag,
        )
        chain = ClassAwareAugment(
            table, num_ops=cfg.augment_num_ops, ops=cfg.augment_ops, seed=seed
        )
    if base is None and chain is None:
        return None
    mean, std = normalization or ((0.0,), (1.0,))
    return TrainAugment(chain, base, tuple(mean), tuple(std))


def split_augment(augment, num_classes: int, *, base_in_loader: bool = False):
    """Where each part of a training augmentation runs: ``(chain, base, hook)``.

    A ``TrainAugment``'s class-aware ``chain`` runs where the pixels are decoded (WebDataset
    workers, FFCV's loader thread). Its crop/flip ``base`` runs there too when
    ``base_in_loader`` (the WebDataset workers, each batch drawing from a generator seeded by the
    pass seed and the batch index), else it is the in-process ``hook`` (drawn from the epoch's
    generator). Any other callable is the hook and runs whole in the process."""
    if not isinstance(augment, TrainAugment):
        return None, None, augment
    chain = augment.chain
    if chain is not None and chain.num_classes != num_classes:
        raise UserError(
            f"augment is built for {chain.num_classes} classes, the data has {num_classes}"
        )
    if base_in_loader:
        return chain, augment.base, None
    return chain, None, augment.base
