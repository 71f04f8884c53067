"""Long-tailed digits bundle and the in-memory batch interface."""

import numpy as np
import pytest
import torch

from abdist.data.augment import RandomCropFlip
from abdist.data.digits import digits_lt_indices, load_digits_lt
from abdist.data.longtail import longtail_counts
from abdist.data.memory import DataBundle, TensorSplit
from abdist.errors import UserError


@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    return load_digits_lt(profile="exp", imbalance_ratio=10.0, seed=0)


def test_bundle_metadata(bundle):
    assert bundle.num_classes == 10
    assert bundle.class_names == [str(c) for c in range(10)]
    assert (bundle.in_channels, bundle.image_size) == (1, 8)
    for split in (bundle.train, bundle.val, bundle.test):
        assert split.images.dtype == torch.float32 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (1, 8, 8)


def test_test_split_is_balanced(bundle):
    assert torch.bincount(bundle.test.labels, minlength=10).tolist() == [50] * 10


@pytest.mark.parametrize(
    "profile, ratio, mf", [("exp", 10.0, 0.5), ("step", 5.0, 0.5), ("step", 10.0, 0.3)]
)
def test_train_plus_val_follow_profile(profile, ratio, mf):
    b = load_digits_lt(profile=profile, imbalance_ratio=ratio, minority_fraction=mf, seed=1)
    total = torch.bincount(torch.cat([b.train.labels, b.val.labels]), minlength=10).tolist()
    # Smallest digits class has 174 images, minus 50 for test → n_max = 124.
    assert total == longtail_counts(124, 10, ratio, profile, mf)
    assert b.class_counts == torch.bincount(b.train.labels, minlength=10).tolist()
    assert all(c >= 1 for c in torch.bincount(b.val.labels, minlength=10).tolist())


def test_splits_are_disjoint_and_deterministic():
    a = digits_lt_indices(seed=0)
    b = digits_lt_indices(seed=0)
    c = digits_lt_indices(seed=1)
    for x, y in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert np.intersect1d(a[x], a[y]).size == 0
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["train"], c["train"])
    # The test split is drawn first, so it does not depend on the long-tail profile.
    np.testing.assert_array_equal(a["test"], digits_lt_indices(profile="step", seed=0)["test"])


@pytest.mark.numerics
def test_bundle_deterministic_and_normalised(bundle):
    again = load_digits_lt(profile="exp", imbalance_ratio=10.0, seed=0)
    assert torch.equal(bundle.train.images, again.train.images)
    assert torch.equal(bundle.val.labels, again.val.labels)
    # Standardised with train-split statistics.
    # measured: mean -9.5e-9, std exactly 1 on every `make test-portable` setting
    assert abs(bundle.train.images.mean().item()) < 1e-4
    assert abs(bundle.train.images.std().item() - 1.0) < 1e-3


def test_bad_test_per_class():
    with pytest.raises(UserError, match="test_per_class"):
        load_digits_lt(test_per_class=500)


def _toy_split(n=23) -> TensorSplit:
    images = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    return TensorSplit(images=images, labels=torch.arange(n))


def test_batches_cover_every_sample_once():
    split = _toy_split()
    g = torch.Generator().manual_seed(0)
    batches = list(split.batches(5, shuffle=True, generator=g))
    assert len(batches) == split.num_batches(5) == 5
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(23))
    assert seen.tolist() != list(range(23))  # actually shuffled
    for x, y in batches:  # images stay paired with their labels
        assert torch.equal(x[:, 0, 0, 0], y.float())


def test_batches_drop_last_and_no_shuffle():
    split = _toy_split()
    assert split.num_batches(5, drop_last=True) == 4
    ys = [y for _, y in split.batches(5, shuffle=False, drop_last=True)]
    assert len(ys) == 4 and torch.cat(ys).tolist() == list(range(20))
    with pytest.raises(UserError):
        split.num_batches(0)


def test_batches_same_generator_seed_same_order():
    split = _toy_split()

    def epoch(seed):
        g = torch.Generator().manual_seed(seed)
        aug = RandomCropFlip(1, flip=True)
        return list(split.batches(4, shuffle=True, generator=g, augment=aug))

    a, b, c = epoch(3), epoch(3), epoch(4)
    assert len(a) == len(b) == split.num_batches(4)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.cat([y for _, y in a]).tolist() != torch.cat([y for _, y in c]).tolist()


def test_random_crop_flip_shape_and_identity():
    x = torch.randn(16, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(RandomCropFlip(0, flip=False)(x, None, g), x)
    out = RandomCropFlip(2, flip=True)(x, None, g)
    assert out.shape == x.shape
    assert not torch.equal(out, x)


def test_random_crop_flip_is_a_translation():
    # A single bright pixel must move by at most pad in each direction, and stay inside.
    x = torch.zeros(64, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0
    out = RandomCropFlip(2, flip=False)(x, None, torch.Generator().manual_seed(0))
    assert torch.all(out.sum(dim=(1, 2, 3)) == 1.0)
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 9, pos % 9
    assert rows.min() >= 2 and rows.max() <= 6 and cols.min() >= 2 and cols.max() <= 6
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 5  # offsets differ per sample


def test_random_crop_flip_flip_mirrors():
    x = torch.arange(4.0).reshape(1, 1, 1, 4).repeat(32, 1, 1, 1)
    out = RandomCropFlip(0, flip=True)(x, None, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).all(dim=(1, 2, 3))
    kept = (out == x).all(dim=(1, 2, 3))
    assert torch.all(flipped | kept) and flipped.any() and kept.any()


@pytest.mark.parametrize("augment", [None, RandomCropFlip(1, flip=True)])
def test_batches_with_groups_keep_each_sample_with_its_group(augment):
    base = _toy_split()
    split = TensorSplit(base.images, base.labels, (base.labels * 7) % 3)
    for rank in (0, 1):
        g = torch.Generator().manual_seed(5)
        kw = dict(shuffle=True, generator=g, augment=augment, rank=rank, world_size=2)
        plain = list(split.batches(4, **kw))
        g.manual_seed(5)
        grouped = list(split.batches(4, **kw, with_groups=True))
        assert len(plain) == len(grouped) > 0
        for (x, y), (xg, yg, gg) in zip(plain, grouped, strict=True):
            # the same samples (and augmentation draws) as without groups, each with its own id
            assert torch.equal(x, xg) and torch.equal(y, yg)
            assert torch.equal(gg, (yg * 7) % 3)
    with pytest.raises(UserError, match="no group ids"):
        next(base.batches(4, shuffle=False, with_groups=True))
