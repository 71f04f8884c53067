"""`python -m abdist` with test instrumentation, for runs under torchrun (not a test module).

    torchrun ... tests/dist_helper.py train CONFIG --out DIR overrides...

Environment switches (all optional):
  ABDIST_TEST_RECORD=DIR   record every Python-level torch.distributed collective (op, element
                           count, bytes, whether a hyper step or SelMix refresh was running),
                           alpha_sub after every hyper step and SelMix's P after every refresh;
                           written to DIR/rank<r>.json at exit.
  ABDIST_TEST_DIE=R:S      rank R calls os._exit(17) right after optimiser step S of the first
                           phase, on the first attempt only (TORCHELASTIC_RESTART_COUNT=0), so a
                           torchrun --max-restarts=1 job recovers.
  ABDIST_TEST_RANK1_ARGS   extra arguments for rank 1 only (a rank launched with another config).
  ABDIST_TEST_STOP_AFTER=N with ABDIST_TEST_RECORD: every rank writes its record and exits 0
                           right after hyper step N (with the reduced hypergradient and the
                           model state the step started from).
  ABDIST_TEST_BREAK=HOW    break the 2-rank path on purpose (`no_reduce`, `val_slice`): the
                           equivalence tests must then fail.
  ABDIST_TEST_FEATURE_MIX  register method.name=feature_mix (a loss on features and head
                           separately); `bypass` computes it outside the DDP wrapper's forward.
  ABDIST_TEST_PARAMS=DIR   every rank writes its final model parameters to DIR/rank<r>.pt.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
from pathlib import Path

from tests.hyper_record import (
    break_two_rank_path,
    hyper_entry,
    hyper_exit,
    register_feature_mix,
)
from tests.patching import replace

rank = int(os.environ.get("RANK", "0"))
argv = sys.argv[1:]
if rank == 1 and os.environ.get("ABDIST_TEST_RANK1_ARGS"):
    argv += os.environ["ABDIST_TEST_RANK1_ARGS"].split()


if os.environ.get("ABDIST_TEST_BREAK"):
    break_two_rank_path(os.environ["ABDIST_TEST_BREAK"])
if os.environ.get("ABDIST_TEST_FEATURE_MIX"):  # routed | bypass
    register_feature_mix(bypass=os.environ["ABDIST_TEST_FEATURE_MIX"] == "bypass")

record_dir = os.environ.get("ABDIST_TEST_RECORD")
if record_dir:
    import torch.distributed as tdist
    import torch.distributed.distributed_c10d as c10d

    from abdist.methods.autobalance import AutoBalance
    from abdist.methods.selmix import SelMix

    calls, alphas, pairs, state = [], [], [], {"hyper": False, "depth": 0}

    def recorded(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if state["depth"] == 0:  # only the outermost call (all_gather_object -> all_gather)
                t = args[0] if args else None
                if isinstance(t, list):
                    t = t[0] if t and hasattr(t[0], "numel") else None
                numel = int(t.numel()) if hasattr(t, "numel") else None
                calls.append(
                    {
                        "op": name,
                        "hyper": state["hyper"],
                        "numel": numel,
                        "bytes": numel * t.element_size() if numel is not None else None,
                        "dtype": str(t.dtype) if hasattr(t, "dtype") else None,
                    }
                )
            state["depth"] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                state["depth"] -= 1

        return wrapper

    for name in (
        "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object",
        "reduce", "reduce_scatter", "reduce_scatter_tensor", "broadcast_object_list", "gather",
        "gather_object", "scatter", "all_to_all", "all_to_all_single", "barrier", "send", "recv",
        "isend", "irecv", "monitored_barrier",
    ):  # fmt: skip
        if hasattr(c10d, name):  # the list covers torch versions; not every one has each
            wrapped = recorded(name, getattr(c10d, name))
            replace(c10d, name, wrapped)
            replace(tdist, name, wrapped)

    stop_after = int(os.environ.get("ABDIST_TEST_STOP_AFTER", "0"))

    def hyper_step(self, model, step):
        entry = hyper_entry(self, model, with_params=stop_after > 0)
        state["hyper"] = True
        try:
            out = original_hyper_step(self, model, step)
        finally:
            state["hyper"] = False
        alphas.append({"step": step, **hyper_exit(self, entry)})
        if len(alphas) == stop_after:
            dump()
            os._exit(0)  # every rank stops at the same hyper step: no collective left waiting
        return out

    original_hyper_step = replace(AutoBalance, "hyper_step", hyper_step)

    def refresh(self, step, initial=False):
        state["hyper"] = True
        try:
            out = original_refresh(self, step, initial)
        finally:
            state["hyper"] = False
        pairs.append({"step": step, "P": self.P.tolist()})
        return out

    original_refresh = replace(SelMix, "refresh", refresh)

    def dump():
        Path(record_dir).mkdir(parents=True, exist_ok=True)
        path = Path(record_dir) / f"rank{rank}.json"
        path.write_text(json.dumps({"calls": calls, "alphas": alphas, "selmix": pairs}))

    atexit.register(dump)

die = os.environ.get("ABDIST_TEST_DIE")
if die and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    die_rank, die_step = map(int, die.split(":"))
    if rank == die_rank:
        from abdist.methods.autobalance import AutoBalance
        from abdist.methods.erm import ERM
        from abdist.methods.selmix import SelMix

        def dying(original):
            def after_step(self, step, model):
                if step == die_step:
                    os._exit(17)  # no cleanup, no message: as a crashed or OOM-killed process
                return original(self, step, model)

            return after_step

        for cls in (ERM, AutoBalance, SelMix):
            replace(cls, "after_step", dying(cls.after_step))

params_dir = os.environ.get("ABDIST_TEST_PARAMS")
if params_dir:
    import torch

    from abdist.engine import trainer

    def evaluate_and_keep(model, split, **kwargs):
        # The final test pass: each rank's model as it finished training.
        Path(params_dir).mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), Path(params_dir) / f"rank{rank}.pt")
        return original_evaluate(model, split, **kwargs)

    original_evaluate = replace(trainer, "evaluate", evaluate_and_keep)

from abdist.cli import main  # noqa: E402

sys.exit(main(argv))
