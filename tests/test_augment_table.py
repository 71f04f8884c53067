"""The per-class strength table: which version a batch uses, in the training process and in
running loader workers, and that this makes streamed augmentation deterministic."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from abdist.data.augment import ClassAwareAugment, TrainAugment
from abdist.data.augment_table import AugmentTable
from abdist.errors import UserError


def _prob(table: AugmentTable, batch: int) -> float:
    return float(table.for_batch(batch)[1][0])


@pytest.mark.parametrize("lag", [0, 2])
def test_batch_b_uses_the_version_labelled_up_to_b_minus_1_minus_lag(lag):
    table = AugmentTable(2, probability=0.1, lag=lag)
    table.set(probability=0.2)  # before training: replaces the constructor's values (label -1)
    table.publish(-1)  # the loop starts at batch 0
    changes = {3: 0.5, 4: 0.6, 9: 0.9}  # batch processed -> value set in its hyper step
    for b in range(12):
        if b in changes:
            table.set(probability=changes[b])
        table.publish(b)
    for b in range(13 + lag):  # batch 12 + lag is the last one batch 11's publish answers
        labelled = [k for k in changes if k <= b - 1 - lag]
        want = changes[max(labelled)] if labelled else 0.2
        assert _prob(table, b) == pytest.approx(want), b


def test_two_changes_in_one_batch_are_one_version_and_an_equal_set_is_none():
    table = AugmentTable(3, lag=0)
    table.publish(-1)
    table.set(magnitude=0.3)
    table.set(probability=0.7)  # the same batch: merged into one version
    table.publish(0)
    m, p = table.for_batch(1)
    assert torch.allclose(m, torch.full((3,), 0.3)) and torch.allclose(p, torch.full((3,), 0.7))
    before = table.state_dict()
    table.set(magnitude=0.3)  # the values in force: nothing written
    assert table.state_dict() == before and len(before["labels"]) == 2


def test_a_reader_waits_until_its_version_is_published():
    table = AugmentTable(1, probability=0.0, lag=1)
    table.publish(-1)
    got = []
    reader = threading.Thread(target=lambda: got.append(_prob(table, 5)))  # needs batch 3
    reader.start()
    for b in range(3):
        table.publish(b)
    time.sleep(0.2)
    assert reader.is_alive() and not got  # batch 3 is not finished: no guessing
    table.set(probability=1.0)  # the hyper step after batch 3
    table.publish(3)
    reader.join(timeout=10)
    assert got == [1.0]


def test_state_dict_round_trip_answers_every_batch_the_same():
    a = AugmentTable(2, lag=3)
    a.publish(-1)
    for b in range(20):
        if b % 4 == 1:
            a.set(probability=b / 40, magnitude=1 - b / 40)
        a.publish(b)
    b = AugmentTable(2, lag=3)
    b.load_state_dict(a.state_dict())
    assert b.published == 19
    for batch in range(17, 24):  # what a run resumed after batch 19 can still ask for
        assert all(torch.equal(u, v) for u, v in zip(a.for_batch(batch), b.for_batch(batch)))
    with pytest.raises(UserError, match="lag"):
        AugmentTable(2, lag=-1)


def test_in_memory_chain_leaves_untouched_samples_bit_for_bit():
    torch.manual_seed(0)
    table = AugmentTable(2, magnitude=0.6, probability=[0.0, 1.0])
    chain = ClassAwareAugment(table, ops=["brightness", "contrast", "rotate"], num_ops=2)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    aug = TrainAugment(chain, None, mean, std)
    pixels = torch.rand(64, 3, 6, 6)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = (pixels - m) / s
    y = torch.arange(64) % 2
    out = aug(x, y, None, batch=0)
    assert torch.equal(out[y == 0], x[y == 0])  # class 0: probability 0, not even rounded
    params = chain.sample_params(y, 6, 6, chain.generator_for(0), batch=0)
    ref = (chain.apply(pixels, params) - m) / s  # the chain on the [0, 1] pixels
    # measured <= 4.8e-7 (un-normalise, chain, normalise vs normalising the chained pixels)
    torch.testing.assert_close(out[y == 1], ref[y == 1], atol=1e-5, rtol=0)
    assert not torch.equal(out[y == 1], x[y == 1])
    assert torch.equal(aug(x, y, None, batch=0), out)  # the batch index fixes the draws


# --- running loader workers ---------------------------------------------------------------------


def _plain_by_id(root):
    from abdist.data.loader import ShardSplit

    plain = ShardSplit(root, "train")
    return {
        int(i): xi
        for x, _, idx in plain.batches(8, shuffle=False, with_ids=True)
        for xi, i in zip(x, idx)
    }


def _epoch(split, aug, *, change_at=None, first=0, slow=0.0):
    """One training pass, publishing each batch as the trainer does; at batch `change_at` the
    'hyper step' switches the chain on for every class. Returns the batches."""
    out = []
    batches = split.batches(
        8, shuffle=True, generator=torch.Generator().manual_seed(1), augment=aug,
        with_ids=True, first_batch=first,
    )  # fmt: skip
    for k, batch in enumerate(batches):
        out.append(batch)
        time.sleep(slow)  # a slow training step: the workers run ahead as far as they may
        if first + k == change_at:
            aug.table.set(probability=1.0, magnitude=1.0)
        aug.table.publish(first + k)
    return out


@pytest.mark.parametrize("context, workers", [("fork", 2), ("spawn", 1)])
def test_workers_see_an_update_exactly_at_the_documented_batch(tmp_path, context, workers):
    from abdist.data.loader import ShardSplit
    from tests.test_loader import write_shards

    write_shards(tmp_path, {"train": [60, 60]})
    plain = _plain_by_id(tmp_path)
    lag, change = 2, 4
    split = ShardSplit(
        tmp_path, "train", num_workers=workers, shuffle_buffer=10,
        multiprocessing_context=context, decoder="pil",  # spawn: no torchvision import (s)
    )  # fmt: skip

    def augment():
        table = AugmentTable(5, probability=0.0, lag=lag)
        table.publish(-1)
        return TrainAugment(ClassAwareAugment(table, ops=["brightness"], num_ops=1), None,
                            split.mean, split.std)  # fmt: skip

    batches = _epoch(split, augment(), change_at=change)
    assert len(batches) == 15
    for b, (x, _, idx) in enumerate(batches):
        changed = [not torch.allclose(xi, plain[int(i)], atol=1e-6) for xi, i in zip(x, idx)]
        # The hyper step after batch 4 reaches batch 4 + 1 + lag = 7 and every one after it.
        assert all(changed) if b >= change + 1 + lag else not any(changed), b
    # Timing does not matter: a slow consumer (workers far ahead, waiting) gets the same bytes.
    again = _epoch(split, augment(), change_at=change, slow=0.05)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
