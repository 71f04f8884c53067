"""Recipes: which training phases a config runs, each one call of the training loop.

ERM is one phase. AutoBalance is a search (loss parameters tuned on validation data, in
<run>/search) followed, when `method.retrain` is on, by a retrain from scratch on train+val with
the found per-class parameters frozen (<run>/retrain) -- the same D_pi-expanded vectors, so search
and retrain cannot disagree on the loss. The run directory's metrics.json and alpha.json are the
final phase's metrics and the searched parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from abdist.config import Config
from abdist.engine.dist import init_dist, peer_failures_as_user_errors
from abdist.engine.rundir import check_out_dir, check_resumable, lock_run_dir
from abdist.engine.trainer import train
from abdist.io import write_json, write_text


def run(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    with peer_failures_as_user_errors():  # a dead peer rank: one line, not a gloo traceback
        dist = init_dist(cfg)
        # Compare the ranks' configs first: a rank with a different config would otherwise race
        # rank 0's config.yaml and report a misleading "different config in the run dir".
        dist.check_same_config(cfg.to_dict(), str(run_dir))
        check_out_dir(run_dir)
        with lock_run_dir(run_dir, dist):  # one `abdist train` per run directory at a time
            return _phases(cfg, run_dir, dist)


def _phases(cfg: Config, run_dir: Path, dist) -> dict[str, Any]:
    if cfg.method.name != "autobalance" or not cfg.method.retrain:
        return train(cfg, run_dir)
    check_resumable(run_dir, cfg)
    if dist.is_main:  # every rank runs the recipe; one writes the shared files
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.yaml", cfg.to_yaml())

    search = train(cfg, run_dir / "search")
    alpha = json.loads((run_dir / "search" / "alpha.json").read_text())
    final = train(cfg, run_dir / "retrain", frozen_alpha=alpha, merge_val=True)
    final["search"] = {
        k: search[k] for k in ("accuracy", "balanced_error", "worst_class_recall", "selected_epoch")
    }
    if dist.is_main:
        write_json(run_dir / "alpha.json", alpha)
        write_json(run_dir / "metrics.json", final)
    return final
