import itertools
import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from abdist.config import load_config
from abdist.data import build_augment
from abdist.data.memory import DataBundle, TensorSplit
from abdist.engine.recipe import run
from abdist.losses import build_loss_spec, parametric_cross_entropy
from abdist.methods import Batch
from abdist.methods.autobalance import AutoBalance
from abdist.models import Classifier, create_model
from tests.conftest import FAST, REPO


def _gaussian_lt(counts, n_val_per_class, dim=4, seed=0):
    """Long-tailed Gaussian blobs in feature space, stored as [N, dim, 1, 1] 'images'."""
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(len(counts), dim, generator=g)

    def draw(ns):
        xs, ys = [], []
        for c, n in enumerate(ns):
            xs.append(means[c] + torch.randn(n, dim, generator=g))
            ys.append(torch.full((n,), c))
        return TensorSplit(torch.cat(xs)[:, :, None, None], torch.cat(ys))

    C = len(counts)
    return DataBundle(
        train=draw(counts),
        val=draw([n_val_per_class] * C),
        test=draw([n_val_per_class] * C),
        class_names=[str(c) for c in range(C)],
        in_channels=dim,
        image_size=1,
    )


def _linear_model(dim, C):
    torch.manual_seed(0)
    return Classifier(nn.Flatten(), nn.Linear(dim, C), dim)


def _solve_lower(method, model, data, wd, iters=200):
    """Train the head to (near) optimality of the current parametric loss: the lower problem."""
    x, y = data.train.images, data.train.labels
    opt = torch.optim.LBFGS(model.head.parameters(), max_iter=iters, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)  # fmt: skip

    def closure():
        opt.zero_grad()
        reg = sum((p**2).sum() for p in model.head.parameters())
        loss = method.training_loss(model, Batch(x, y)) + 0.5 * wd * reg
        loss.backward()
        return loss

    opt.step(closure)


def _ab_config(*extra):
    return load_config(
        None,
        [
            "method.name=autobalance",
            "autobalance.hypergrad=exact",
            "autobalance.warmup_epochs=0",
            "autobalance.hyper_interval=1",
            "autobalance.hyper_batches=1",
            "autobalance.clip=0",
            "train.batch_size=100000",  # one batch = the whole split: the true bilevel objective
            "optim.weight_decay=0.01",
            *extra,
        ],
    )


@pytest.mark.numerics
def test_search_lowers_the_validation_objective():
    counts = [200, 80, 30, 12, 5]
    data = _gaussian_lt(counts, 40)
    cfg = _ab_config("autobalance.tune=[l,delta]", "autobalance.upper_optim=sgd",
                     "autobalance.upper_lr=0.5", "autobalance.upper_momentum=0")  # fmt: skip
    spec = build_loss_spec("ce", counts)
    model = _linear_model(4, len(counts))
    ab = AutoBalance(cfg, data, spec, None, torch.device("cpu"))

    def val_objective():
        with torch.no_grad():
            return float(ab.objective(model(data.val.images), data.val.labels))

    history = []
    for t in range(15):
        _solve_lower(ab, model, data, cfg.optim.weight_decay)
        history.append(val_objective())
        ab.hyper_step(model, t)
    _solve_lower(ab, model, data, cfg.optim.weight_decay)
    history.append(val_objective())
    print(history)
    # measured: a drop of 0.120 and l[0] - l[-1] = 0.755 on every `make test-portable` setting
    assert history[-1] < history[0] - 0.02, history
    # Like logit adjustment, the learned shift favours head classes during training (l grows with
    # frequency), which pushes the decision boundary towards them and helps the tail at test time.
    l = ab.loss_params()["l"]
    assert l[0] > l[-1] + 0.1, l


