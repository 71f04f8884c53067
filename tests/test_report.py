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
    out = root / "report-erm_seed0+ab_seed0"  # named from the runs
    assert (out / "per_class_recall.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "loss_params.png").is_file()
    # ...and says so, one line per file.
    assert f"wrote {out / 'per_class_recall.png'}" in text.splitlines()
    assert f"wrote {out / 'loss_params.png'}" in text.splitlines()
    assert json.loads((out / "report.json").read_text())["runs"] == [
        str(erm.resolve()),
        str(ab.resolve()),
    ]
    # Another set of runs gets another default directory: nothing of the first is replaced.
    before = (out / "per_class_recall.png").read_bytes()
    report([erm])
    assert (root / "report-erm_seed0" / "per_class_recall.png").is_file()
    assert (out / "per_class_recall.png").read_bytes() == before
    with pytest.raises(UserError):
        report([])


def test_report_refuses_to_overwrite_a_report_of_other_runs(two_runs, tmp_path):
    root, erm, ab = two_runs
    out = tmp_path / "rep"
    report([erm, ab], out)
    before = (out / "per_class_recall.png").read_bytes()
    with pytest.raises(UserError, match="--force") as e:
        report([erm], out)
    assert "\n" not in str(e.value) and str(out) in str(e.value)
    assert (out / "per_class_recall.png").read_bytes() == before  # untouched
    assert (out / "loss_params.png").is_file()
    report([ab, erm], out)  # the same runs (any order): refreshed, no question asked
    report([erm], out, force=True)
    assert json.loads((out / "report.json").read_text())["runs"] == [str(erm.resolve())]


def test_long_run_lists_get_a_short_stable_default_dir(tmp_path):
    from abdist.report import default_out_dir

    dirs = [tmp_path / f"a_rather_long_run_directory_name_{i}" for i in range(5)]
    out = default_out_dir(dirs)
    assert out.parent == tmp_path and len(out.name) < 80
    assert out.name.startswith("report-a_rather_long_run_directory_name_0+4-more-")
    assert default_out_dir(dirs) == out and default_out_dir(dirs[::-1]) != out


def test_runs_sharing_a_name_get_distinct_labels(tmp_path, monkeypatch):
    from abdist import report as report_mod

    metrics = {"name": "digits_lt_la", "method": "erm/la", "accuracy": 0.9,
               "per_class_recall": [0.9, 0.8], "class_counts": [100, 10]}  # fmt: skip
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    runs = [
        load_run(_write_run(tmp_path / "a", "seed0", metrics, alpha={"l": [0.0, -1.0]})),
        load_run(_write_run(tmp_path / "a", "seed1", metrics, alpha={"l": [0.0, -1.0]})),
        load_run(_write_run(tmp_path / "b", "seed1", metrics)),
        load_run(_write_run(tmp_path, "other", {**metrics, "name": "ce"})),
    ]
    labels = report_mod.run_labels(runs)
    assert len(set(labels)) == len(labels) == 4
    assert labels[0] == "digits_lt_la (seed0)"
    assert labels[1] == f"digits_lt_la ({tmp_path / 'a' / 'seed1'})"
    assert labels[2] == f"digits_lt_la ({tmp_path / 'b' / 'seed1'})"
    assert labels[3] == "ce"  # a unique name stays as it is
    same = f"digits_lt_la ({tmp_path / 'a' / 'seed0'})"
    assert report_mod.run_labels([runs[0], runs[0]]) == [f"{same} #1", f"{same} #2"]
    rows = format_table(runs).splitlines()[2:]
    assert [r.split("  ")[0].strip() for r in rows] == labels
    # The legends use the same labels.
    drawn = []
    real_draw = report_mod._draw
    monkeypatch.setattr(
        report_mod,
        "_draw",
        lambda ax, x, y, name, color: (drawn.append(name), real_draw(ax, x, y, name, color)),
    )
    report_mod.plot_runs(runs, tmp_path / "plots")
    assert drawn[:4] == labels  # per-class recall: every run
    assert set(drawn[4:]) == set(labels[:2])  # loss parameters: the runs with alpha.json


def test_report_cli_prints_where_it_wrote_and_refuses_other_runs(two_runs, tmp_path):
    from tests.conftest import run_cli

    _, erm, ab = two_runs
    out = tmp_path / "rep"
    r = run_cli("report", erm, ab, "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out / 'per_class_recall.png'}" in r.stdout.splitlines()
    assert f"wrote {out / 'loss_params.png'}" in r.stdout.splitlines()
    r = run_cli("report", ab, "--out", out)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "--force" in r.stderr
    r = run_cli("report", ab, "--out", out, "--force")
    assert r.returncode == 0, r.stderr
    assert f"wrote {out / 'per_class_recall.png'}" in r.stdout.splitlines()


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
