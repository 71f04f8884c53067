"""Compare finished runs: a side-by-side text table and per-class plots.

A run directory holds `metrics.json` (written when evaluation finishes) and optionally
`alpha.json` with the per-class loss parameters:
{"class_counts": [...], "w": [...], "l": [...], "delta": [...]} (any key may be missing).

matplotlib is imported lazily inside `plot_runs` so that importing this module (e.g. by the CLI
for the table alone) never needs matplotlib or a display.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from abdist.errors import UserError
from abdist.io import atomic_write, write_json
from abdist.report_selmix import plot_selmix

__all__ = ["default_out_dir", "format_table", "load_run", "plot_runs", "report", "run_labels"]

MISSING = "—"

# (header, metrics.json key). Every column is a fraction in [0, 1] shown as a percentage,
# G-/H-mean included, so all numbers in a row read on the same scale.
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("acc %", "accuracy"),
    ("bal.err %", "balanced_error"),
    ("worst %", "worst_class_recall"),
    ("many %", "many_shot_accuracy"),
    ("medium %", "medium_shot_accuracy"),
    ("few %", "few_shot_accuracy"),
    ("G-mean %", "gmean_recall"),
    ("H-mean %", "hmean_recall"),
)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """Parse a JSON object, turning every failure into a one-line UserError naming `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
            f"the {what} may have been cut off -- re-run `abdist train` on that run"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load one finished run.

    Returns:
        {"dir": Path, "name": str, "method": str | None, "metrics": dict,
         "alpha": dict | None, "selmix": dict | None}. `name` is metrics.json's "name", else
        the directory name; `alpha` / `selmix` are the parsed alpha.json / selmix.json, or None
        when the run has none.

    Raises:
        UserError: (one line, naming the path) when the directory or metrics.json is missing,
            a JSON file is unreadable or invalid, or per-class lists disagree in length.
    """
    d = Path(run_dir)
    if not d.is_dir():
        raise UserError(f"no run directory at {d}: check the path")
    mpath = d / "metrics.json"
    if not mpath.is_file():
        raise UserError(
            f"no metrics.json in {d}: the run has not finished; run `abdist train` on it first"
        )
    metrics = _read_json(mpath, "metrics file")

    apath = d / "alpha.json"
    alpha = _read_json(apath, "loss-parameter file") if apath.is_file() else None
    spath = d / "selmix.json"
    selmix = _read_json(spath, "SelMix history file") if spath.is_file() else None

    # Catch mismatched per-class lists here, with the file named, rather than as an opaque
    # matplotlib shape error later.
    lengths = {}
    for fname, src, keys in (
        (mpath.name, metrics, ("per_class_recall", "class_counts")),
        (apath.name, alpha or {}, ("class_counts", "w", "l", "delta")),
    ):
        for key in keys:
            if isinstance(src.get(key), list):
                lengths[f"{fname}:{key}"] = len(src[key])
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise UserError(f"per-class lists in {d} have different lengths ({detail})")

    name = metrics.get("name")
    return {
        "dir": d,
        "name": str(name) if name not in (None, "") else d.name,
        "method": metrics.get("method"),
        "metrics": metrics,
        "alpha": alpha,
        "selmix": selmix,
    }


def _fmt_pct(value: Any) -> str:
    """A fraction as a percentage with two decimals; MISSING for None / non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return MISSING
    if math.isnan(value):
        return "nan"
    return f"{100.0 * value:.2f}"


def run_labels(runs: Sequence[dict[str, Any]]) -> list[str]:
    """A distinct label per run for the table and the legends.

    A run's name (`train.name`) when no other run has it; runs sharing a name get it with their
    directory name, `name (dir)`, then with the directory as given when those collide too; the
    same directory given twice is told apart by `#2`, `#3`, ...
    """

    def name_of(run: dict[str, Any]) -> str:
        m = run.get("metrics", run)
        return str(run.get("name", m.get("name", MISSING)))

    labels = [name_of(r) for r in runs]
    for refine in (
        lambda r, lab: f"{lab} ({Path(r['dir']).name})" if r.get("dir") is not None else lab,
        lambda r, lab: f"{name_of(r)} ({r['dir']})" if r.get("dir") is not None else lab,
    ):
        counts = {lab: labels.count(lab) for lab in labels}
        labels = [
            refine(r, lab) if counts[lab] > 1 else lab for r, lab in zip(runs, labels, strict=True)
        ]
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if labels.count(lab) == 1 else f"{lab} #{seen[lab]}")
    return out


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    """One aligned text row per run; missing values print as "—". No trailing newline.

    `runs` are `load_run` results; a bare metrics dict (as `train` returns) works too.

    Columns: run name (`run_labels`: made distinct when runs share a name), method, accuracy,
    balanced error, worst-class recall, many/medium/few-shot accuracy, G-mean and H-mean of
    per-class recall -- all in percent.
    """
    header = ["run", "method"] + [h for h, _ in _COLUMNS]
    rows = [header]
    for run, label in zip(runs, run_labels(runs), strict=True):
        m = run.get("metrics", run)
        method = run.get("method", m.get("method"))
        rows.append(
            [label, str(method) if method else MISSING]
            + [_fmt_pct(m.get(key)) for _, key in _COLUMNS]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Text columns left-aligned, numbers right-aligned so decimal points line up.
        parts = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows[1:]]
    return "\n".join(out)


def _xy(counts: Any, values: Any) -> tuple[list[float], list[float]] | None:
    """(training count, value) pairs usable on a log-x axis, sorted by count.

    Drops classes with a zero training count (no place on a log axis) and `None` values
    (classes absent from the evaluated set). None when nothing is left to plot.
    """
    if not isinstance(counts, list) or not isinstance(values, list):
        return None
    pairs = sorted(
        (float(n), float(v))
        for n, v in zip(counts, values, strict=True)
        if isinstance(n, (int, float)) and n > 0 and isinstance(v, (int, float))
    )
    if not pairs:
        return None
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _save_png(fig: Any, path: Path) -> None:
    """Write a figure atomically (temp file + os.replace): readers never see half a PNG."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"), "wb")


