"""The pieces FFCVSplit hands to FFCV's Loader: a fixed traversal order and the batch operation
that turns decoded uint8 images into augmented, normalised float batches (in FFCV's loader
thread), plus the thread helpers they need.

Augmentation (the same semantics as the WebDataset loader)
    FFCV decodes (numba threads, ``num_workers`` of them) into uint8 ``[B, H, W, 3]``. A custom
    FFCV operation at the end of the image pipeline, in FFCV's loader thread, turns that into
    float ``[B, C, H, W]`` in [0, 1], looks the batch's labels up by sample id and applies the
    class-aware chain for training (:class:`~abdist.data.augment.ClassAwareAugment`, with the
    per-class strengths its table holds for the batch's index, which this operation counts from
    the pass's first batch) or ``eval_transform(x)`` for evaluation, then normalises with
    ``mean`` / ``std``. It is the very same chain code, table rule and per-batch generator as the
    WebDataset workers use. Differences: it runs in one background thread of the training
    process (not in worker processes); FFCV decodes JPEGs with libjpeg-turbo's *fast* DCT
    (hard-wired in FFCV), so JPEG pixels differ from the WebDataset loader's accurate-DCT decode
    by a few levels (mean ~1, max 4 of 255 on 32x32 quality-90 images; raw/PNG pixels are exact);
    images of another size than the output are centre-cropped (side = the shorter side) and
    resized by FFCV's OpenCV decoder, not resized with antialiased bilinear and then
    centre-cropped as the WebDataset loader does; there is no bad-sample skipping (a
    ``.beton`` is checked whole, by its sha256, with ``abdist verify``).

Threads: importing ffcv and building a Loader call ``torch.set_num_threads`` (FFCV's
``Compiler.set_num_threads``); :func:`require_ffcv` and this module restore the caller's count.
The batch operation runs torch ops on one thread in FFCV's loader thread (per-thread with torch's
OpenMP backend, as in DataLoader workers): with 2 torch threads beside FFCV's decode threads it
used ~10x the CPU on a 2-core machine (760 vs 24k images/s).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor


def make_order(initial: np.ndarray):
    """A TraversalOrder *instance* returning whatever ``.order`` holds (set before each pass).

    FFCV's Loader accepts an instance and calls it with itself (``order(loader)``).
    """
    from ffcv.traversal_order.base import TraversalOrder

    class GivenOrder(TraversalOrder):
        def __init__(self, order: np.ndarray) -> None:  # no loader yet
            self.order = order

        def __call__(self, loader) -> GivenOrder:
            self.loader = loader
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return self.order

    return GivenOrder(initial)


@functools.cache
def _batch_finish_class():
    from dataclasses import replace

    from ffcv.pipeline.operation import Operation

    class BatchFinish(Operation):
        """uint8 ``[B, H, W, 3]`` -> augmented/transformed, normalised float ``[B, C, H, W]``.

        A non-JIT FFCV operation run in FFCV's loader thread; it receives the batch's sample
        ids, so it can look the labels up for class-aware augmentation.
        """

        def __init__(self, labels, channels, mean, std, transform, train) -> None:
            super().__init__()
            self.labels, self.channels = labels, channels
            self.mean = torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1)
            self.std = torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1)
            self.transform, self.train = transform, train
            self.generator = torch.Generator()
            self.chain, self.first_batch, self.stream, self.made = None, None, 0, 0

        def start_pass(self, seed: int, chain=None, first_batch=None, stream: int = 0) -> None:
            """Before each pass: the generator's seed, and for training passes the class-aware
            chain with the run-wide index of the pass's first batch."""
            self.generator = torch.Generator().manual_seed(seed)
            self.chain, self.first_batch, self.stream, self.made = chain, first_batch, stream, 0

        def generate_code(self) -> Callable:
            per_thread = _omp_threads_are_per_thread()

            def finish(inp: Tensor, _dst, batch_indices) -> Tensor:
                # Small-tensor ops run best on one thread (as in DataLoader workers): several
                # OpenMP threads per op, beside FFCV's decode threads, cost 10x the CPU on 2
                # cores. With OpenMP the setting is per thread: the training thread keeps its own.
                if per_thread and torch.get_num_threads() != 1:
                    torch.set_num_threads(1)
                ids = torch.from_numpy(np.asarray(batch_indices, dtype=np.int64))
                x = inp.permute(0, 3, 1, 2)[:, : self.channels].contiguous()
                x = x.float().div_(255)
                if self.train and self.chain is not None:
                    batch = None if self.first_batch is None else self.first_batch + self.made
                    gen = self.generator if batch is None else None
                    x = self.chain(x, self.labels[ids], gen, batch=batch, stream=self.stream)
                elif not self.train and self.transform is not None:
                    x = self.transform(x)
                self.made += 1
                return x.sub(self.mean).div_(self.std).contiguous()

            finish.with_indices = True
            return finish

        def declare_state_and_memory(self, previous_state):
            h, w, _ = previous_state.shape
            state = replace(
                previous_state, jit_mode=False, shape=(self.channels, h, w), dtype=torch.float32
            )
            return state, None

    return BatchFinish


@functools.cache
def _omp_threads_are_per_thread() -> bool:
    """True if torch's intra-op pool is OpenMP (``set_num_threads`` then only sets the calling
    thread's count); with another backend it is process-wide and must be left alone."""
    return "OpenMP" in torch.__config__.parallel_info()


def cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def build_loader(
    path,
    *,
    labels,
    channels: int,
    size: int | None,
    mean,
    std,
    transform,
    train: bool,
    batch_size: int,
    length: int,
    num_workers: int,
    os_cache: bool,
    batches_ahead: int,
):
    """An FFCV Loader over the ``.beton`` at ``path`` and its batch operation, ``(loader, op)``:
    images decoded as stored (``size`` None) or centre-cropped to ``size``, then ``op``; the
    traversal order is set per pass (``loader.traversal_order.order``)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader
    from ffcv.transforms import ToTensor

    if size is None:
        decoder = SimpleRGBImageDecoder()
    else:
        decoder = CenterCropRGBImageDecoder((size, size), ratio=1.0)
    op = _batch_finish_class()(labels, channels, mean, std, transform, train)
    pipelines = {
        "image": [decoder, ToTensor(), op],
        "label": [IntDecoder(), ToTensor()],
        "index": [IntDecoder(), ToTensor()],
        "group": None,  # groups come from the metadata table, by sample id
    }
    threads = torch.get_num_threads()
    try:
        loader = Loader(
            str(path),
            batch_size=batch_size,
            num_workers=num_workers,
            os_cache=os_cache,
            order=make_order(np.zeros(length, dtype=np.int64)),
            distributed=False,
            seed=0,
            pipelines=pipelines,
            drop_last=True,
            batches_ahead=batches_ahead,
        )
    finally:
        torch.set_num_threads(threads)
    return loader, op
