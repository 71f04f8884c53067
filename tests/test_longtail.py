"""Long-tail profiles, per-class subsampling and stratified splitting."""

import numpy as np
import pytest

from abdist.data.longtail import longtail_counts, stratified_split, subsample_per_class
from abdist.errors import UserError


def test_exp_profile_hand_values():
    counts = longtail_counts(100, 10, 100.0, "exp")
    assert counts[0] == 100 and counts[-1] == 1
    # floor(100 * 100^(-i/9)): i=1 → 59.94, i=4 → 12.92, i=8 → 1.67
    assert counts == [100, 59, 35, 21, 12, 7, 4, 2, 1, 1]
    assert longtail_counts(5000, 10, 10.0, "exp")[-1] == 500  # CIFAR-10-LT, ρ=10


def test_exp_profile_edge_cases():
    assert longtail_counts(7, 1, 50.0, "exp") == [7]
    assert longtail_counts(10, 4, 1.0, "exp") == [10] * 4
    # ρ far above n_max would give 0 for the tail; counts are floored at 1.
    assert min(longtail_counts(10, 5, 1e6, "exp")) == 1


def test_step_profile_hand_values():
    assert longtail_counts(100, 10, 10.0, "step") == [100] * 5 + [10] * 5
    # ceil(10 * (1 - 0.3)) = 7 majority classes.
    assert longtail_counts(100, 10, 10.0, "step", minority_fraction=0.3) == [100] * 7 + [10] * 3
    # ceil(5 * 0.5) = 3 majority classes for odd C.
    assert longtail_counts(9, 5, 4.0, "step") == [9, 9, 9, 2, 2]
    assert longtail_counts(3, 2, 100.0, "step") == [3, 1]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_max=10, num_classes=3, imbalance_ratio=0.5, profile="exp"),
        dict(n_max=10, num_classes=3, imbalance_ratio=2.0, profile="linear"),
        dict(n_max=0, num_classes=3, imbalance_ratio=2.0, profile="exp"),
        dict(n_max=10, num_classes=3, imbalance_ratio=2.0, profile="step", minority_fraction=1.5),
    ],
)
def test_longtail_counts_rejects_bad_input(kwargs):
    with pytest.raises(UserError):
        longtail_counts(**kwargs)


def _labels(per_class):
    return np.repeat(np.arange(len(per_class)), per_class)


def test_subsample_exact_counts_and_sorted():
    labels = _labels([50, 40, 30])
    counts = [20, 7, 1]
    idx = subsample_per_class(labels, counts, seed=0)
    assert np.all(np.diff(idx) > 0)  # sorted, no duplicates
    assert np.bincount(labels[idx], minlength=3).tolist() == counts


def test_subsample_deterministic_per_seed():
    labels = np.random.default_rng(1).integers(0, 4, size=400)
    a = subsample_per_class(labels, [30, 20, 10, 5], seed=3)
    b = subsample_per_class(labels, [30, 20, 10, 5], seed=3)
    c = subsample_per_class(labels, [30, 20, 10, 5], seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_subsample_too_few_names_class_and_numbers():
    labels = _labels([10, 3])
    with pytest.raises(UserError, match=r"class 1 has 3 samples but 5"):
        subsample_per_class(labels, [10, 5], seed=0)


def test_stratified_split_fraction_properties():
    labels = _labels([100, 10, 5, 2, 1])
    indices = np.arange(labels.size)
    train, val = stratified_split(labels, indices, 0.2, seed=0)
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), indices)
    n_val = np.bincount(labels[val], minlength=5).tolist()
    # round half up of n * 0.2: 20, 2, 1, 0.4 → 0 clamped to 1, single sample stays in train.
    assert n_val == [20, 2, 1, 1, 0]
    assert np.bincount(labels[train], minlength=5).min() >= 1


def test_stratified_split_rounds_half_up():
    labels = _labels([5, 15])
    _, val = stratified_split(labels, np.arange(20), 0.1, seed=0)
    # 0.5 → 1 and 1.5 → 2 (round half up, not banker's rounding).
    assert np.bincount(labels[val], minlength=2).tolist() == [1, 2]


def test_stratified_split_fixed_count_and_subset():
    labels = _labels([30, 30, 3])
    subset = np.flatnonzero(labels != 1)  # class 1 absent from the subset
    train, val = stratified_split(labels, subset, 5, seed=1)
    assert set(np.concatenate([train, val])) == set(subset)
    # 5 for class 0; class 2 has 3 samples, so it is clamped to 2 and keeps 1 in train.
    assert np.bincount(labels[val], minlength=3).tolist() == [5, 0, 2]
    assert np.bincount(labels[train], minlength=3).tolist() == [25, 0, 1]


def test_stratified_split_zero_and_determinism():
    labels = _labels([20, 20])
    train, val = stratified_split(labels, np.arange(40), 0, seed=0)
    assert val.size == 0 and train.size == 40
    a = stratified_split(labels, np.arange(40), 0.25, seed=7)
    b = stratified_split(labels, np.arange(40), 0.25, seed=7)
    c = stratified_split(labels, np.arange(40), 0.25, seed=8)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("val", [1.0, -0.1, -1, True, "0.2"])
def test_stratified_split_rejects_bad_val(val):
    with pytest.raises(UserError):
        stratified_split(_labels([5, 5]), np.arange(10), val, seed=0)
