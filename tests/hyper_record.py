"""What the distributed equivalence tests record around a hyper step, and the breakages they
must catch. Used by tests/dist_helper.py (under torchrun) and by the 1-rank references in
tests/test_dist.py (in process)."""

from __future__ import annotations


def hyper_entry(method, model, with_params=True):
    """What a hyper step starts from (the model after the lower steps, when asked), and a hook
    that keeps the reduced hypergradient: the coordinator's input, before clipping and the step."""
    coord = method.coordinator
    seen = {}
    reduce = coord.reduce

    def recording(t):
        seen["grad"] = reduce(t)
        return seen["grad"]

    coord.reduce = recording
    state = model.state_dict() if with_params else {}
    params = {k: v.detach().cpu().reshape(-1).tolist() for k, v in state.items()}
    return params, seen, reduce


def hyper_exit(method, entry):
    params, seen, reduce = entry
    method.coordinator.reduce = reduce
    alpha = {k: v.detach().cpu().tolist() for k, v in method.coordinator.alpha_sub.items()}
    return {"alpha": alpha, "hypergrad": seen["grad"].tolist(), "params": params}


def break_two_rank_path(how: str) -> None:
    """Negative controls for the equivalence tests (ABDIST_TEST_BREAK): `no_reduce` drops the
    hypergradient all-reduce, `val_slice` hands rank 1 the validation rows of rank 0."""
    from abdist.bilevel.coordinator import Coordinator
    from abdist.methods.autobalance import AutoBalance

    if how == "no_reduce":
        init = Coordinator.__init__

        def no_reduce(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.reduce = lambda t: t  # each rank keeps its local hypergradient

        Coordinator.__init__ = no_reduce
    elif how == "val_slice":
        sample = AutoBalance._sample_batches

        def same_slice(self, split, step, augment, shard=False):
            if split is self.data.val and shard:
                rank = self.rank
                self.rank = 0
                try:
                    return sample(self, split, step, augment, shard)
                finally:
                    self.rank = rank
            return sample(self, split, step, augment, shard)

        AutoBalance._sample_batches = same_slice
    else:
        raise SystemExit(f"dist_helper: unknown ABDIST_TEST_BREAK={how!r}")
