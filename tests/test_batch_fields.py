"""What a method can ask a batch to carry beyond (x, y): sample ids, groups, per-sample weights.

The ids are checked against each split's own numbering on every data path (in memory, streamed
with 0 and 2 workers, "train+val"); the weights against their closed form; the training loop by a
probe method that records what it was handed.
"""

from __future__ import annotations

import pytest
import torch

from abdist import methods
from abdist.config import load_config
from abdist.data import build_data
from abdist.data.memory import TensorSplit
from abdist.data.prepare import PrepareOptions, prepare
from abdist.engine.trainer import train
from abdist.errors import UserError
from abdist.losses import ParametricLoss, build_loss_spec
from abdist.methods.erm import ERM
from abdist.methods.protocol import Batch, MethodSpec
from abdist.methods.sample_weights import SampleWeights, balanced_table
from tests.conftest import FAST, REPO, run_cli

STREAM = ["data.source=shards", "data.in_memory=false", "train.batch_size=32"]


@pytest.fixture(scope="module")
def group_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fields")
    csv = tmp / "groups.csv"
    csv.write_text("".join(f"{i},{'ab'[i % 3 == 0]}\n" for i in range(1797)))  # sklearn's digits
    root = tmp / "shards"
    prepare("digits", root, PrepareOptions(imbalance_ratio=10.0, seed=0, shard_size=100,
                                           groups=str(csv)))  # fmt: skip
    return root


def _cfg(root, *extra):
    return load_config(
        REPO / "configs/digits_lt/ce.yaml", [*FAST, *STREAM, f"data.root={root}", *extra]
    )


def _id_labels(split, **kw):
    """{sample id: (label, group)} of one evaluation pass (each id must appear once)."""
    seen = {}
    for _x, y, ids, g in split.batches(64, shuffle=False, with_ids=True, with_groups=True, **kw):
        for i, label, group in zip(ids.tolist(), y.tolist(), g.tolist()):
            assert i not in seen, f"id {i} yielded twice"
            seen[i] = (label, group)
    return seen


def test_balanced_table_is_the_closed_form():
    table = balanced_table(torch.tensor([3.0, 1.0, 0.0]))
    # N = 4 samples in M = 2 non-empty cells: w = N / (M n) = [4/6, 2], the empty cell 0.
    assert torch.allclose(table, torch.tensor([4 / 6, 2.0, 0.0]))
    assert (3 * table[0] + 1 * table[1]) / 4 == pytest.approx(1.0)  # mean 1 over the samples


@pytest.mark.parametrize("workers", [0, 2])
def test_ids_are_the_same_numbering_in_memory_and_streamed(group_shards, workers):
    streamed = build_data(_cfg(group_shards, f"data.workers={workers}").data)
    memory = build_data(_cfg(group_shards, "data.in_memory=true").data)
    for name in ("train", "val", "test"):
        s, m = _id_labels(getattr(streamed, name)), _id_labels(getattr(memory, name))
        assert s == m and sorted(s) == list(range(len(getattr(memory, name))))
    # "train+val": val's samples numbered after train's, the same on both paths.
    s = _id_labels(streamed.with_val_merged().train)
    m = _id_labels(memory.with_val_merged().train)
    n_train = len(memory.train)
    assert s == m and sorted(s) == list(range(n_train + len(memory.val)))
    val = _id_labels(memory.val)
    assert all(s[n_train + i] == v for i, v in val.items())


def test_training_ids_are_disjoint_across_ranks_and_stable_across_epochs(group_shards):
    memory = build_data(_cfg(group_shards, "data.in_memory=true").data).train
    for split in (memory, build_data(_cfg(group_shards, "data.workers=2").data).train):
        epochs = []
        for epoch in range(2):
            per_rank = []
            for rank in range(2):
                gen = torch.Generator().manual_seed(epoch)
                batches = split.batches(32, shuffle=True, generator=gen, drop_last=True,
                                        rank=rank, world_size=2, with_ids=True)  # fmt: skip
                per_rank.append(torch.cat([ids for _, _, ids in batches]).tolist())
            a, b = per_rank
            assert len(a) == len(b) == len(split) // 32 * 16 and not set(a) & set(b)
            assert len(set(a + b)) == len(a + b) and set(a + b) <= set(range(len(split)))
            epochs.append(a + b)
        assert epochs[0] != epochs[1]  # a new order each epoch, drawn from the same ids


