"""abdist.tracking.progress: the per-epoch bar (running loss) and the line each epoch leaves."""

import re
from pathlib import Path

import pytest

from abdist.tracking import epoch_line, progress
from tests.conftest import FAST, REPO, run_cli

RECORD = {"epoch": 3, "train_loss": 0.412345, "val_balanced_error": 0.123456, "seconds": 4.216}


def _epoch(mode, n=5, record=RECORD):
    """One epoch the way the trainer drives it; returns the items seen."""
    bar = progress(range(n), total=n, desc="epoch 3/30", mode=mode)
    seen, total = [], 0.0
    for i, x in enumerate(bar):
        seen.append(x)
        total += 0.5 / (i + 1)
        bar.set_loss(total / (i + 1))
    bar.set_phase("evaluating")
    bar.close(record)
    return seen


def test_epoch_line():
    assert epoch_line("epoch 3/30", RECORD) == (
        "epoch 3/30  train loss 0.4123  val bal. err 12.35 %  4.2 s"
    )
    # Training on train+val (AutoBalance retrain): no validation figure.
    assert epoch_line("epoch 1/2", {"train_loss": 1.0, "seconds": 0.04}) == (
        "epoch 1/2  train loss 1.0000  0.0 s"
    )


@pytest.mark.parametrize("mode", ["never", "auto"])  # auto: stderr is not a terminal here
def test_disabled_prints_nothing(mode, capsys):
    assert _epoch(mode) == list(range(5))
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_always_shows_running_loss_phase_and_leaves_one_line(capsys):
    assert _epoch("always") == list(range(5))
    out, err = capsys.readouterr()
    assert out == ""  # progress goes to stderr; stdout stays for results
    assert "loss 0." in err  # the running loss next to the bar
    assert "epoch 3/30 evaluating" in err  # after the last batch, while evaluating
    # What stays on screen: the bar is erased, the epoch's line is the last one, whole.
    assert err.endswith(epoch_line("epoch 3/30", RECORD) + "\n")
    assert err.count(epoch_line("epoch 3/30", RECORD)) == 1


def test_close_without_record_prints_no_line(capsys):
    _epoch("always", record=None)
    err = capsys.readouterr().err
    assert "train loss" not in err


def test_an_unclosed_bar_is_replaced_by_the_next_epochs(capsys):
    import abdist.tracking as tracking

    first = progress(range(2), total=2, desc="epoch 1/2", mode="always")
    list(first)
    second = progress(range(2), total=2, desc="epoch 2/2", mode="always")
    assert first.bar is None or first.bar.disable  # closed: one bar on screen at a time
    assert tracking._open is second.bar
    list(second)
    second.close()
    assert tracking._open is None


def test_an_error_in_the_loader_removes_the_bar(capsys):
    import abdist.tracking as tracking

    def batches():
        yield 1
        raise KeyboardInterrupt

    bar = progress(batches(), total=3, desc="epoch 1/1", mode="always")
    with pytest.raises(KeyboardInterrupt):
        list(bar)
    assert bar.bar is None and tracking._open is None


_TRAINER = (REPO / "abdist" / "engine" / "trainer.py").read_text()


@pytest.mark.skipif(
    "bar.close(record)" not in _TRAINER, reason="the trainer does not close its bar with the record"
)
def test_train_prints_one_line_per_epoch_and_nothing_with_never(ce_config, tmp_path):
    fast = [a for a in FAST if not a.startswith("tracking.progress")]
    r = run_cli("train", ce_config, "--out", tmp_path / "a", *fast, "tracking.progress=always")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in re.split(r"[\r\n]", r.stderr) if re.match(r"epoch \d/3  train loss", ln)]
    assert [ln.split()[1] for ln in lines] == ["1/3", "2/3", "3/3"]
    assert all(re.search(r"val bal\. err \d+\.\d\d %  \d+\.\d s$", ln) for ln in lines)
    r = run_cli("train", ce_config, "--out", tmp_path / "b", *FAST)  # tracking.progress=never
    assert r.returncode == 0 and r.stderr == ""
    assert Path(tmp_path / "b" / "metrics.json").is_file()
