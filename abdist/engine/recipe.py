"""Recipes: which training phases a config runs, each one call of the training loop.

The phases come from the method's registration (`MethodSpec.phases`, abdist/methods/protocol.py):
one phase without a subdirectory trains in the run directory itself; several each get their own
(<run>/<subdir>), later ones reading earlier ones' artifacts, and the run directory then holds the
final phase's metrics (plus the earlier phases' headline figures) and what the run found.

ERM is one phase. AutoBalance is a search (loss parameters tuned on validation data, in
<run>/search) followed, when `autobalance.retrain` is on, by a retrain from scratch on
train+val with the found per-class parameters frozen (<run>/retrain) -- the same D_pi-expanded
vectors, so search and retrain cannot disagree on the loss. The run directory's metrics.json
and alpha.json are the final phase's metrics and the searched parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from abdist import methods
from abdist.config import Config
from abdist.engine.dist import (
    init_dist,
    peer_failures_as_user_errors,
    stop_when_the_launcher_dies,
)
from abdist.engine.rundir import check_out_dir, check_resumable, lock_run_dir
from abdist.engine.trainer import train
from abdist.io import write_json, write_text
from abdist.methods import Phase


def run(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    with peer_failures_as_user_errors():  # a dead peer rank: one line, not a gloo traceback
        dist = init_dist(cfg)
        stop_when_the_launcher_dies(dist.env)  # under torchrun; a no-op otherwise
        # Compare the ranks' configs first: a rank with a different config would otherwise race
        # rank 0's config.yaml and report a misleading "different config in the run dir".
        dist.check_same_config(cfg.to_dict(), str(run_dir))
        check_out_dir(run_dir)
        with lock_run_dir(run_dir, dist):  # one `abdist train` per run directory at a time
            return _phases(cfg, run_dir, dist)


def _phases(cfg: Config, run_dir: Path, dist) -> dict[str, Any]:
    phases = methods.get(cfg.method.name).phases(cfg)
    if len(phases) == 1 and phases[0].subdir is None:
        return train(cfg, run_dir, phase=phases[0])
    check_resumable(run_dir, cfg)
    if dist.is_main:  # every rank runs the recipe; one writes the shared files
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.yaml", cfg.to_yaml())

    results = {}
    for phase in phases:
        inputs = (
            _artifacts(run_dir / _subdir(phases, phase.inputs_from)) if phase.inputs_from else {}
        )
        results[phase.name] = train(cfg, run_dir / phase.subdir, phase=phase, inputs=inputs)
    final = results[phases[-1].name]
    for phase in phases[:-1]:  # the earlier phases' headline figures, for the table and sweeps
        final[phase.name] = {k: results[phase.name][k] for k in SUMMARY}
    if dist.is_main:
        # What the run found: the artifacts the last phase was built from (AutoBalance: the
        # search's alpha.json), next to the final phase's metrics.
        found = phases[-1].inputs_from or phases[-1].name
        for name, content in _artifacts(run_dir / _subdir(phases, found)).items():
            write_json(run_dir / name, content)
        write_json(run_dir / "metrics.json", final)
    return final


SUMMARY = ("accuracy", "balanced_error", "worst_class_recall", "selected_epoch")


def _subdir(phases: list[Phase], name: str) -> str:
    return next(p.subdir for p in phases if p.name == name)


def _artifacts(phase_dir: Path) -> dict[str, Any]:
    """A finished phase's JSON artifacts (every *.json but its metrics)."""
    return {
        p.name: json.loads(p.read_text())
        for p in sorted(phase_dir.glob("*.json"))
        if p.name != "metrics.json"
    }
