"""AutoBalance's keys moved from `method.*` to `autobalance.*`; the old names still load, so every
config file and run directory written before still works (resume included)."""

import dataclasses
import json
import shutil

import pytest
import yaml

from abdist.config import ALIASES, AutoBalanceConfig, config_from_dict, load_config
from abdist.errors import UserError
from tests.conftest import REPO, run_cli

OLD = REPO / "tests" / "data" / "config_d87bb0a_autobalance.yaml"  # written by main at d87bb0a
AB = REPO / "configs" / "digits_lt" / "autobalance.yaml"
SAME = ["train.epochs=3", "train.threads=1", "tracking.progress=never",
        "autobalance.warmup_epochs=1", "train.name=old_shape"]  # fmt: skip


def test_every_autobalance_key_has_its_old_name():
    names = [f.name for f in dataclasses.fields(AutoBalanceConfig)]
    assert {f"method.{n}": f"autobalance.{n}" for n in names} == ALIASES


def old_shape(config: dict) -> dict:
    """`config` (config.yaml as a dict) in the shape main wrote before: autobalance.* in method."""
    config = dict(config)
    config["method"] = {**config["method"], **config.pop("autobalance")}
    return config


def test_an_old_config_yaml_loads_as_the_new_shape():
    old = yaml.safe_load(OLD.read_text())
    assert "tune" in old["method"] and "autobalance" not in old  # really the old shape
    # At d87bb0a `aug` tuned the per-class probability of the crop/flip; it now tunes the
    # class-aware chain's, so a file that tunes it without a chain is refused, saying what to set.
    with pytest.raises(UserError, match=r"tune has aug.*no chain is configured.*augment_ops"):
        config_from_dict(old, str(OLD))
    old["data"]["augment_ops"] = ["translate", "brightness", "contrast", "cutout"]
    old["method"]["tune"] = ["w", "l", "delta", "aug", "aug_mag"]
    cfg = config_from_dict(old, str(OLD))
    assert cfg.to_dict() == load_config(AB, SAME).to_dict()
    assert (
        cfg.autobalance.tune[:4] == ["w", "l", "delta", "aug"]
        and cfg.autobalance.warmup_epochs == 1
    )
    written = yaml.safe_load(cfg.to_yaml())  # what a run directory gets now
    assert set(written["method"]) == {"name"} and written["autobalance"]["hyper_interval"] == 5


def test_old_names_in_overrides_and_files_set_the_new_keys(tmp_path):
    cfg = load_config(AB, ["method.upper_lr=0.2", "method.tune=[l]"])
    assert cfg.autobalance.upper_lr == 0.2 and cfg.autobalance.tune == ["l"]
    old_file = tmp_path / "old.yaml"
    old_file.write_text(f"base: {AB}\nmethod:\n  hyper_interval: 7\n")
    assert load_config(old_file).autobalance.hyper_interval == 7
    # checks still name the key as the user wrote it
    with pytest.raises(UserError, match=r"'method.upper_lr' must be > 0.0"):
        load_config(AB, ["method.upper_lr=0"])
    with pytest.raises(UserError, match=r"unknown config key 'method.tunes'.*autobalance.tune"):
        load_config(AB, ["method.tunes=[l]"])


def test_autobalance_checks_run_only_for_autobalance():
    with pytest.raises(UserError, match=r"'autobalance.tune' must be a non-empty subset"):
        load_config(AB, ["autobalance.tune=[x]"])
    ce = load_config(REPO / "configs" / "digits_lt" / "ce.yaml", ["autobalance.tune=[x]"])
    assert ce.method.name == "erm"  # a section another method would read is not its concern


def test_a_run_directory_of_the_old_shape_resumes(tmp_path):
    """A finished run, its config.yaml files rewritten in the old shape and its final test passes
    undone (as if killed there): the rerun resumes and writes byte-identical metrics."""
    ref = tmp_path / "ref"
    r = run_cli("train", AB, "--out", ref, *SAME)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    for d in (run, run / "search", run / "retrain"):
        written = yaml.safe_load((d / "config.yaml").read_text())
        (d / "config.yaml").write_text(yaml.safe_dump(old_shape(written), sort_keys=False))
        assert "\nautobalance:" not in (d / "config.yaml").read_text()
    for f in (run / "metrics.json", run / "retrain" / "metrics.json", run / "alpha.json"):
        f.unlink()
    r = run_cli("train", AB, "--out", run, *SAME)
    assert r.returncode == 0, r.stderr
    assert "different config" not in r.stderr
    for name in ("metrics.json", "alpha.json", "retrain/metrics.json"):
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name
    assert "autobalance:" in (run / "config.yaml").read_text()  # rewritten in the new shape
    log = [json.loads(x) for x in (run / "retrain" / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in log] == [1, 2, 3]
