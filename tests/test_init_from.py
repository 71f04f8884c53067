"""`model.init_from`: which weights a source resolves to, and one-line errors for the rest."""

import hashlib
import json
import shutil

import pytest
import torch

from abdist.config import load_config
from abdist.engine.checkpoint import CheckpointDir
from abdist.engine.init_from import load_init_weights
from abdist.engine.recipe import run
from abdist.errors import UserError
from abdist.models import create_model
from tests.conftest import FAST, REPO

CE = REPO / "configs" / "digits_lt" / "ce.yaml"
AB = REPO / "configs" / "digits_lt" / "autobalance.yaml"


def _train(config, out, *overrides):
    run(load_config(config, [*FAST, *overrides]), out)
    return out


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory):
    """A finished 3-epoch digits CE run (select=last)."""
    return _train(CE, tmp_path_factory.mktemp("init") / "ce")


def _digits_model(name="small_cnn", num_classes=10, head="linear"):
    return create_model(name, num_classes=num_classes, in_channels=1, image_size=8, head=head)


def _same(model, weights):
    own = model.state_dict()
    assert own.keys() == weights.keys()
    for k, v in weights.items():
        assert own[k].dtype == v.dtype and torch.equal(own[k], v), k


def _user_error(model, source) -> str:
    with pytest.raises(UserError) as info:
        load_init_weights(model, source)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("model.init_from")
    return msg


def test_run_dir_loads_the_tested_last_weights(ce_run):
    path = ce_run / "checkpoints" / "epoch-000002.pt"
    model = _digits_model()
    record = load_init_weights(model, ce_run)
    _same(model, CheckpointDir(path.parent).load(path)["model"])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert record == {"init_from": str(path.resolve()), "epoch": 3, "sha256": digest}
    assert json.loads(json.dumps(record)) == record
    assert json.loads((ce_run / "metrics.json").read_text())["selected_epoch"] == 3


def test_checkpoint_file_and_checkpoints_dir(ce_run):
    older = ce_run / "checkpoints" / "epoch-000001.pt"
    model = _digits_model()
    record = load_init_weights(model, str(older))
    _same(model, CheckpointDir(older.parent).load(older)["model"])
    assert record["epoch"] == 2 and record["init_from"] == str(older.resolve())
    assert load_init_weights(_digits_model(), ce_run / "checkpoints")["epoch"] == 3


def test_best_val_run_loads_best_weights(tmp_path, ce_run):
    out = _train(CE, tmp_path / "best", "train.select=best_val")
    path = out / "checkpoints" / "epoch-000002.pt"
    state = CheckpointDir(path.parent).load(path)
    model = _digits_model()
    record = load_init_weights(model, out)
    _same(model, state["best_weights"])
    assert record["epoch"] == json.loads((out / "metrics.json").read_text())["selected_epoch"]

    # Here the best epoch is also the last; give the newest checkpoint a best epoch of its own to
    # see that best_weights, not the last model, is what a best_val run resolves to.
    best = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    state.update(best={"epoch": 0, "val_balanced_error": 0.5}, best_weights=best)
    CheckpointDir(path.parent).save(2, state)
    metrics = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_text(json.dumps({**metrics, "selected_epoch": 1}))
    model = _digits_model()
    assert load_init_weights(model, out)["epoch"] == 1
    _same(model, best)
    # a file is that epoch's weights, never best_weights
    load_init_weights(model, path)
    _same(model, state["model"])


def test_autobalance_run_dir_loads_the_retrain_weights(tmp_path):
    out = _train(AB, tmp_path / "ab", "train.epochs=2", "autobalance.warmup_epochs=1")
    model = _digits_model()
    record = load_init_weights(model, out)
    path = out / "retrain" / "checkpoints" / "epoch-000001.pt"
    assert record["init_from"] == str(path.resolve()) and record["epoch"] == 2
    _same(model, CheckpointDir(path.parent).load(path)["model"])
    # the search phase is a run of its own
    search = out / "search" / "checkpoints" / "epoch-000001.pt"
    assert load_init_weights(model, out / "search")["init_from"] == str(search.resolve())


def test_missing_path_and_not_a_run(tmp_path):
    msg = _user_error(_digits_model(), tmp_path / "nope")
    assert "does not exist" in msg and str(tmp_path / "nope") in msg
    (tmp_path / "empty").mkdir()
    assert "neither a run directory" in _user_error(_digits_model(), tmp_path / "empty")


