"""AutoBalance's upper step (abdist/methods/autobalance.py holds the method and its maths).

One hyper step: `hyper_batches` fresh training and validation batches (seeded by the step, so a
resumed run draws the same), the IFT hypergradient of the validation objective through the
expected training loss (abdist.bilevel.hypergrad), then the coordinator's update of α_sub. With
augmentation tuned, the training batch is also run through the class-aware chain on every sample
(the Bernoulli mask is taken in expectation), and with `aug_mag` the chain's output is a
differentiable function of α (augment_chain.apply_smooth) so the hypergradient has the mixed term
∂²ℓ/∂θ∂α through the input.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call

from abdist.bilevel.dictionary import class_vectors
from abdist.bilevel.hypergrad import OutputLoss, hypergradient
from abdist.data.planning import derive_seed


def chain_inputs(ab, x: Tensor, y: Tensor, step: int):
    """The hyper step's augmented batch: the chain on EVERY sample (probability 1; the mask
    is taken in expectation), its draws seeded by (seed, step). Returns (x_aug or, when the
    magnitude is tuned, a function alpha_sub -> x_aug differentiable in it; the current
    per-class probability [C])."""
    magnitude, probability = ab.chain.table.latest()
    gen = torch.Generator().manual_seed(derive_seed(ab.cfg.train.seed, "hyper-chain", step))
    ones = torch.ones_like(probability)
    params = ab.chain.sample_params(
        y.cpu(), x.shape[-2], x.shape[-1], gen, magnitude=magnitude, probability=ones
    )
    prob = probability.to(x.device)
    if "aug_mag" not in ab.tune:
        return ab.augment.chain_normalised(x, params), prob

    def x_aug(alpha_sub):
        m = class_vectors(ab.D, alpha_sub, ab.fixed)["aug_mag"][y]
        return ab.augment.chain_normalised(x, params, magnitude=m)

    return x_aug, prob


def run_hyper_step(ab, model, step: int) -> dict:
    with_aug = bool({"aug", "aug_mag"} & set(ab.tune))
    shard = ab.cfg.dist.hyper_shard  # none: every rank the whole batches (exact, W× work)
    x_tr, y_tr, g_tr = ab.sample_batches(ab.data.train, step, shard == "train_val")
    x_val, y_val, g_val = ab.sample_batches(ab.data.val, step + 1, shard != "none")
    x_aug, prob = chain_inputs(ab, x_tr, y_tr, step) if with_aug else (None, None)
    smooth = callable(x_aug)  # the magnitude is tuned: the augmented input depends on alpha
    was_training = model.training
    model.eval()  # BatchNorm reads running statistics and writes nothing
    try:
        if ab.m.scope == "head":
            embed = model.features
            with torch.no_grad():
                x_tr, x_val = embed(x_tr), embed(x_val)
                if with_aug and not smooth:
                    x_aug = embed(x_aug)
            net = model.head
            params = {k: v.detach() for k, v in net.named_parameters()}
            frozen = {}
        else:
            embed = None
            net = model
            params = {k: v.detach() for k, v in net.named_parameters()}
            frozen = {k: v.detach() for k, v in net.named_buffers()}

        def forward(p, x):
            return functional_call(net, {**p, **frozen}, (x,)).float()

        def augmented(a):  # the augmented batch's network input
            x = x_aug(a)
            return embed(x) if embed is not None else x

        def outputs(p, a=None):
            if not with_aug:
                return (forward(p, x_tr),)
            return forward(p, x_tr), forward(p, augmented(a) if smooth else x_aug)

        alpha = {k: v.detach() for k, v in ab.coordinator.alpha_sub.items()}
        outputs_fixed = None
        if smooth:
            # The augmented batch's network input at the current α, once: the solve's curvature
            # products use it, and only the mixed term runs the chain and backbone back to α.
            with torch.no_grad():
                fixed_in = augmented(alpha)

            def outputs_fixed(p):
                return forward(p, x_tr), forward(p, fixed_in)

        # Written as loss(logits(θ), α) so that a Gauss-Newton solve can split the two.
        train_loss = OutputLoss(
            outputs,
            lambda z, a: ab.expected_train_loss(
                a, z[0], z[1] if with_aug else None, y_tr, g_tr, prob
            ),
            takes_alpha=smooth,
            outputs_fixed=outputs_fixed,
        )

        def val_loss(p, a):
            return ab.objective(forward(p, x_val), y_val, g_val)

        grads, info = hypergradient(
            train_loss,
            val_loss,
            params,
            alpha,
            method=ab.m.hypergrad,
            weight_decay=ab.cfg.optim.weight_decay,
            damping=ab.m.damping,
            iterations=ab.m.solver_iterations,
            curvature=ab.curvature(),
        )
    finally:
        model.train(was_training)
    stats = ab.coordinator.step(grads)
    ab.refresh()
    # Logged as last_*: a solve that stops early or meets negative curvature (full scope)
    # gives a poor hypergradient, and the user should see it.
    return {
        **stats,
        "solver_residual": info.get("residual"),
        "solver_iterations": info.get("iterations"),
        "negative_curvature": int(bool(info.get("negative_curvature"))),  # 0/1: charted
    }
