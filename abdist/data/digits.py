"""Long-tailed sklearn digits: a tiny, download-free benchmark for tests and smoke runs."""

from __future__ import annotations

import numpy as np
import torch

from abdist.data.longtail import longtail_counts, stratified_split, subsample_per_class
from abdist.data.memory import DataBundle, TensorSplit
from abdist.errors import UserError

NUM_CLASSES = 10
IMAGE_SIZE = 8
MAX_PIXEL = 16.0  # sklearn digits pixels are integers in 0..16


def load_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with sklearn: no download

    images, labels = load_digits(return_X_y=True)
    return images, labels.astype(np.int64)


def digits_lt_indices(
    profile: str = "exp",
    imbalance_ratio: float = 10.0,
    minority_fraction: float = 0.5,
    test_per_class: int = 50,
    val: float | int = 0.2,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Sorted indices into sklearn digits for the ``"train"``, ``"val"`` and ``"test"`` splits.

    The balanced test split (``test_per_class`` per class) is drawn first, so it is the same for
    every profile and ρ at a given seed; the remainder is subsampled to
    ``longtail_counts(n_max, 10, imbalance_ratio, profile, minority_fraction)`` with ``n_max`` the
    smallest remaining class count, then split into train/val with :func:`stratified_split`.
    """
    _, labels = load_raw()
    return _split_indices(
        labels, profile, imbalance_ratio, minority_fraction, test_per_class, val, seed
    )


def _split_indices(
    labels: np.ndarray,
    profile: str,
    imbalance_ratio: float,
    minority_fraction: float,
    test_per_class: int,
    val: float | int,
    seed: int,
) -> dict[str, np.ndarray]:
    per_class = np.bincount(labels, minlength=NUM_CLASSES)
    if isinstance(test_per_class, bool) or not isinstance(test_per_class, int):
        raise UserError(f"test_per_class must be an integer, got {test_per_class!r}")
    if not 1 <= test_per_class < per_class.min():
        raise UserError(
            f"test_per_class must be in [1, {per_class.min() - 1}] for digits (smallest class has "
            f"{per_class.min()} images), got {test_per_class}"
        )
    # Independent streams per stage: changing the profile must not change the test split, and
    # seed and seed+1 must not share draws between stages.
    s_test, s_lt, s_split = (
        int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(3)
    )
    test_idx = subsample_per_class(labels, [test_per_class] * NUM_CLASSES, s_test)
    rest = np.setdiff1d(np.arange(labels.size), test_idx)
    n_max = int(np.bincount(labels[rest], minlength=NUM_CLASSES).min())
    counts = longtail_counts(n_max, NUM_CLASSES, imbalance_ratio, profile, minority_fraction)
    lt_idx = rest[subsample_per_class(labels[rest], counts, s_lt)]
    train_idx, val_idx = stratified_split(labels, lt_idx, val, s_split)
    return {"train": train_idx, "val": val_idx, "test": test_idx}


def load_digits_lt(
    profile: str = "exp",
    imbalance_ratio: float = 10.0,
    minority_fraction: float = 0.5,
    test_per_class: int = 50,
    val: float | int = 0.2,
    seed: int = 0,
) -> DataBundle:
    """Long-tailed sklearn digits (1×8×8, 10 classes) as an in-memory :class:`DataBundle`.

    Splits come from :func:`digits_lt_indices`. Pixels are scaled to [0, 1] and then standardised
    with the mean/std of the training split only (so validation and test leak nothing into
    preprocessing). Deterministic for a given seed.
    """
    raw, labels = load_raw()
    idx = _split_indices(
        labels, profile, imbalance_ratio, minority_fraction, test_per_class, val, seed
    )
    images = torch.from_numpy(raw / MAX_PIXEL).float().reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    train_pixels = images[torch.from_numpy(idx["train"])]
    mean = train_pixels.mean()
    std = train_pixels.std().clamp_min(1e-6)  # guard a degenerate (constant) training split
    images = (images - mean) / std
    labels_t = torch.from_numpy(labels)

    def split(name: str) -> TensorSplit:
        sel = torch.from_numpy(idx[name])
        return TensorSplit(images=images[sel].contiguous(), labels=labels_t[sel].contiguous())

    return DataBundle(
        train=split("train"),
        val=split("val"),
        test=split("test"),
        class_names=[str(c) for c in range(NUM_CLASSES)],
        in_channels=1,
        image_size=IMAGE_SIZE,
        normalization=((float(mean),), (float(std),)),
    )