def _draw(ax: Any, x: list[float], y: list[float], name: str, color: str) -> None:
    """One run's series; markers only when classes share a count (a line would zigzag)."""
    style = "-" if len(set(x)) == len(x) else "none"
    ax.plot(x, y, marker="o", markersize=3, linewidth=1, linestyle=style, label=name, color=color)


def plot_runs(runs: Sequence[dict[str, Any]], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write comparison plots for runs loaded by `load_run`; return the paths written.

    - `per_class_recall.png`: per-class recall against training samples per class (log x),
      one series per run that has `per_class_recall` and `class_counts`.
    - `loss_params.png`: panels l, Δ (delta), w against training samples per class (log x),
      one series per run with alpha.json (class counts from alpha.json, else metrics.json).
    - `selmix.png`: SelMix runs' validation objective over the fine-tune and final P
      (abdist/report_selmix.py).

    A plot with no series to draw is not written. Classes with zero training samples or no
    recall are left out (they cannot sit on a log axis / have no value).
    """
    import matplotlib

    # Select the file-only backend before pyplot is imported, so this works on headless machines.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    recall_series = []
    # A run keeps the same colour in every plot: colour is fixed by its position in `runs`.
    colors = [f"C{i % 10}" for i in range(len(runs))]
    labels = run_labels(runs)  # legends tell apart runs that share a name
    for run, color, label in zip(runs, colors, labels, strict=True):
        m = run["metrics"]
        xy = _xy(m.get("class_counts"), m.get("per_class_recall"))
        if xy is not None:
            recall_series.append((label, color, xy))
    if recall_series:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        try:
            for name, color, (x, y) in recall_series:
                _draw(ax, x, y, name, color)
            ax.set_xscale("log")
            ax.set_xlabel("training samples per class")
            ax.set_ylabel("recall")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title("Per-class recall vs training frequency")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
            path = out / "per_class_recall.png"
            _save_png(fig, path)
            written.append(path)
        finally:
            plt.close(fig)

    panels = (("l", "l"), ("delta", "Δ"), ("w", "w"))
    if any((run.get("alpha") or {}).get("aug") for run in runs):
        # AutoBalance tuned the per-class augmentation probability: show it as a fourth panel.
        panels = (*panels, ("aug", "augmentation probability"))
    param_series = []
    for run, color, label in zip(runs, colors, labels, strict=True):
        alpha = run.get("alpha")
        if not alpha:
            continue
        counts = alpha.get("class_counts", run["metrics"].get("class_counts"))
        per_key = {key: _xy(counts, alpha.get(key)) for key, _ in panels}
        if any(v is not None for v in per_key.values()):
            param_series.append((label, color, per_key))
    if param_series:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4), sharex=True)
        try:
            for ax, (key, label) in zip(axes, panels, strict=True):
                for name, color, per_key in param_series:
                    if per_key[key] is not None:
                        _draw(ax, *per_key[key], name, color)
                ax.set_xscale("log")
                ax.set_xlabel("training samples per class")
                ax.set_title(label)
                ax.grid(True, which="both", alpha=0.3)
            # One legend is enough: every panel uses the same run colours.
            handles, labels = [], []
            for ax in axes:
                h, lab = ax.get_legend_handles_labels()
                for hh, ll in zip(h, lab, strict=True):
                    if ll not in labels:
                        handles.append(hh)
                        labels.append(ll)
            axes[-1].legend(handles, labels, fontsize="small")
            fig.suptitle("Learned loss parameters vs training frequency")
            path = out / "loss_params.png"
            _save_png(fig, path)
            written.append(path)
        finally:
            plt.close(fig)
    written += plot_selmix(runs, run_labels(runs), colors, out, plt, _save_png)
    return written


MANIFEST = "report.json"  # in a report directory: which runs it compares


def default_out_dir(run_dirs: Sequence[Path]) -> Path:
    """`<parent of the first run>/report-<run dir names joined by +>`, e.g. runs/report-ce+la.

    A long list is shortened to the first name, the count of the others and a hash of all the
    paths, so the same runs always get the same directory.
    """
    name = "+".join(d.name for d in run_dirs)
    if len(name) > 60:
        digest = hashlib.sha1("\0".join(str(d.resolve()) for d in run_dirs).encode()).hexdigest()
        name = f"{run_dirs[0].name}+{len(run_dirs) - 1}-more-{digest[:8]}"
    return run_dirs[0].parent / f"report-{name}"


def _check_target(target: Path, runs: list[str], force: bool) -> None:
    """Refuse to overwrite a report of a different set of runs (unless `force`)."""
    manifest = target / MANIFEST
    if force or not manifest.is_file():
        return
    try:
        before = json.loads(manifest.read_text(encoding="utf-8")).get("runs")
    except (OSError, ValueError, AttributeError):
        before = None
    if isinstance(before, list) and set(before) == set(runs):
        return  # the same runs again: refresh the plots
    raise UserError(
        f"{target} holds a report of other runs ({manifest.name}); pass --out DIR for this "
        "one, or --force to replace it"
    )


def report(
    run_dirs: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
) -> str:
    """Load runs, write their plots to `out_dir`; return the table, then one line per file written.

    `out_dir` defaults to `default_out_dir` (`<parent of the first run>/report-<names>`). The
    directory gets a `report.json` naming the runs; a directory whose report.json names a
    different set of runs is refused unless `force` (the same runs again just refresh it).

    Raises:
        UserError: when no run is given, a run cannot be loaded (see `load_run`), or `out_dir`
            holds a report of other runs.
    """
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise UserError("no run directories given: pass one or more runs/<name> paths")
    runs = [load_run(d) for d in dirs]
    target = Path(out_dir) if out_dir is not None else default_out_dir(dirs)
    resolved = [str(d.resolve()) for d in dirs]
    _check_target(target, resolved, force)
    written = plot_runs(runs, target)
    write_json(target / MANIFEST, {"runs": resolved, "files": [p.name for p in written]})
    lines = [format_table(runs)]
    lines += [f"wrote {p}" for p in written] or [
        f"no plots (no run has per_class_recall and class_counts); {target / MANIFEST} written"
    ]
    return "\n".join(lines)
