"""The trainer streaming prepared shards through the per-rank loader (data.in_memory=false)."""

from __future__ import annotations

import json

import pytest

from abdist.config import load_config
from abdist.data import build_data
from abdist.data.prepare import PrepareOptions, prepare
from abdist.engine.recipe import run
from abdist.errors import UserError
from tests.conftest import FAST, REPO
from tests.test_dist import DDP, _ok, torchrun
from tests.test_loader import write_shards

STREAM = ["data.source=shards", "data.in_memory=false", "data.workers=2", "train.batch_size=32"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "digits"
    prepare("digits", out, PrepareOptions(imbalance_ratio=10.0, seed=0, shard_size=100))
    return out


def _cfg(name, shards, *extra):
    return load_config(
        REPO / f"configs/digits_lt/{name}.yaml", [*FAST, *STREAM, f"data.root={shards}", *extra]
    )


def test_streamed_data_has_the_in_memory_metadata(shards):
    streamed = build_data(_cfg("la", shards).data)
    memory = build_data(_cfg("la", shards, "data.in_memory=true").data)
    assert streamed.class_counts == memory.class_counts
    assert (streamed.num_classes, streamed.in_channels, streamed.image_size) == (10, 1, 8)
    assert [len(s) for s in (streamed.train, streamed.val, streamed.test)] == [
        len(s) for s in (memory.train, memory.val, memory.test)
    ]
    merged = streamed.with_val_merged()
    assert len(merged.val) == 0 and len(merged.train) == len(memory.train) + len(memory.val)
    assert merged.class_counts == memory.with_val_merged().class_counts


def test_group_features_on_shards_without_groups_are_one_line_errors(shards, tmp_path):
    with pytest.raises(UserError, match="without --groups"):
        next(build_data(_cfg("la", shards).data).train.batches(32, shuffle=True, with_groups=True))
    for extra in ("autobalance.per_group=true", "autobalance.objective=equal_opportunity_gap"):
        cfg = _cfg(
            "autobalance", shards, "autobalance.tune=[w,l]", "autobalance.warmup_epochs=1", extra
        )
        with pytest.raises(UserError, match="--groups"):
            run(cfg, tmp_path / extra)


@pytest.mark.numerics
def test_streamed_groups_evaluate_like_memory_and_drive_per_group_autobalance(tmp_path):
    import torch

    from abdist.engine.trainer import evaluate
    from abdist.models import create_model

    csv = tmp_path / "groups.csv"
    csv.write_text("".join(f"{i},{'ab'[i % 2]}\n" for i in range(1797)))  # sklearn's digits
    root = tmp_path / "shards"
    prepare("digits", root, PrepareOptions(imbalance_ratio=10.0, seed=0, shard_size=100,
                                           groups=str(csv)))  # fmt: skip
    streamed = build_data(_cfg("la", root).data)
    memory = build_data(_cfg("la", root, "data.in_memory=true").data)
    assert streamed.num_groups == memory.num_groups == 2
    assert streamed.cell_counts() == memory.cell_counts()
    torch.manual_seed(0)
    model = create_model("small_cnn", 10, in_channels=1, image_size=8)
    kw = dict(num_classes=10, batch_size=64, device="cpu", num_groups=2,
              autocast=torch.autocast("cpu", enabled=False))  # fmt: skip
    conf = evaluate(model, streamed.test, **kw)
    assert conf.shape == (2, 10, 10) and torch.equal(conf, evaluate(model, memory.test, **kw))

    over = ["autobalance.tune=[w,l]", "autobalance.warmup_epochs=1", "autobalance.per_group=true",
            "autobalance.objective=equal_opportunity_gap"]  # fmt: skip
    m = run(_cfg("autobalance", root, *over), tmp_path / "run")
    assert m["groups"]["group_size"] and 0 <= m["equal_opportunity_gap"] <= 1
    cells = json.loads((tmp_path / "run/alpha.json").read_text())["cells"]
    assert cells["num_groups"] == 2 and cells["cell_counts"] == streamed.cell_counts()
    assert len(cells["l"]) == 2 and cells["l"][0] != cells["l"][1]  # the rows were tuned apart


@pytest.mark.numerics
def test_streamed_autobalance_trains_deterministically_and_resumes_exactly(
    shards, tmp_path, capsys
):
    cfg = _cfg("autobalance", shards, "autobalance.warmup_epochs=1", "autobalance.hyper_interval=5")
    m = run(cfg, tmp_path / "a")
    conf = m["confusion_matrix"]
    assert sum(map(sum, conf)) == len(build_data(cfg.data).test)  # every test sample once
    assert m["balanced_error"] < 0.8 and m["bad_samples"] == 0  # chance: 0.9
    assert json.loads((tmp_path / "a/search/alpha.json").read_text())["tuned"]
    # Same command, another directory: bitwise the same run (workers, shuffle, augmentation).
    run(cfg, tmp_path / "b")
    for name in ("metrics.json", "alpha.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # Interrupted after the retrain's 2nd epoch: the same command resumes to the same bytes.
    # (What a kill between the 2nd and 3rd checkpoint leaves: `latest` names epoch 2's file.)
    ckpts = tmp_path / "b/retrain/checkpoints"
    (ckpts / "epoch-000002.pt").unlink()
    (ckpts / "latest").write_text("epoch-000001.pt\n")
    for name in ("metrics.json", "alpha.json", "retrain/metrics.json"):
        (tmp_path / "b" / name).unlink()
    capsys.readouterr()
    run(cfg, tmp_path / "b")
    assert f"resuming {tmp_path / 'b/retrain'} from epoch 2" in capsys.readouterr().out
    assert (tmp_path / "a/metrics.json").read_bytes() == (tmp_path / "b/metrics.json").read_bytes()


def test_corrupt_samples_are_skipped_and_counted_in_the_metrics(tmp_path):
    write_shards(
        tmp_path / "s",
        {"train": [60, 40], "val": [30], "test": [30]},
        corrupt={("train", 3): "image", ("test", 7): "image"},
    )
    # 1 of the 30 test samples is bad: more than the default data.max_bad_fraction=0.01.
    cfg = _cfg("ce", tmp_path / "s", "model.name=small_cnn", "data.augment_pad=0",
               "data.max_bad_fraction=0.05")  # fmt: skip
    with pytest.warns(UserWarning, match="skipped bad sample"):
        m = run(cfg, tmp_path / "run")
    # One corrupt test image, skipped in the test pass; the rest of the test split is scored.
    assert m["bad_samples"] == 1 and sum(map(sum, m["confusion_matrix"])) == 29
    log = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["bad_samples"] for r in log] == [1] * 3  # the corrupt train image, once per epoch
    strict = _cfg("ce", tmp_path / "s", "data.bad_data=error", "data.augment_pad=0")
    with pytest.raises(UserError, match="bad sample 'train-"):
        run(strict, tmp_path / "strict")


@pytest.mark.numerics
def test_two_ranks_stream_the_shards_and_evaluate_each_sample_once(shards, tmp_path):
    out = tmp_path / "ddp"
    _ok(torchrun(out, *DDP, *STREAM, f"data.root={shards}", "data.workers=1"))
    m = json.loads((out / "metrics.json").read_text())
    test = build_data(_cfg("la", shards).data).test
    assert sum(map(sum, m["confusion_matrix"])) == len(test) and m["balanced_error"] < 0.8
