"""What the distributed equivalence tests record around a hyper step, and the breakages they
must catch. Used by tests/dist_helper.py (under torchrun) and by the 1-rank references in
tests/test_dist.py (in process)."""

from __future__ import annotations

from tests.patching import replace


def hyper_entry(method, model, with_params=True):
    """What a hyper step starts from (the model after the lower steps, when asked), and a hook
    that keeps the reduced hypergradient: the coordinator's input, before clipping and the step."""
    coord = method.coordinator
    seen = {}

    def recording(t):
        seen["grad"] = reduce(t)
        return seen["grad"]

    reduce = replace(coord, "reduce", recording)
    state = model.state_dict() if with_params else {}
    params = {k: v.detach().cpu().reshape(-1).tolist() for k, v in state.items()}
    return params, seen, reduce


def hyper_exit(method, entry):
    params, seen, reduce = entry
    replace(method.coordinator, "reduce", reduce)
    alpha = {k: v.detach().cpu().tolist() for k, v in method.coordinator.alpha_sub.items()}
    return {"alpha": alpha, "hypergrad": seen["grad"].tolist(), "params": params}


def break_two_rank_path(how: str) -> None:
    """Negative controls for the equivalence tests (ABDIST_TEST_BREAK): `no_reduce` drops the
    hypergradient all-reduce, `val_slice` hands rank 1 the validation rows of rank 0."""
    from abdist.bilevel.coordinator import Coordinator
    from abdist.methods.autobalance import AutoBalance

    if how == "no_reduce":

        def no_reduce(self, *args, **kwargs):
            init(self, *args, **kwargs)
            replace(self, "reduce", lambda t: t)  # each rank keeps its local hypergradient

        init = replace(Coordinator, "__init__", no_reduce)
    elif how == "val_slice":

        def same_slice(self, split, step, shard=False):
            if split is self.data.val and shard:
                rank = self.rank
                self.rank = 0
                try:
                    return sample(self, split, step, shard)
                finally:
                    self.rank = rank
            return sample(self, split, step, shard)

        sample = replace(AutoBalance, "sample_batches", same_slice)
    else:
        raise SystemExit(f"dist_helper: unknown ABDIST_TEST_BREAK={how!r}")


def register_feature_mix(bypass: bool = False) -> None:
    """A method whose loss calls `features` and `head` separately (as SelMix's feature mixup
    will), registered as method.name=feature_mix. `bypass` computes it the way a method had to
    before losses were routed through the wrapper: on the bare module, outside DDP's forward."""
    import torch.nn.functional as F

    from abdist.engine import trainer
    from abdist.methods import MethodSpec, register
    from abdist.methods.erm import ERM

    class FeatureMix(ERM):
        name = "feature_mix"

        def training_loss(self, model, batch):
            z = model.features(batch.x)
            mixed = 0.5 * (z + z.roll(1, 0))  # a partner's features, labelled as the first
            return F.cross_entropy(model.head(z), batch.y) + F.cross_entropy(
                model.head(mixed), batch.y
            )

    register(MethodSpec("feature_mix", FeatureMix.build))
    if bypass:
        replace(trainer, "loss_through", lambda wrapper, module, fn: fn(module))
