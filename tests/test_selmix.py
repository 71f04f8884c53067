"""`method.name=selmix` end to end on digits: a fine-tune of an LA run raises min recall, writes its
objective before and after and the history of P, resumes to the same bytes after a kill, and
refuses bad input in one line. The 2-rank path is in tests/test_selmix_dist.py."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, kill_at_first_checkpoint, run_cli

LA = REPO / "configs" / "digits_lt" / "la.yaml"
SELMIX = REPO / "configs" / "digits_lt" / "selmix.yaml"
QUIET = ["tracking.progress=never", "train.threads=1"]


@pytest.fixture(scope="module")
def la_run(tmp_path_factory):
    """The demo's LA model (its config unchanged)."""
    out = tmp_path_factory.mktemp("selmix") / "la"
    r = run_cli("train", LA, "--out", out, *QUIET)
    assert r.returncode == 0, r.stderr
    return out


def _read(path):
    return json.loads(path.read_text())


def test_selmix_raises_min_recall_over_its_initial_model(la_run, tmp_path):
    out = tmp_path / "selmix"
    r = run_cli("train", SELMIX, "--out", out, f"model.init_from={la_run}", *QUIET)
    assert r.returncode == 0, r.stderr
    m, base = _read(out / "metrics.json"), _read(la_run / "metrics.json")
    sm = m["selmix"]
    assert sm["objective"] == "min_recall" and sm["refreshes"] > 1
    # "before" is the initial model itself: the LA run's own test figure.
    assert sm["before"]["test"] == pytest.approx(base["worst_class_recall"])
    assert sm["after"]["test"] == pytest.approx(m["worst_class_recall"])
    # Measured on this machine: test min recall 0.60 -> 0.78, balanced error 11.8 -> 9.4 %.
    assert m["worst_class_recall"] > base["worst_class_recall"]
    assert m["balanced_error"] < base["balanced_error"] + 0.03
    history = _read(out / "selmix.json")["history"]
    assert len(history) == sm["refreshes"] and history[0]["step"] == 0
    assert all(len(h["top_pairs"]) == 10 and h["positive_pairs"] > 0 for h in history)
    assert m["init_from"]["init_from"].startswith(str(la_run))
    # The report plots the objective over the fine-tune and the final P.
    r = run_cli("report", la_run, out, "--out", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    assert "selmix.png" in _read(tmp_path / "report" / "report.json")["files"]
    assert (tmp_path / "report" / "selmix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_killed_selmix_run_resumes_to_the_same_bytes(la_run, tmp_path):
    args = [f"model.init_from={la_run}", *QUIET, "train.epochs=4"]
    ref = run_cli("train", SELMIX, "--out", tmp_path / "ref", *args)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    kill_at_first_checkpoint("train", SELMIX, "--out", out, *args, checkpoints=out / "checkpoints")
    assert not (out / "metrics.json").exists(), "killed too late: the run had already finished"
    r = run_cli("train", SELMIX, "--out", out, *args)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
    for name in ("metrics.json", "selmix.json"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def _one_line(r, *needles):
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("abdist: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["model.init_from="], ["set model.init_from=RUN_DIR"]),
        (["model.init_from={missing}"], ["does not exist"]),
        (["selmix.coverage_alpha=1.5"], ["selmix.coverage_alpha", "<= 1"]),
        (["selmix.coverage_alpha=0"], ["selmix.coverage_alpha", "> 0"]),
        (["selmix.objective=worst"], ["selmix.objective", "min_recall"]),
        (["model.head=cosine", "model.init_from={la}"], ["linear head"]),
        (["train.merge_val=true", "model.init_from={la}"], ["unset train.merge_val"]),
    ],
)
def test_bad_input_is_one_line(la_run, tmp_path, overrides, needles):
    subst = {"missing": tmp_path / "nowhere", "la": la_run}
    args = [o.format(**subst) for o in overrides]
    r = run_cli("train", SELMIX, "--out", tmp_path / "run", *QUIET, *args)
    _one_line(r, *needles)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_run_with_another_number_of_classes_is_refused(tmp_path):
    from abdist.data.prepare import PrepareOptions, prepare
    from tests.test_ffcv import make_tree

    csv = make_tree(tmp_path / "tree")  # 4 classes
    prepare(str(tmp_path / "tree"), tmp_path / "shards", PrepareOptions(groups=str(csv), val=0.25))
    four = tmp_path / "four"
    r = run_cli("train", LA, "--out", four, *QUIET, "train.epochs=2", "data.source=shards",
                f"data.root={tmp_path / 'shards'}")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = run_cli("train", SELMIX, "--out", tmp_path / "run", *QUIET, f"model.init_from={four}")
    _one_line(r, "do not fit this model", "number of classes")


def test_streamed_shards_are_refused_in_one_line(la_run, tmp_path):
    from abdist.data.prepare import PrepareOptions, prepare

    prepare("digits", tmp_path / "shards", PrepareOptions(imbalance_ratio=10.0, seed=0))
    r = run_cli("train", SELMIX, "--out", tmp_path / "run", *QUIET, f"model.init_from={la_run}",
                "data.source=shards", f"data.root={tmp_path / 'shards'}",
                "data.in_memory=false")  # fmt: skip
    _one_line(r, "data.in_memory=true")


def test_a_model_trained_on_train_plus_val_is_refused(tmp_path):
    """Its validation split is not held out: SelMix would optimise on samples the model fit."""
    merged = tmp_path / "merged"
    r = run_cli("train", LA, "--out", merged, *QUIET, "train.epochs=2", "train.merge_val=true",
                "optim.warmup_epochs=0")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = run_cli("train", SELMIX, "--out", tmp_path / "run", *QUIET, f"model.init_from={merged}")
    _one_line(r, "was trained on train+val", "not held out")
