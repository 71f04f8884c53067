import pytest
import yaml

from abdist.config import Config, all_keys, config_from_dict, load_config, parse_override
from abdist.errors import UserError


def test_defaults_round_trip_through_yaml():
    cfg = Config()
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert set(cfg.to_dict()) == {
        "data", "model", "loss", "method", "autobalance", "selmix", "optim", "train", "dist",
        "tracking",
    }  # fmt: skip


def test_overrides_parse_types():
    cfg = load_config(None, ["optim.lr=0.3", "train.epochs=7", "optim.milestones=[3,5]",
                             "data.augment_flip=true", "optim.weight_decay=1e-4"])  # fmt: skip
    assert cfg.optim.lr == 0.3 and cfg.train.epochs == 7
    assert cfg.optim.milestones == [3, 5] and cfg.data.augment_flip is True
    assert cfg.optim.weight_decay == pytest.approx(1e-4)
    assert parse_override("train.name=abc") == ("train.name", "abc")


def test_int_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(UserError, match="'train.epochs' must be int"):
        load_config(None, ["train.epochs=2.5"])


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrr=0.1", "did you mean 'optim.lr'"),
        ("optimm.lr=0.1", "did you mean 'optim.lr'"),
        ("train.epoch=3", "did you mean 'train.epochs'"),
        ("loss.name=lla", "must be one of"),
        ("optim.lr=-1", "'optim.lr' must be > 0"),
        ("optim.momentum=2", "'optim.momentum' must be <= 1"),
        ("train.precision=fp8", "must be one of"),
        ("data.augment_flip=maybe", "must be bool"),
        ("lr", "must look like section.key=value"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, needle):
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert needle in msg
    assert "\n" not in msg


def test_yaml_file_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown config key 'optim.lrr'.*'optim.lr'"):
        load_config(bad)
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_base_chain_and_override_precedence(tmp_path):
    (tmp_path / "a.yaml").write_text("optim:\n  lr: 0.5\ntrain:\n  epochs: 4\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  epochs: 9\n")
    cfg = load_config(tmp_path / "b.yaml", ["train.epochs=11"])
    assert cfg.optim.lr == 0.5 and cfg.train.epochs == 11
    assert load_config(tmp_path / "b.yaml").train.epochs == 9
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(UserError, match="loops back"):
        load_config(tmp_path / "c.yaml")


def test_cross_field_checks():
    with pytest.raises(UserError, match="few_shot_max"):
        load_config(None, ["train.few_shot_max=500"])
    with pytest.raises(UserError, match="warmup_epochs"):
        load_config(None, ["train.epochs=2", "optim.warmup_epochs=3"])
    with pytest.raises(UserError, match="data.val"):
        load_config(None, ["data.val=2.5"])
    with pytest.raises(UserError, match="convex in the logits"):
        load_config(
            None,
            ["method.name=autobalance", "loss.name=focal", "loss.gamma=2",
             "autobalance.curvature=gauss_newton"],
        )  # fmt: skip
    with pytest.raises(UserError, match="always in memory"):
        load_config(None, ["data.in_memory=false"])
    with pytest.raises(UserError, match="autobalance.aug_init"):
        load_config(
            None,
            ["method.name=autobalance", "autobalance.tune=[l,aug]", "data.augment_prob=0.5",
             "data.augment_ops=[rotate]"],
        )  # fmt: skip
    with pytest.raises(UserError, match="data.augment_ops"):
        load_config(None, ["method.name=autobalance", "autobalance.tune=[l,aug_mag]"])
    with pytest.raises(UserError, match="no chain is configured"):
        load_config(None, ["data.augment_prob=0.5"])
    with pytest.raises(UserError, match="solarize"):
        load_config(None, ["data.augment_ops=[rotate,solarize]"])
    with pytest.raises(UserError, match="augment_num_ops"):
        load_config(None, ["data.augment_ops=[rotate]", "data.augment_num_ops=0"])


def test_every_key_is_settable_from_its_own_default():
    cfg = Config()
    d = cfg.to_dict()
    for key in all_keys():
        s, k = key.split(".")
        load_config(None, [f"{key}={yaml.safe_dump(d[s][k], default_flow_style=True).strip()}"])


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_every_key_has_a_meaning_for_config_explain():
    import dataclasses

    from abdist.config import SECTIONS, explain_yaml

    cfg = Config()
    missing = [
        f"{s}.{f.name}"
        for s in SECTIONS
        for f in dataclasses.fields(getattr(cfg, s))
        if not f.metadata.get("help")
    ]
    assert missing == []
    text = explain_yaml(cfg)
    assert config_from_dict(yaml.safe_load(text)) == cfg
    keys = [ln for ln in text.splitlines() if ln.startswith("  ")]
    assert len(keys) == len(all_keys()) and all("  # " in ln for ln in keys)
