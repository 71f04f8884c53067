"""What AutoBalance's config says beyond single keys: the checks across keys (`autobalance.*`
with `data`, `loss`, `train`; each key alone is checked by abdist.config), registered with the
method's MethodSpec so load_config runs them when method.name=autobalance, and the validation
objective the keys name."""

from __future__ import annotations

from abdist.bilevel.dictionary import TUNABLE
from abdist.bilevel.objectives import get_objective
from abdist.config_checks import check_positive_class
from abdist.errors import UserError


def validate(cfg) -> None:
    """Checks across `autobalance.*` and other sections (each key alone is checked by config)."""
    ab = cfg.autobalance
    bad = [t for t in ab.tune if t not in TUNABLE]
    if bad or not ab.tune:
        raise UserError(
            f"'autobalance.tune' must be a non-empty subset of [{', '.join(TUNABLE)}]; "
            f"got {ab.tune}"
        )
    tuned_aug = [t for t in ("aug", "aug_mag") if t in ab.tune]
    if tuned_aug and not cfg.data.augment_ops:
        raise UserError(
            f"autobalance.tune has {', '.join(tuned_aug)}, the per-class probability/magnitude "
            "of the class-aware chain, but no chain is configured: set data.augment_ops (e.g. "
            "[rotate,brightness,contrast,cutout]) or drop them from autobalance.tune (in configs "
            "written before the chain, aug tuned the crop/flip's probability, now the fixed "
            "data.augment_prob)"
        )
    if "aug" in ab.tune and cfg.data.augment_prob < 1:
        raise UserError(
            "'data.augment_prob' and autobalance.tune=[.., aug] both set the augmentation "
            "probability; drop data.augment_prob and set the starting value with "
            "'autobalance.aug_init'"
        )
    if cfg.loss.name == "focal" and cfg.loss.gamma > 0 and ab.curvature == "gauss_newton":
        raise UserError(
            "'autobalance.curvature=gauss_newton' needs a loss convex in the logits; the focal "
            "term (loss.gamma > 0) is not, so its Gauss-Newton matrix can be indefinite: use auto "
            "or hessian"
        )
    if ab.per_group and tuned_aug:
        raise UserError(
            "'autobalance.per_group=true' tunes w, l, delta per (group, class) cell; the "
            "augmentation strengths stay per class and cannot be tuned with it (drop "
            f"{', '.join(tuned_aug)} from autobalance.tune)"
        )
    if ab.warmup_epochs >= cfg.train.epochs:
        raise UserError(
            f"'autobalance.warmup_epochs' ({ab.warmup_epochs}) leaves no search epochs within "
            f"'train.epochs' ({cfg.train.epochs}): set autobalance.warmup_epochs="
            f"{max(0, cfg.train.epochs - 1)} (or less), or train.epochs="
            f"{ab.warmup_epochs + 1} (or more)"
        )


def build_objective(cfg, data):
    """The validation objective `autobalance.objective` names, built for `data`."""
    name, kw = cfg.autobalance.objective, {}
    if name == "equal_opportunity_gap":
        if data.num_groups is None:
            raise UserError(
                "autobalance.objective=equal_opportunity_gap needs group ids (shards prepared "
                "with --groups), or pick balanced_ce / worst_class / blend"
            )
        kw.update(
            temperature=cfg.autobalance.temperature,
            positive_class=check_positive_class(cfg, data.num_classes),
            num_groups=data.num_groups,
            ce_weight=cfg.autobalance.blend_beta,
        )
    else:
        kw["num_classes"] = data.num_classes
    if name == "worst_class":
        kw["temperature"] = cfg.autobalance.temperature
    if name == "blend":
        kw["beta"] = cfg.autobalance.blend_beta
    return get_objective(name, **kw)
