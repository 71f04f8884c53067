import json

import yaml

from tests.conftest import FAST, run_cli


def test_mistyped_override_is_one_line_exit_2(ce_config, tmp_path):
    r = run_cli("train", ce_config, "--out", tmp_path / "run", "optim.lrr=0.1")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "optim.lrr" in lines[0] and "did you mean 'optim.lr'" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written for a rejected command


def test_bad_usage_is_one_line(tmp_path):
    for args in (["train"], ["train", tmp_path / "nope.yaml"], ["frobnicate"]):
        r = run_cli(*args)
        assert r.returncode == 2, args
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_config_prints_resolved_yaml(ce_config):
    r = run_cli("config", ce_config, "loss.name=la", "loss.tau=1.5")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["loss"]["name"] == "la" and cfg["loss"]["tau"] == 1.5
    assert cfg["model"]["name"] == "small_cnn"


def test_train_writes_run_dir_and_report(ce_config, tmp_path):
    out = tmp_path / "ce"
    r = run_cli("train", ce_config, "--out", out, *FAST)
    assert r.returncode == 0, r.stderr
    for name in ("config.yaml", "log.jsonl", "metrics.json", "alpha.json", "checkpoints/latest"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    for key in ("balanced_error", "accuracy", "worst_class_recall", "per_class_recall",
                "class_counts"):  # fmt: skip
        assert key in m
    assert len(m["per_class_recall"]) == len(m["class_counts"]) == 10
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 3
    assert len((out / "log.jsonl").read_text().splitlines()) == 3

    la = tmp_path / "la"
    assert run_cli("train", ce_config, "--out", la, "loss.name=la", *FAST).returncode == 0
    r = run_cli("report", out, la, "--out", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    assert "erm/ce" in r.stdout and "erm/la" in r.stdout
    assert (tmp_path / "rep" / "per_class_recall.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "loss_params.png").stat().st_size > 1000


def test_changed_config_in_existing_run_dir_is_refused(ce_config, tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", ce_config, "--out", out, *FAST).returncode == 0
    before = (out / "metrics.json").read_text()
    r = run_cli("train", ce_config, "--out", out, *FAST, "optim.lr=0.2")
    assert r.returncode == 2 and "optim.lr: 0.05 -> 0.2" in r.stderr
    assert (out / "metrics.json").read_text() == before  # nothing lost


def test_train_without_arguments_names_only_the_required_config():
    r = run_cli("train")
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "required: config" in line
    assert "section.key=value" not in line  # overrides are optional


def test_warmup_longer_than_the_run_names_the_key_and_a_value_that_works(tmp_path):
    ab = "configs/digits_lt/autobalance.yaml"
    r = run_cli("train", ab, "train.epochs=2", "--out", tmp_path / "run")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "autobalance.warmup_epochs=1" in r.stderr and "train.epochs=6" in r.stderr
    assert not (tmp_path / "run").exists()
    # Both suggestions are accepted.
    for fix in ("autobalance.warmup_epochs=1", "train.epochs=6"):
        epochs = "train.epochs=2" if fix.startswith("method") else fix
        r = run_cli("config", ab, epochs, fix)
        assert r.returncode == 0, r.stderr
    r = run_cli("config", "configs/digits_lt/ce.yaml", "train.epochs=2", "optim.warmup_epochs=3")
    assert r.returncode == 2 and "optim.warmup_epochs=2" in r.stderr


def test_config_explain_shows_each_keys_meaning(ce_config):
    plain = run_cli("config", ce_config, "optim.lr=0.2")
    r = run_cli("config", ce_config, "optim.lr=0.2", "--explain")
    assert r.returncode == 0, r.stderr
    lr = [line for line in r.stdout.splitlines() if line.strip().startswith("lr:")]
    assert len(lr) == 1
    value, comment = lr[0].split("#", 1)
    assert value.strip() == "lr: 0.2"
    assert comment.strip() == "base learning rate (the peak after warm-up); > 0.0"
    assert any("schedule: cosine" in ln and "one of cosine, step, constant" in ln
               for ln in r.stdout.splitlines())  # fmt: skip
    # The comments are YAML comments: the same config as without --explain.
    assert yaml.safe_load(r.stdout) == yaml.safe_load(plain.stdout)