def test_unfinished_run_is_refused_with_a_checkpoint_hint(tmp_path, ce_run):
    run_dir = shutil.copytree(ce_run, tmp_path / "unfinished")
    (run_dir / "metrics.json").unlink()
    msg = _user_error(_digits_model(), run_dir)
    assert "has not finished" in msg
    assert f"model.init_from={run_dir / 'checkpoints' / 'epoch-000002.pt'}" in msg


def test_other_classes_or_architecture_do_not_fit(ce_run):
    msg = _user_error(_digits_model(num_classes=5), ce_run)
    assert "head.weight [10, 64] vs model [5, 64]" in msg and "head.bias [10] vs model [5]" in msg
    assert str(ce_run / "checkpoints" / "epoch-000002.pt") in msg and "model.name" in msg
    msg = _user_error(_digits_model("resnet8"), ce_run)
    assert "missing " in msg and "unexpected " in msg and "more)" in msg
    assert msg.count("backbone.") <= 6  # at most 3 keys named per kind
    msg = _user_error(_digits_model(head="cosine"), ce_run)
    assert "unexpected head.bias" in msg


def test_damaged_checkpoints(tmp_path, ce_run):
    run_dir = shutil.copytree(ce_run, tmp_path / "damaged")
    newest = run_dir / "checkpoints" / "epoch-000002.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    msg = _user_error(_digits_model(), newest)
    assert f"{newest} is damaged (sha256 differs" in msg
    # the run falls back to epoch 2's checkpoint, which is not what it tested
    msg = _user_error(_digits_model(), run_dir)
    assert "tested the weights of epoch 3" in msg and "epoch-000001.pt" in msg
    msg = _user_error(_digits_model(), run_dir / "checkpoints")
    assert "newest checkpoint" in msg and "is damaged" in msg
    # without a sidecar a truncated file still fails to load, in one line
    loose = tmp_path / "loose.pt"
    loose.write_bytes(bytes(data[:100]))
    assert f"{loose} is damaged" in _user_error(_digits_model(), loose)


def test_training_starts_from_the_source_weights_and_records_them(tmp_path, ce_run):
    """optim.lr=1e-30 (0 is refused): each update is far below a float32 ulp of the weights, so
    the fine-tune's parameters after an epoch are exactly the source's (BatchNorm buffers do move
    in train mode); metrics.json and config.yaml say where they came from."""
    out = _train(
        CE, tmp_path / "ft", f"model.init_from={ce_run}", "optim.lr=1e-30", "train.epochs=1",
        "optim.warmup_epochs=0", "loss.drw_epoch=0",
    )  # fmt: skip
    source = ce_run / "checkpoints" / "epoch-000002.pt"
    src = CheckpointDir(source.parent).load(source)["model"]
    path = out / "checkpoints" / "epoch-000000.pt"
    tuned = CheckpointDir(path.parent).load(path)["model"]
    params = dict(_digits_model().named_parameters()).keys()
    assert params and all(torch.equal(tuned[k], src[k]) for k in params)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["init_from"]["init_from"] == str(source.resolve())
    assert metrics["init_from"]["epoch"] == 3
    assert f"init_from: {ce_run}" in (out / "config.yaml").read_text()
    # the optimiser and schedule start fresh: epoch 1 ends after one epoch's steps, as the
    # source's epoch 1 did (a resumed schedule would count on from the source's step 3 x that)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    first = json.loads((ce_run / "log.jsonl").read_text().splitlines()[0])
    assert [r["epoch"] for r in log] == [1] and log[0]["step"] == first["step"] > 0


def test_a_run_without_init_from_records_nothing(ce_run):
    assert "init_from" not in json.loads((ce_run / "metrics.json").read_text())


def test_cli_bad_init_from_is_one_line_and_the_corrected_command_runs(tmp_path, ce_run):
    import subprocess
    import sys

    out = tmp_path / "cli"
    base = [sys.executable, "-m", "abdist", "train", str(CE), "--out", str(out), *FAST]
    bad = subprocess.run(
        [*base, f"model.init_from={tmp_path / 'missing'}"], capture_output=True, text=True
    )
    assert bad.returncode == 2, bad.stderr
    lines = [x for x in bad.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "model.init_from" in lines[0] and "does not exist" in lines[0]
    assert "Traceback" not in bad.stderr
    good = subprocess.run([*base, f"model.init_from={ce_run}"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert json.loads((out / "metrics.json").read_text())["init_from"]["epoch"] == 3