def test_memory_split_without_groups_refuses_in_one_line():
    split = TensorSplit(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(UserError, match="--groups"):
        next(split.batches(2, shuffle=False, with_groups=True))


class Probe(ERM):
    """ERM that records the batches it is handed (ids, groups, weights)."""

    seen: list[Batch] = []

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.needs = frozenset({"ids", "weights", "groups"})

    @classmethod
    def build(cls, ctx):
        probe = super().build(ctx)
        probe.data = ctx.data
        return probe

    def training_loss(self, model, batch):
        Probe.seen.append(batch)
        return super().training_loss(model, batch)


methods.register(MethodSpec("probe_fields", Probe.build))


@pytest.mark.parametrize("in_memory", [True, False])
def test_the_loop_hands_a_method_ids_groups_and_group_balanced_weights(group_shards, tmp_path,
                                                                       in_memory):  # fmt: skip
    Probe.seen = []
    cfg = _cfg(group_shards, "method.name=probe_fields", "loss.sample_weights=group_balanced",
               f"data.in_memory={str(in_memory).lower()}", "train.epochs=1",
               "optim.warmup_epochs=0")  # fmt: skip
    train(cfg, tmp_path)
    data = build_data(cfg.data)
    cells = torch.tensor(data.cell_counts(), dtype=torch.float64)
    expected = cells.sum() / ((cells > 0).sum() * cells)  # w = N / (M n(g, y))
    labels = _id_labels(data.train)
    ids = []
    for b in Probe.seen:
        assert b.ids is not None and b.groups is not None and b.weights is not None
        assert all(labels[i] == (y, g) for i, y, g in zip(b.ids.tolist(), b.y.tolist(),
                                                          b.groups.tolist()))  # fmt: skip
        assert torch.allclose(b.weights.double(), expected[b.groups, b.y], rtol=1e-6)
        ids += b.ids.tolist()
    assert len(ids) == len(set(ids)) == len(data.train) // 32 * 32


def test_weighted_loss_is_the_mean_of_weighted_sample_losses_and_splits_over_ranks():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    w = torch.rand(8) * 2
    erm = ERM(ParametricLoss(build_loss_spec("ce", [4, 2, 2])), weighted=True)
    model = torch.nn.Identity()
    full = erm.training_loss(model, Batch(logits, y, weights=w))
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(full, (w * ce).mean())
    # What DDP does with two ranks' halves (the mean of the local losses) is the full batch's loss.
    halves = [erm.training_loss(model, Batch(logits[s], y[s], weights=w[s]))
              for s in (slice(0, 4), slice(4, 8))]  # fmt: skip
    assert torch.allclose((halves[0] + halves[1]) / 2, full)
    assert erm.needs == {"weights"} and ERM(erm.loss).needs == frozenset()


def test_sample_weights_the_method_or_data_cannot_use_are_one_line_errors(group_shards, tmp_path):
    r = run_cli("train", REPO / "configs/digits_lt/autobalance.yaml", "--out", tmp_path / "ab",
                *FAST, "autobalance.warmup_epochs=1",
                "loss.sample_weights=class_balanced")  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "does not use per-sample weights" in r.stderr
    r = run_cli("train", REPO / "configs/digits_lt/ce.yaml", "--out", tmp_path / "ce", *FAST,
                "loss.sample_weights=group_balanced")  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "needs group ids" in r.stderr and "--groups" in r.stderr
    data = build_data(_cfg(group_shards).data)
    weigh = SampleWeights.build("class_balanced", data)
    counts = torch.tensor(data.class_counts, dtype=torch.float64)
    y = torch.arange(data.num_classes)
    assert torch.allclose(weigh(y).double(), counts.sum() / (len(counts) * counts), rtol=1e-6)
