import json
from types import SimpleNamespace

import pytest

from abdist.config import load_config
from abdist.data.prepare import PrepareOptions, prepare
from abdist.engine.optim import lr_factor
from abdist.engine.trainer import TrainingDiverged, train
from tests.conftest import FAST, REPO, kill_at_first_checkpoint, run_cli


def _optim(**kw):
    base = dict(warmup_epochs=0.0, schedule="cosine", milestones=[], gamma=0.1)
    return SimpleNamespace(**{**base, **kw})


def test_lr_factor_warmup_cosine_and_step():
    o = _optim(warmup_epochs=1.0)
    f = [lr_factor(s, total_steps=40, steps_per_epoch=10, optim_cfg=o) for s in range(40)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warm-up
    assert f[10] == pytest.approx(1.0)  # cosine starts at the top
    assert f[25] == pytest.approx(0.5)  # half-way through the 30 post-warm-up steps
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    o = _optim(schedule="step", milestones=[2, 3], gamma=0.5)
    f = [lr_factor(s, total_steps=40, steps_per_epoch=10, optim_cfg=o) for s in (0, 19, 20, 30)]
    assert f == [1.0, 1.0, 0.5, 0.25]


def _cfg(*overrides):
    return load_config(REPO / "configs/digits_lt/ce.yaml", [*FAST, *overrides])


def test_grad_accum_halves_optimizer_steps(tmp_path):
    train(_cfg("train.batch_size=16"), tmp_path / "a")
    train(_cfg("train.batch_size=16", "train.grad_accum=2"), tmp_path / "b")
    steps = [
        [json.loads(x)["step"] for x in (tmp_path / d / "log.jsonl").read_text().splitlines()]
        for d in "ab"
    ]
    assert steps[0][-1] in (2 * steps[1][-1], 2 * steps[1][-1] - 3)  # odd batch counts round up


def test_best_val_selection_uses_the_best_validation_epoch(tmp_path):
    m = train(_cfg("train.select=best_val", "train.epochs=4"), tmp_path)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    best = min(log, key=lambda r: r["val_balanced_error"])
    assert m["selected_epoch"] == best["epoch"]


def test_bf16_autocast_trains(tmp_path):
    m = train(_cfg("train.precision=bf16"), tmp_path)
    assert 0.0 <= m["balanced_error"] <= 1.0


def test_non_finite_loss_stops_with_message_and_keeps_checkpoint(tmp_path, ce_config):
    # lr jumps to 1e30 after the first epoch: the second epoch diverges.
    over = ["optim.schedule=step", "optim.milestones=[1]", "optim.gamma=1e30",
            "optim.warmup_epochs=0"]  # fmt: skip
    r = run_cli("train", ce_config, "--out", tmp_path, *FAST, *over)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "non-finite training loss" in r.stderr and "epoch-000000.pt" in r.stderr
    assert (tmp_path / "checkpoints" / "epoch-000000.pt").is_file()
    assert not (tmp_path / "metrics.json").exists()
    with pytest.raises(TrainingDiverged):
        train(_cfg(*over), tmp_path / "again")


@pytest.mark.parametrize(
    "config, extra, n_epochs",
    [
        ("ce.yaml", ["train.epochs=12"], 12),
        # search (hyper steps from epoch 2) then retrain: the kill lands in the search phase
        (
            "autobalance.yaml",
            [
                "train.epochs=6",
                "autobalance.warmup_epochs=1",
                "autobalance.tune=[l,delta,w,aug,aug_mag]",
            ],
            6,
        ),  # fmt: skip
        # streamed: the class-aware chain runs in 2 loader workers and reads the table the hyper
        # step updates, one batch behind; the resumed run must see the same versions
        (
            "autobalance.yaml",
            [
                "train.epochs=5",
                "autobalance.warmup_epochs=1",
                "autobalance.tune=[l,aug,aug_mag]",
                "autobalance.retrain=false",
                "data.source=shards",
                "data.in_memory=false",
                "data.workers=2",
                "data.augment_lag=1",
            ],
            5,
        ),  # fmt: skip
    ],
    ids=["ce", "autobalance", "autobalance-streamed"],
)
def test_sigkill_after_first_checkpoint_then_rerun_gives_identical_metrics(
    tmp_path, config, extra, n_epochs
):
    ce_config = REPO / "configs" / "digits_lt" / config
    args = [*FAST, "train.batch_size=8", *extra]
    if "data.source=shards" in extra:
        prepare("digits", tmp_path / "shards", PrepareOptions(imbalance_ratio=10.0, shard_size=100))
        args.append(f"data.root={tmp_path / 'shards'}")
    ref = run_cli("train", ce_config, "--out", tmp_path / "ref", *args)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    two_phases = config.startswith("autobalance") and "autobalance.retrain=false" not in extra
    phase = out / "search" if two_phases else out
    kill_at_first_checkpoint("train", ce_config, "--out", out, *args,
                             checkpoints=phase / "checkpoints")  # fmt: skip
    assert not (out / "metrics.json").exists(), "killed too late: the run had already finished"

    r = run_cli("train", ce_config, "--out", out, *args)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    assert (out / "metrics.json").read_text() == (tmp_path / "ref" / "metrics.json").read_text()
    assert (out / "alpha.json").read_text() == (tmp_path / "ref" / "alpha.json").read_text()
    if "aug_mag" in " ".join(extra):  # the table moved, so the resumed workers had to follow it
        assert len(set(json.loads((out / "alpha.json").read_text())["aug_mag"])) > 1
    log = [json.loads(x)["epoch"] for x in (phase / "log.jsonl").read_text().splitlines()]
    assert log == list(range(1, n_epochs + 1))  # no duplicated or missing epochs after resuming


def test_augment_prob_zero_trains_on_clean_images_and_one_on_augmented(tmp_path):
    # The chain draws from its own per-batch generator and leaves samples it does not touch as
    # they are, so a run whose chain augments no sample is, bit for bit, the run without a chain
    # (crop/flip and batch order included); p = 1 and p = 1/2 must differ from it.
    chain = ["data.augment_ops=[translate,brightness,contrast,cutout]"]

    def final_loss(name, *over):
        train(_cfg("data.augment_pad=2", "data.augment_flip=true", *over), tmp_path / name)
        return json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[-1])[
            "train_loss"
        ]

    off = final_loss("off")
    assert final_loss("p0", *chain, "data.augment_prob=0") == off
    every = final_loss("p1", *chain, "data.augment_magnitude=0.8")
    half = final_loss("p05", *chain, "data.augment_magnitude=0.8", "data.augment_prob=0.5")
    assert abs(every - off) > 1e-3 and abs(half - off) > 1e-3 and abs(every - half) > 1e-3