@pytest.mark.numerics
def test_expected_train_loss_equals_the_average_over_augmentation_masks():
    torch.manual_seed(0)
    C, B = 3, 4
    counts = [10, 5, 2]
    data = _gaussian_lt(counts, 2)
    cfg = _ab_config("autobalance.tune=[aug,l,w]", "data.augment_ops=[brightness]")
    augment = build_augment(cfg.data, replace(data, normalization=((0.0,) * 4, (1.0,) * 4)), 0)
    ab = AutoBalance(cfg, data, build_loss_spec("ce", counts), augment, "cpu")
    with torch.no_grad():
        for v in ab.coordinator.alpha_sub.values():
            v.normal_()
    alpha = {k: v.detach() for k, v in ab.coordinator.alpha_sub.items()}
    logits, logits_aug = torch.randn(B, C), torch.randn(B, C)
    y = torch.tensor([0, 1, 2, 1])
    p = torch.sigmoid(alpha["aug"])[y]  # per-class dictionary = identity
    w, l = torch.exp(alpha["w"]), alpha["l"]
    expected = 0.0
    for mask in itertools.product([0, 1], repeat=B):  # enumerate every augmentation outcome
        m = torch.tensor(mask, dtype=torch.bool)
        prob = torch.where(m, p, 1 - p).prod()
        z = torch.where(m[:, None], logits_aug, logits)
        expected += prob * parametric_cross_entropy(z, y, w=w, l=l)
    got = ab.expected_train_loss(alpha, logits, logits_aug, y)
    # measured <= 1.7e-7 relative on every `make test-portable` setting
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("scope, solver", [("head", "cg"), ("full", "cg"), ("head", "neumann")])
def test_hyper_step_never_touches_batchnorm_or_model_weights(scope, solver):
    from abdist.data.digits import load_digits_lt

    data = load_digits_lt(imbalance_ratio=10, seed=0)
    cfg = load_config(None, ["method.name=autobalance", f"autobalance.scope={scope}",
                             f"autobalance.hypergrad={solver}", "autobalance.solver_iterations=3",
                             "autobalance.damping=0.1", "autobalance.tune=[l,delta,w]",
                             "train.batch_size=32"])  # fmt: skip
    model = create_model("small_cnn", 10, in_channels=1, image_size=8)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        model(data.train.images[:64])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ab = AutoBalance(cfg, data, build_loss_spec("la", data.class_counts), None, "cpu")
    alpha0 = {k: v.clone() for k, v in ab.coordinator.alpha_sub.items()}
    stats = ab.hyper_step(model, 0)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    moved = sum(
        float((ab.coordinator.alpha_sub[k] - alpha0[k]).abs().sum().detach()) for k in alpha0
    )
    assert moved > 0 and stats["hypergrad_norm"] > 0
    # head: the convex head's Hessian; full: Gauss-Newton (auto); neumann reports none.
    assert 1 <= stats["solver_iterations"] <= 3 and stats["negative_curvature"] == 0


@pytest.mark.numerics
def test_full_scope_solves_with_gauss_newton_where_the_hessian_stops_cg():
    # A network away from a minimum has an indefinite Hessian: CG on it exits on negative
    # curvature within a couple of iterations, with a residual no better than x = 0. The default
    # full-scope curvature (auto -> Gauss-Newton) is PSD and CG runs to a small residual.
    from abdist.data.digits import load_digits_lt

    data = load_digits_lt(imbalance_ratio=10, seed=0)
    stats = {}
    for curvature in ("hessian", "auto"):
        over = ["method.name=autobalance", "autobalance.scope=full", "autobalance.hypergrad=cg",
                "autobalance.solver_iterations=10", "autobalance.damping=0.1",
                "autobalance.tune=[l,delta,w]",
                "train.batch_size=32", f"autobalance.curvature={curvature}"]  # fmt: skip
        cfg = load_config(None, over)
        torch.manual_seed(0)
        model = create_model("small_cnn", 10, in_channels=1, image_size=8)
        with torch.no_grad():
            model(data.train.images[:64])
        ab = AutoBalance(cfg, data, build_loss_spec("la", data.class_counts), None, "cpu")
        stats[curvature] = ab.hyper_step(model, 0)
    # measured: Hessian residual 1.93 after 2 iterations, Gauss-Newton <= 5.6e-7 after 10,
    # on every `make test-portable` setting
    assert stats["hessian"]["negative_curvature"] == 1 and stats["hessian"]["solver_residual"] > 0.5
    assert stats["auto"]["negative_curvature"] == 0 and stats["auto"]["solver_residual"] < 1e-2
    assert stats["auto"]["solver_iterations"] == 10
    # The focal loss is not convex in the logits, so auto keeps the Hessian for it.
    focal = load_config(None, [*over[:-1], "loss.name=focal", "loss.gamma=2"])
    spec = build_loss_spec("focal", data.class_counts, gamma=2.0)
    assert AutoBalance(focal, data, spec, None, "cpu").curvature() == "hessian"


