"""AutoBalance (Li et al., NeurIPS 2021): the loss parameters are tuned on validation data.

Lower level (every step): train θ with the parametric loss
    ℓ = w_y · CE(s·(Δ ⊙ f_θ(x) + l − m_y e_y), y),  mean = Σ w_y ℓ / Σ w_y.
Upper level (every `autobalance.hyper_interval` steps after `autobalance.warmup_epochs`): one step
of the upper optimiser on α_sub along the implicit-function-theorem hypergradient of the validation
objective (abdist.bilevel.hypergrad), where the per-class vectors are
    l = D·a_l,   Δ = 2·σ(D·a_Δ),   w = exp(D·a_w),   p_aug = σ(D·a_aug),
p_mag = σ(D·a_mag),
D = D_π the frequency dictionary (C × K), the same matrix in search and retrain.

Initialisation is the `loss` preset: ce → neutral, la → l = τ·log π, cdt → Δ = (n/n_max)^γ,
vs → both, set exactly: a_Δ = logit(Δ_preset / 2), no second sigmoid. Why Δ ∈ (0, 2) and not the
paper's (0, 1): with (0, 1) the presets' Δ = 1 is either saturated (zero gradient) or has to be
shrunk, and shrinking every Δ by ½ is training at temperature 2 — measured on digits-LT, LA at
Δ = ½ scores 40 % balanced error against 11.8 % at Δ = 1. With 2·σ, Δ = 1 sits at the sigmoid's
steepest point and every preset is represented exactly.

Augmentation (abdist/data/augment.py): a sample of class y gets the class-aware chain A_m with
probability p_y at magnitude m_y; AutoBalance writes both into the chain's per-class table after
each hyper step. The Bernoulli mask is not differentiable, but its expectation is:
E[ℓ] = p_y·ℓ(A_m(x)) + (1 − p_y)·ℓ(x) for the drawn A_m(x). The hyper step differentiates this
expected training loss (an exact, zero-variance estimator of the mask's contribution; A's own
randomness is held fixed, i.e. reparameterised), so p (`tune: aug`) is tuned by the same IFT
machinery as l, Δ, w. The magnitude (`tune: aug_mag`, the paper's personalised augmentation) is
reparameterised the same way: the chain's draws stay fixed and A_m(x) is a differentiable
function of m (augment_chain.apply_smooth: the exact photometric ops, a bilinear surrogate of the
geometric ones; flip and cutout carry no derivative), so ∂ℓ(A_m(x))/∂m is a pathwise derivative
through the network's input. The hyper step's x is the unaugmented batch (the class-independent
crop/flip is left out of it).

What the hyper step does NOT do (unlike the authors' code): it never runs in train mode (BatchNorm
statistics are read, never written: eval mode + torch.func.functional_call), validation batches use
no training augmentation, and there is no extra upper "step" on an α-independent loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from abdist.bilevel.coordinator import Coordinator
from abdist.bilevel.dictionary import (
    DELTA_MAX,
    TUNABLE,
    build_dictionary,
    class_vectors,
    fit_sub,
)
from abdist.errors import UserError
from abdist.losses import LossSpec, delta_to_logit, parametric_cross_entropy
from abdist.methods.autobalance_config import build_objective, validate
from abdist.methods.autobalance_hyper import run_hyper_step
from abdist.methods.batch_draw import draw_batches
from abdist.methods.protocol import Batch, MethodSpec, Phase, SetupContext
from abdist.methods.registry import register


class AutoBalance:
    name = "autobalance"

    def __init__(
        self, cfg, data, spec: LossSpec, augment, device, frozen: dict | None = None, comm=None
    ):
        """`frozen`: per-class vectors from a finished search (retrain phase): no hyper steps.

        `comm` (several ranks; abdist.engine.dist.Dist): `rank`, `world_size` and the coordinator's
        collectives `reduce_mean` / `broadcast`. Each rank then computes its hypergradient on its
        own slice of the validation batches, and one all-reduce + one broadcast of the K subspace
        numbers per hyper step make every rank agree, whatever the model size.
        """
        self.cfg, self.m, self.data, self.spec = cfg, cfg.autobalance, data, spec
        self.augment, self.device = augment, device  # a TrainAugment or None
        self.rank, self.world_size = (comm.rank, comm.world_size) if comm else (0, 1)
        collectives = {"reduce": comm.reduce_mean, "broadcast": comm.broadcast} if comm else {}
        self.epoch = 0
        C = data.num_classes
        self.tune = [] if frozen is not None else [t for t in TUNABLE if t in self.m.tune]
        self.chain = None if augment is None else augment.chain
        if self.chain is None and {"aug", "aug_mag"} & set(self.tune):
            raise UserError(
                "autobalance.tune has aug/aug_mag but the run has no class-aware chain; set "
                "data.augment_ops"
            )

        def vec(v):
            return None if v is None else torch.as_tensor(v, dtype=torch.float32, device=device)

        # Per (group, class) cell parameters: G groups, vectors [G, C]; row g is group g's loss.
        self.G = None
        if frozen is not None:
            cells = frozen.get("cells")
            self.G = cells["num_groups"] if cells else None
            self.fixed = {k: vec((cells or frozen).get(k)) for k in TUNABLE}
            self.D, self.coordinator = None, None
            if cells:
                self._check_frozen_cells()
        else:
            counts = data.class_counts
            if self.m.per_group:
                cells = data.cell_counts()
                if cells is None:
                    raise UserError(
                        "autobalance.per_group=true needs group ids on the training split (shards "
                        "prepared with --groups); or set autobalance.per_group=false"
                    )
                # The dictionary works on the flattened cell counts like on class counts.
                self.G, counts = len(cells), [n for row in cells for n in row]

            def tiled(v):  # a class-level preset, the same in every group's row
                return None if v is None or self.G is None else v.repeat(self.G)

            self.fixed = {"w": vec(spec.w), "l": vec(spec.l), "delta": vec(spec.delta)}
            self.fixed.update(aug=None, aug_mag=None)
            if self.G is not None:
                self.fixed = {k: tiled(v) for k, v in self.fixed.items()}
            self.D = build_dictionary(
                counts,
                self.m.dictionary,
                None if self.m.dictionary == "per_class" else (self.m.dictionary_size or C),
            ).to(device)
            ones = torch.ones(len(counts), device=device)
            init = {
                "l": self.fixed["l"] if self.fixed["l"] is not None else 0 * ones,
                "delta": delta_to_logit(
                    (self.fixed["delta"] if self.fixed["delta"] is not None else ones) / DELTA_MAX
                ),
                "w": torch.log(self.fixed["w"]) if self.fixed["w"] is not None else 0 * ones,
                "aug": delta_to_logit(torch.full_like(ones, self.m.aug_init)),
                "aug_mag": delta_to_logit(torch.full_like(ones, cfg.data.augment_magnitude)),
            }
            self.coordinator = Coordinator(
                {k: fit_sub(self.D, init[k]) for k in self.tune},
                optimizer=self.m.upper_optim,
                lr=self.m.upper_lr,
                momentum=self.m.upper_momentum,
                clip=self.m.clip,
                **collectives,
            )
        self.objective = build_objective(self.cfg, self.data)
        self.refresh()

    # --- what the training loop calls ---------------------------------------------------------

    def train_augment(self):
        """The run's augmentation; its chain's table holds the tuned per-class values."""
        return self.augment

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def needs(self) -> frozenset[str]:
        """Batch fields beyond (x, y): group ids for per-cell loss parameters."""
        return frozenset({"groups"}) if self.G is not None else frozenset()

    def _check_frozen_cells(self) -> None:
        """Cells from a search must fit this data: the same groups and classes (else indexing
        would fail deep in the training step, or on CUDA as a device-side assert)."""
        C, G = self.data.num_classes, self.data.num_groups
        shapes = {k: tuple(v.shape) for k, v in self.fixed.items() if v is not None}
        if G is None or any(shape != (self.G, C) for shape in shapes.values()):
            raise UserError(
                f"alpha.json 'cells' hold {self.G} groups x {C} classes per vector ({shapes}), but "
                f"the data has {G or 'no'} groups and {C} classes; retrain on the data searched on"
            )

    def _per_sample(self, logits: Tensor, y: Tensor, g: Tensor | None, c: dict):
        """(per-sample loss, per-sample weight or None) under the vectors `c`; with cells,
        sample i uses row g_i of each [G, C] vector (Δ and l applied to the logits here, the
        margin, scale and focal term by parametric_cross_entropy as for class vectors)."""
        kw = dict(margin=self.spec.margin, scale=self.spec.scale,
                  focal_gamma=self.spec.focal_gamma, reduction="none")  # fmt: skip
        if self.G is None:
            per = parametric_cross_entropy(logits, y, l=c["l"], delta=c["delta"], **kw)
            return per, (c["w"][y] if c["w"] is not None else None)
        if g is None:
            raise ValueError("per-group loss parameters need the batch's group ids")
        z = logits.float()
        if c["delta"] is not None:
            z = z * c["delta"][g]
        if c["l"] is not None:
            z = z + c["l"][g]
        per = parametric_cross_entropy(z, y, **kw)
        return per, (c["w"][g, y] if c["w"] is not None else None)

    def training_loss(self, model, batch: Batch) -> Tensor:
        # The weighted mean Σ w ℓ / Σ w, as parametric_cross_entropy's "mean" (the same ops).
        per, w = self._per_sample(model(batch.x).float(), batch.y, batch.groups, self.current)
        return per.mean() if w is None else (w * per).sum() / w.sum()

    def before_step(self, step: int, module, lr: float) -> None:
        pass

    def after_step(self, step: int, model) -> dict:
        if (
            self.coordinator is None
            or self.epoch < self.m.warmup_epochs
            or (step + 1) % self.m.hyper_interval != 0
        ):
            return {}
        return self.hyper_step(model, step)

    def loss_params(self) -> dict:
        """alpha.json: per-class w, l, Δ (and aug) lists; with cells the [G][C] vectors go under
        "cells" instead (a per-class plot or table has nothing to show for them)."""
        C = self.data.num_classes
        neutral = {"w": 1.0, "l": 0.0, "delta": 1.0}
        vectors = {}
        for k, v in self.current.items():
            if v is not None:
                vectors[k] = v.tolist()
            elif k in neutral:  # an untuned, preset-free vector: written out as neutral
                row = [neutral[k]] * C
                vectors[k] = row if self.G is None else [row] * self.G
        margin = self.spec.margin
        out = {"margin": margin.tolist() if margin is not None else [0.0] * C}
        if self.G is None:
            out = {**vectors, **out}
        else:
            counts = {"cell_counts": self.data.cell_counts()} if self.coordinator else {}
            out = {"cells": {"num_groups": self.G, **counts, **vectors}, **out}
        if self.coordinator is not None:
            out["tuned"] = list(self.tune)
            out["alpha_sub"] = {k: v.tolist() for k, v in self.coordinator.alpha_sub.items()}
        return out

    def artifacts(self) -> dict:
        return {"alpha.json": {"class_counts": list(self.data.class_counts), **self.loss_params()}}

    def state_dict(self) -> dict:
        return {} if self.coordinator is None else {"coordinator": self.coordinator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.coordinator is not None and state:
            self.coordinator.load_state_dict(state["coordinator"])
            self.refresh()

    # --- the hyper step -----------------------------------------------------------------------

    def refresh(self) -> None:
        if self.coordinator is None:
            self.current = self._as_cells(self.fixed)
        else:
            with torch.no_grad():
                alpha = {k: v.detach() for k, v in self.coordinator.alpha_sub.items()}
                self.current = self._as_cells(class_vectors(self.D, alpha, self.fixed))
        if self.chain is not None:  # the chain's table: the version later batches will use
            tuned = {
                "probability": self.current.get("aug"),
                "magnitude": self.current.get("aug_mag"),
            }
            self.chain.table.set(**{k: v.detach().cpu() for k, v in tuned.items() if v is not None})

    def curvature(self) -> str:
        # A full network's Hessian is indefinite away from a minimum and stops CG after a step or
        # two; Gauss-Newton is PSD when the loss is convex in the logits, which the focal term
        # breaks (config refuses an explicit gauss_newton with it). For a linear head the two are
        # the same matrix.
        if self.m.curvature != "auto":
            return self.m.curvature
        convex = self.spec.focal_gamma == 0
        return "gauss_newton" if self.m.scope == "full" and convex else "hessian"

    def _as_cells(self, vectors: dict) -> dict:
        """Flat [G·C] cell vectors as [G, C] rows (class vectors unchanged)."""
        if self.G is None:
            return dict(vectors)
        C = self.data.num_classes
        return {k: None if v is None else v.reshape(self.G, C) for k, v in vectors.items()}

    def sample_batches(self, split, step: int, shard: bool = False):
        """`hyper_batches` unaugmented batches drawn with a generator seeded by (seed, step):
        resumable.

        The draw is the same on every rank. `shard` (validation): this rank keeps its slice of
        each batch, so the ranks' slices together are the batches one process would use. Training
        batches are NOT sharded: every rank builds the same Hessian, so the mean of the ranks'
        hypergradients is exactly the hypergradient of the mean of their validation losses (a
        mean of inverses of per-rank Hessians would be a biased, noisier estimate), unless
        dist.hyper_shard=train_val trades that for 1/W of the Hessian work.
        """
        rank, world = (self.rank, self.world_size) if shard else (0, 1)
        with_groups = (self.objective.needs_groups and split is self.data.val) or (
            self.G is not None and split is self.data.train
        )
        d = draw_batches(
            split,
            batch_size=self.cfg.train.batch_size,
            k=self.m.hyper_batches,
            seed=self.cfg.train.seed,
            step=step,
            device=self.device,
            rank=rank,
            world_size=world,
            with_groups=with_groups,
        )
        return d.x, d.y, d.groups

    def expected_train_loss(self, alpha_sub, logits, logits_aug, y, g=None, prob=None) -> Tensor:
        """The training loss as a function of alpha_sub, in expectation over the augmentation mask.

        With p_y the class's augmentation probability and ℓ, ℓ_A the per-sample losses of the
        clean and augmented input: Σ_i w_i (p_i ℓ_A,i + (1 − p_i) ℓ_i) / Σ_i w_i. (The weighted
        mean's normaliser does not depend on the mask, so the expectation is exact.) `g`: the
        samples' groups, for per-cell parameters; `prob` [C]: p when it is not tuned.
        """
        c = self._as_cells(class_vectors(self.D, alpha_sub, self.fixed))
        per, w = self._per_sample(logits, y, g, c)
        if logits_aug is not None:
            pa = (c["aug"] if c.get("aug") is not None else prob)[y]
            per = pa * self._per_sample(logits_aug, y, g, c)[0] + (1 - pa) * per
        w = w if w is not None else torch.ones_like(per)
        return (w * per).sum() / w.sum()

    def hyper_step(self, model, step: int) -> dict:
        """One upper step: the IFT hypergradient on fresh train/val batches, then the
        coordinator's update (abdist/methods/autobalance_hyper.py)."""
        return run_hyper_step(self, model, step)


# --- registration -------------------------------------------------------------------------------

SEARCH = Phase("search", subdir="search")
RETRAIN = Phase("retrain", subdir="retrain", merge_val=True, inputs_from="search")


def phases(cfg) -> list[Phase]:
    """Search (tune the loss on validation), then, with autobalance.retrain, a retrain from
    scratch on train+val with the found per-class parameters frozen. Without retrain: one phase
    in the run directory itself."""
    return [SEARCH, RETRAIN] if cfg.autobalance.retrain else [Phase("search")]


def build(ctx: SetupContext) -> AutoBalance:
    frozen = ctx.inputs.get("alpha.json") if ctx.phase.inputs_from else None
    return AutoBalance(
        ctx.cfg, ctx.data, ctx.loss_spec, ctx.augment, ctx.device, frozen=frozen, comm=ctx.comm
    )


SPEC = register(MethodSpec("autobalance", build, phases, validate))
