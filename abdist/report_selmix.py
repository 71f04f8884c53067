"""`abdist report`'s SelMix figure: each SelMix run's validation objective over the fine-tune's
steps (one point per refresh of P) and its final pair distribution P as a heatmap (K <= 100;
rows: class i of the first sample, whose label the mixup keeps; columns: its partner j)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def plot_selmix(
    runs: Sequence[dict[str, Any]],
    labels: Sequence[str],
    colors: Sequence[str],
    out: Path,
    plt: Any,
    save: Callable[[Any, Path], None],
) -> list[Path]:
    """Write `selmix.png` if any run has a selmix.json; return the paths written."""
    series = [(run["selmix"], label, color) for run, label, color in zip(runs, labels, colors)
              if run.get("selmix")]  # fmt: skip
    if not series:
        return []
    heat = [(s, label) for s, label, _ in series if s.get("P")]
    fig, axes = plt.subplots(1, 1 + len(heat), figsize=(5 * (1 + len(heat)), 4), squeeze=False)
    try:
        ax = axes[0][0]
        for s, label, color in series:
            steps = [h["step"] for h in s.get("history", [])]
            values = [h["val_objective"] for h in s.get("history", [])]
            ax.plot(steps, values, marker="o", markersize=3, color=color, label=label)
        objectives = sorted({s.get("objective", "?") for s, _, _ in series})
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel(f"validation {', '.join(objectives)}")
        ax.set_title("SelMix objective at each refresh")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        for ax, (s, label) in zip(axes[0][1:], heat):
            image = ax.imshow(s["P"], cmap="viridis")
            ax.set_xlabel("partner class j")
            ax.set_ylabel("class i (label kept)")
            ax.set_title(f"final P: {label}")
            fig.colorbar(image, ax=ax, fraction=0.046)
        path = out / "selmix.png"
        save(fig, path)
        return [path]
    finally:
        plt.close(fig)