@pytest.mark.numerics
def test_la_init_is_exact_and_buckets_share_parameters():
    from abdist.data.digits import load_digits_lt

    data = load_digits_lt(imbalance_ratio=10, seed=0)
    spec = build_loss_spec("la", data.class_counts)
    cfg = load_config(None, ["method.name=autobalance", "autobalance.dictionary=buckets",
                             "autobalance.dictionary_size=3"])  # fmt: skip
    ab = AutoBalance(cfg, data, spec, None, "cpu")
    params = ab.loss_params()
    assert params["delta"] == pytest.approx([1.0] * 10)
    assert len(ab.coordinator.alpha_sub["l"]) == 3
    assert len(set(round(v, 6) for v in params["l"])) <= 3  # one value per bucket
    cfg = load_config(None, ["method.name=autobalance"])
    ab = AutoBalance(cfg, data, spec, None, "cpu")
    assert ab.loss_params()["l"] == pytest.approx(spec.l.tolist(), abs=1e-5)


def test_search_then_retrain_uses_the_searched_parameters(tmp_path):
    cfg = load_config(REPO / "configs/digits_lt/autobalance.yaml",
                      [*FAST, "autobalance.warmup_epochs=1",
                       "autobalance.tune=[l,delta,aug,aug_mag]"])  # fmt: skip
    m = run(cfg, tmp_path)
    searched = json.loads((tmp_path / "search" / "alpha.json").read_text())
    assert json.loads((tmp_path / "alpha.json").read_text()) == searched
    retrained = json.loads((tmp_path / "retrain" / "alpha.json").read_text())
    for key in ("l", "delta", "aug", "aug_mag"):
        assert retrained[key] == pytest.approx(searched[key]), key
    assert searched["aug"] != pytest.approx([0.5] * 10)  # the augmentation probability was tuned
    assert searched["aug_mag"] != pytest.approx([0.5] * 10)  # and so was its magnitude
    assert m["method"] == "autobalance/la" and "search" in m
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["balanced_error"] == m["balanced_error"]
    # retrain trains on train+val: more samples per class than the search saw
    search_counts = json.loads((tmp_path / "search" / "metrics.json").read_text())["class_counts"]
    assert all(a > b for a, b in zip(on_disk["class_counts"], search_counts))
    log = (tmp_path / "retrain" / "log.jsonl").read_text().splitlines()
    assert "val_balanced_error" not in json.loads(log[0])


def _with_groups(data: DataBundle, G: int = 2) -> DataBundle:
    def grouped(s: TensorSplit) -> TensorSplit:
        return TensorSplit(s.images, s.labels, torch.arange(len(s.labels)) % G)

    return DataBundle(grouped(data.train), grouped(data.val), grouped(data.test),
                      data.class_names, data.in_channels, data.image_size)  # fmt: skip


@pytest.mark.numerics
def test_per_group_cells_tiled_from_class_vectors_reproduce_the_class_level_step():
    # Cells start from the class preset copied into each group's row. At that point the cell loss
    # IS the class loss, so (chain rule through the tiling) the cell hypergradient summed over the
    # groups is the class hypergradient: with plain SGD on alpha_sub, the groups' updates of a
    # class add up to the class-level update. Exact solver, per-class dictionary.
    data = _with_groups(_gaussian_lt([40, 20, 10, 5], n_val_per_class=12))
    over = ["method.name=autobalance", "autobalance.tune=[w,l,delta]",
            "autobalance.hypergrad=exact",
            "autobalance.upper_optim=sgd", "autobalance.upper_momentum=0", "autobalance.clip=0",
            "autobalance.upper_lr=1.0", "autobalance.hyper_batches=2", "train.batch_size=32",
            "optim.weight_decay=0.01"]  # fmt: skip
    torch.manual_seed(0)
    model = _linear_model(4, 4)
    spec = build_loss_spec("la", data.class_counts)
    x, y, g = data.train.images, data.train.labels, data.train.groups
    moves, losses = {}, {}
    for per_group in (False, True):
        cfg = load_config(None, [*over, f"autobalance.per_group={str(per_group).lower()}"])
        ab = AutoBalance(cfg, data, spec, None, "cpu")
        assert ab.needs == (frozenset({"groups"}) if per_group else frozenset())
        assert ab.current["l"].shape == ((2, 4) if per_group else (4,))
        a0 = {k: v.clone() for k, v in ab.coordinator.alpha_sub.items()}
        losses[per_group] = ab.training_loss(model, Batch(x, y, g if per_group else None))
        ab.hyper_step(model, 0)
        moves[per_group] = {k: ab.coordinator.alpha_sub[k] - a0[k] for k in a0}
    # measured: equal on every `make test-portable` setting
    assert torch.allclose(losses[True], losses[False])  # the tiled start is the class loss
    for k, class_move in moves[False].items():
        summed = moves[True][k].view(2, 4).sum(0)
        assert class_move.abs().max() > 1e-4, k
        # measured <= 2.4e-7 absolute, 2.2e-6 relative on every `make test-portable` setting
        assert torch.allclose(summed, class_move, rtol=1e-4, atol=1e-6), k
    # ... and the two groups' updates differ (the cells really are separate parameters).
    assert not torch.allclose(moves[True]["l"].view(2, 4)[0], moves[True]["l"].view(2, 4)[1])
    # With distinct rows, sample i is trained under its own group's row: checked sample by sample.
    cfg = load_config(None, [*over, "autobalance.per_group=true"])
    ab = AutoBalance(cfg, data, spec, None, "cpu")
    gen = torch.Generator().manual_seed(0)
    rows = {k: torch.rand(2, 4, generator=gen) for k in ("l", "delta", "w")}
    ab.current.update(l=rows["l"] - 0.5, delta=rows["delta"] + 0.5, w=rows["w"] + 0.5)
    c, z = ab.current, model(x).float()
    ce = torch.nn.functional.cross_entropy
    terms = [
        (c["w"][gi, yi], ce(c["delta"][gi] * zi + c["l"][gi], yi)) for zi, yi, gi in zip(z, y, g)
    ]
    manual = sum(w * ce for w, ce in terms) / sum(w for w, _ in terms)
    # measured <= 1.1e-7 relative on every `make test-portable` setting
    assert torch.allclose(ab.training_loss(model, Batch(x, y, g)), manual, rtol=1e-5)
    with pytest.raises(ValueError, match="group ids"):
        ab.training_loss(model, Batch(x, y))


