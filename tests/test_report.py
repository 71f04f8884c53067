"""abdist.report on hand-written fake run directories."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from abdist.errors import UserError
from abdist.report import format_table, load_run, plot_runs, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(root, dirname, metrics, alpha=None):
    d = root / dirname
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(metrics))
    if alpha is not None:
        (d / "alpha.json").write_text(json.dumps(alpha))
    return d


@pytest.fixture
def two_runs(tmp_path):
    """An ERM baseline without alpha.json and a learned-loss run with a partial alpha.json."""
    root = tmp_path / "runs"
    root.mkdir()
    counts = [500, 120, 50, 30, 10, 2]
    erm = _write_run(
        root,
        "erm_seed0",
        {
            "name": "erm-baseline",
            "method": "erm/ce",
            "accuracy": 0.8123,
            "balanced_error": 0.25,
            "worst_class_recall": 0.1,
            "per_class_recall": [0.99, 0.95, 0.8, 0.7, 0.4, 0.1],
            "class_counts": counts,
            # no shot buckets, no G-/H-mean: the table must print "—"
        },
    )
    ab = _write_run(
        root,
        "ab_seed0",
        {
            "name": "autobalance",
            "method": "erm/la",
            "accuracy": 0.85,
            "balanced_error": 0.123456,
            "worst_class_recall": 0.5,
            "per_class_recall": [0.95, 0.9, 0.85, 0.8, 0.6, None],  # last class absent
            "class_counts": counts,
            "many_shot_accuracy": 0.925,
            "medium_shot_accuracy": 0.825,
            "few_shot_accuracy": 0.6,
            "gmean_recall": 0.8,
            "hmean_recall": 0.75,
        },
        alpha={
            "class_counts": counts,
            "l": [0.0, -0.2, -0.5, -0.7, -1.1, -1.9],
            "delta": [1.0, 0.95, 0.9, 0.85, 0.8, 0.7],
            # "w" missing on purpose
        },
    )
    return root, erm, ab


def test_load_run_fields(two_runs):
    _, erm, ab = two_runs
    r = load_run(ab)
    assert r["name"] == "autobalance"
    assert r["method"] == "erm/la"
    assert r["dir"] == ab
    assert r["metrics"]["balanced_error"] == 0.123456
    assert r["alpha"]["l"][-1] == -1.9
    assert load_run(erm)["alpha"] is None


def test_load_run_name_defaults_to_directory(tmp_path):
    d = _write_run(tmp_path, "unnamed_run", {"accuracy": 0.5})
    assert load_run(d)["name"] == "unnamed_run"


def test_load_run_missing_metrics_names_the_path(tmp_path):
    d = tmp_path / "unfinished"
    d.mkdir()
    with pytest.raises(UserError) as e:
        load_run(d)
    msg = str(e.value)
    assert str(d) in msg
    assert "metrics.json" in msg
    assert "\n" not in msg


def test_load_run_invalid_json_names_the_path(tmp_path):
    d = tmp_path / "truncated"
    d.mkdir()
    (d / "metrics.json").write_text('{"accuracy": 0.5, "balanced_')
    with pytest.raises(UserError, match="not valid JSON") as e:
        load_run(d)
    assert str(d / "metrics.json") in str(e.value)
    assert "\n" not in str(e.value)


def test_load_run_rejects_mismatched_per_class_lengths(tmp_path):
    d = _write_run(tmp_path, "bad", {"per_class_recall": [0.5, 0.5, 0.5], "class_counts": [10, 5]})
    with pytest.raises(UserError, match="different lengths"):
        load_run(d)


def test_load_run_missing_directory(tmp_path):
    with pytest.raises(UserError, match="no run directory"):
        load_run(tmp_path / "nope")


def test_format_table_numbers_and_missing(two_runs):
    _, erm, ab = two_runs
    table = format_table([load_run(erm), load_run(ab)])
    lines = table.splitlines()
    assert len(lines) == 4  # header, separator, two runs
    header, _, erm_row, ab_row = lines
    assert "acc %" in header and "H-mean %" in header
    # ERM row: 0.8123 -> 81.23, 0.25 -> 25.00, 0.1 -> 10.00, then six missing cells.
    assert erm_row.split() == [
        "erm-baseline", "erm/ce", "81.23", "25.00", "10.00", "—", "—", "—", "—", "—",
    ]  # fmt: skip
    # Learned-loss row: 0.123456 rounds to 12.35; every column present.
    assert ab_row.split() == [
        "autobalance", "erm/la", "85.00", "12.35", "50.00", "92.50", "82.50", "60.00", "80.00",
        "75.00",
    ]  # fmt: skip
    # Aligned: every line has the same width and columns line up on the right edge.
    assert len({len(line) for line in lines}) == 1


def test_plot_runs_writes_valid_pngs_atomically(two_runs, tmp_path):
    _, erm, ab = two_runs
    out = tmp_path / "plots"
    paths = plot_runs([load_run(erm), load_run(ab)], out)
    assert [p.name for p in paths] == ["per_class_recall.png", "loss_params.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 10_000  # a real rendered figure, not an empty stub
    # Nothing but the finished PNGs: temp files were renamed or cleaned up.
    assert sorted(f.name for f in out.iterdir()) == ["loss_params.png", "per_class_recall.png"]


def test_plot_runs_skips_loss_params_without_alpha(two_runs, tmp_path):
    _, erm, _ = two_runs
    paths = plot_runs([load_run(erm)], tmp_path / "plots")
    assert [p.name for p in paths] == ["per_class_recall.png"]
    assert not (tmp_path / "plots" / "loss_params.png").exists()


def test_report_returns_table_and_writes_default_dir(two_runs):
    root, erm, ab = two_runs
    text = report([erm, ab])
    assert "erm-baseline" in text and "autobalance" in text and "25.00" in text
    assert (root / "report" / "per_class_recall.png").read_bytes()[:8] == PNG_MAGIC
    assert (root / "report" / "loss_params.png").is_file()
    with pytest.raises(UserError):
        report([])


def test_import_does_not_load_matplotlib():
    # The CLI imports abdist.report for the table; that must not need matplotlib or a display.
    code = "import sys, abdist.report; sys.exit(2 if 'matplotlib' in sys.modules else 0)"
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_format_table_accepts_bare_metrics_from_class_metrics(tmp_path):
    # `abdist train` prints format_table([metrics]) with the dict class_metrics produced.
    from abdist.metrics import class_metrics

    # recalls 3/4, 1/2, 1 -> balanced error 1 - 2.25/3 = 0.25; accuracy 8/10 = 0.8
    cm = [[3, 1, 0], [1, 1, 0], [0, 0, 4]]
    m = class_metrics(cm, class_counts=[200, 50, 5])
    m.update(name="digits-ce", method="erm/ce", class_counts=[200, 50, 5])
    row = format_table([m]).splitlines()[2].split()
    # many = 0.75 (count 200), medium = 0.5 (count 50), few = 1.0 (count 5)
    # G-mean = 0.375 ** (1/3) = 0.7211 -> 72.11; H-mean = 9/13 = 0.6923 -> 69.23
    assert row == [
        "digits-ce", "erm/ce", "80.00", "25.00", "50.00", "75.00", "50.00", "100.00", "72.11",
        "69.23",
    ]  # fmt: skip
    # The same dict round-trips through metrics.json and the loader.
    d = tmp_path / "r"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps(m))
    assert format_table([load_run(d)]) == format_table([m])
