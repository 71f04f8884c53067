"""The methods' own config sections: `autobalance.*` and `selmix.*` (each key's declaration;
the checks across keys live with each method, in its MethodSpec's `validate`)."""

from __future__ import annotations

from dataclasses import dataclass

from abdist.config_values import opt


@dataclass
class AutoBalanceConfig:
    """`autobalance.*` (method.name=autobalance). Until 0.1 these keys sat in `method.*`;
    those names still load (ALIASES), so older config files and run directories resume."""

    # AutoBalance: the loss preset in `loss` is the initialisation (ce: neutral, la: l = tau*log pi,
    # cdt: delta ~ (n/n_max)^gamma, vs: both); these keys say what is tuned and how.
    tune: list = opt(["l", "delta"], help="subset of w, l, delta, aug, aug_mag")
    dictionary: str = opt(
        "per_class",
        choices=("per_class", "buckets", "interp"),
        help="frequency dictionary: per class, buckets by log-frequency, interp over rank",
    )
    dictionary_size: int = opt(0, lo=0, help="K for buckets/interp (0 = number of classes)")
    hypergrad: str = opt(
        "cg", choices=("exact", "cg", "neumann"), help="inverse-Hessian solve of the hypergradient"
    )
    scope: str = opt(
        "head",
        choices=("head", "full"),
        help="hypergradient through the head only, or every weight",
    )
    solver_iterations: int = opt(50, lo=1, help="CG/Neumann iterations (head: cheap)")
    damping: float = opt(0.0, lo=0.0, help="extra lambda*I in the Hessian solve")
    curvature: str = opt(
        "auto",
        choices=("auto", "hessian", "gauss_newton"),
        help="H in the solve; auto: hessian for scope=head, gauss_newton (PSD) for scope=full",
    )
    objective: str = opt(
        "balanced_ce",
        choices=("balanced_ce", "worst_class", "blend", "equal_opportunity_gap"),
        help="validation objective the loss parameters are tuned for",
    )
    temperature: float = opt(0.1, lo=0.0, lo_open=True, help="worst_class / EO soft-max T")
    blend_beta: float = opt(
        0.5, lo=0.0, hi=1.0, help="blend, equal_opportunity_gap: weight of plain CE"
    )
    warmup_epochs: int = opt(5, lo=0, help="epochs of plain training before hyper steps")
    hyper_interval: int = opt(20, lo=1, help="a hyper step every k optimiser steps")
    hyper_batches: int = opt(2, lo=1, help="train and val batches per hyper step")
    upper_optim: str = opt("adam", choices=("sgd", "adam"), help="optimiser of the loss parameters")
    upper_lr: float = opt(0.05, lo=0.0, lo_open=True, help="learning rate of the loss parameters")
    upper_momentum: float = opt(0.9, lo=0.0, hi=1.0, help="upper_optim=sgd: momentum")
    clip: float = opt(1.0, lo=0.0, help="max norm of the hypergradient (0 = off)")
    aug_init: float = opt(0.5, lo=0.0, hi=1.0, help="initial per-class chain probability")
    per_group: bool = opt(
        False, help="w, l, delta per (group, class) cell (in-memory data with groups; not aug)"
    )
    retrain: bool = opt(True, help="after the search, retrain on train+val with the found loss")


# abdist/methods/selmix_objectives.py implements them (and imports this tuple).
SELMIX_OBJECTIVES = (
    "mean_recall",
    "min_recall",
    "gmean",
    "hmean",
    "min_head_tail_recall",
    "mean_recall_coverage",
    "hmean_coverage",
)


@dataclass
class SelMixConfig:
    """`selmix.*` (method.name=selmix): selective mixup fine-tuning of `model.init_from`'s
    weights for a non-decomposable objective on the validation split (README: SelMix)."""

    objective: str = opt(
        "min_recall",
        choices=SELMIX_OBJECTIVES,
        help="validation objective the fine-tune raises",
    )
    refresh_interval: int = opt(
        50, lo=1, help="optimiser steps between refreshes of the prototypes, confusion and P"
    )
    temperature: float = opt(0.1, lo=0.0, lo_open=True, help="P = softmax(gain / T)")
    relative_temperature: bool = opt(
        False, help="T in units of the largest gain: P = softmax(gain / (T max gain))"
    )
    lambda_min: float = opt(0.6, lo=0.0, hi=1.0, help="mixing weight lambda ~ U(lambda_min, 1)")
    min_sharpness: float = opt(
        50.0, lo=0.0, lo_open=True, help="min-type objectives: soft-min multipliers softmax(-eta r)"
    )
    tail_fraction: float = opt(
        0.1,
        lo=0.0,
        hi=1.0,
        help="min_head_tail_recall: tail = this fraction of classes with the fewest TRAINING "
        "samples",
    )
    coverage_alpha: float = opt(
        0.95,
        lo=0.0,
        lo_open=True,
        hi=1.0,
        help="coverage objectives: every class predicted at least alpha/K of the time",
    )
    coverage_lambda_max: float = opt(100.0, lo=0.0, help="coverage multipliers' ceiling")
    coverage_tau: float = opt(0.01, lo=0.0, lo_open=True, help="coverage multipliers' softness")
    confusion: str = opt(
        "soft",
        choices=("soft", "hard"),
        help="confusion the gain's gradient is taken at: soft (mean predicted probabilities; "
        "a class never predicted right still has a gradient) or hard (argmax, the public code's)",
    )
    backbone_lr_scale: float = opt(
        0.1, lo=0.0, help="backbone lr = optim.lr x this (the head gets optim.lr; 0 = frozen)"
    )
    freeze_bn: bool = opt(True, help="BatchNorm statistics frozen during the fine-tune")