@pytest.mark.numerics  # two computations of one hypergradient: rtol measured under each kernel
@pytest.mark.parametrize("scope", ["head", "full"])
def test_aug_mag_hyper_step_solves_at_the_fixed_input_with_the_same_hypergradient(
    scope, monkeypatch
):
    """With aug_mag the augmented input moves with α. The hyper step hands the solve the
    augmented batch's network input computed once (outputs_fixed) so the curvature products
    never run the chain and backbone back to α: it must give the outputs of the α-moving
    closure exactly, and the hypergradient the closure alone gives."""
    import dataclasses

    import abdist.methods.autobalance_hyper as hyper
    from abdist.data.digits import load_digits_lt

    data = load_digits_lt(imbalance_ratio=10, seed=0)
    cfg = load_config(None, ["method.name=autobalance", f"autobalance.scope={scope}",
                             "autobalance.solver_iterations=5", "autobalance.damping=0.1",
                             "autobalance.tune=[l,aug,aug_mag]", "train.batch_size=32",
                             "data.augment_ops=[translate,brightness,contrast]"])  # fmt: skip
    model = create_model("small_cnn", 10, in_channels=1, image_size=8)
    ab = AutoBalance(cfg, data, build_loss_spec("la", data.class_counts),
                     build_augment(cfg.data, data, seed=0), "cpu")  # fmt: skip
    calls = []
    real = hyper.hypergradient

    def spy(train_loss, val_loss, params, alpha, **kw):
        out = real(train_loss, val_loss, params, alpha, **kw)
        # α as the solve saw it (the upper step then updates the coordinator's α in place)
        alpha = {k: v.clone() for k, v in alpha.items()}
        calls.append((train_loss, val_loss, params, alpha, kw, out))
        return out

    monkeypatch.setattr(hyper, "hypergradient", spy)
    model.eval()  # the hyper step's mode, for the comparisons below
    ab.hyper_step(model, 0)
    ((train_loss, val_loss, params, alpha, kw, (grad, info)),) = calls
    assert train_loss.takes_alpha and train_loss.outputs_fixed is not None
    with torch.no_grad():
        for fixed, moving in zip(train_loss.outputs_fixed(params),
                                 train_loss.outputs(params, alpha)):  # fmt: skip
            assert torch.equal(fixed, moving)
    plain = dataclasses.replace(train_loss, outputs_fixed=None)
    again, _ = real(plain, val_loss, params, alpha, **kw)
    assert grad["aug_mag"].abs().max() > 0  # the magnitude has a hypergradient at all
    for k in grad:
        torch.testing.assert_close(grad[k], again[k], rtol=1e-5, atol=1e-7)
