"""Checks across config keys that a single key cannot express (each key alone is checked where
it is set); a method's own cross-key checks are its MethodSpec.validate, run from here."""

from __future__ import annotations

import math

from abdist.errors import UserError


def validate(cfg) -> None:
    """Cross-field checks that a single key cannot express."""
    from abdist import methods  # imported here: the methods themselves import this module

    # A registered method, or one line with a suggestion; then its own cross-key checks.
    methods.get(cfg.method.name).validate(cfg)
    if cfg.data.val >= 1 and cfg.data.val != int(cfg.data.val):
        raise UserError(
            f"'data.val' is a fraction (<1) or a whole count per class; got {cfg.data.val}"
        )
    if cfg.train.few_shot_max > cfg.train.many_shot_min:
        raise UserError(
            "'train.few_shot_max' must not exceed 'train.many_shot_min' "
            f"({cfg.train.few_shot_max} > {cfg.train.many_shot_min})"
        )
    for m in cfg.optim.milestones:
        if not isinstance(m, (int, float)) or isinstance(m, bool) or m < 0:
            raise UserError(f"'optim.milestones' must be a list of epochs >= 0; got {m!r}")
    _check_augment(cfg.data)
    if cfg.data.source == "digits" and not cfg.data.in_memory:
        raise UserError(
            "'data.in_memory=false' streams prepared shards; data.source=digits is always in "
            "memory (drop the key, or prepare shards and set data.source=shards)"
        )
    if cfg.data.source == "shards" and not cfg.data.root:
        raise UserError("'data.root' must name a shard directory when data.source=shards")
    if cfg.train.merge_val and cfg.train.select == "best_val":
        raise UserError("'train.select=best_val' needs a validation split; unset train.merge_val")
    if cfg.dist.zero_stage and cfg.dist.backend != "deepspeed":
        raise UserError(
            f"'dist.zero_stage={cfg.dist.zero_stage}' needs 'dist.backend=deepspeed' "
            f"(got '{cfg.dist.backend}')"
        )
    if cfg.optim.warmup_epochs > cfg.train.epochs:
        raise UserError(
            f"'optim.warmup_epochs' ({cfg.optim.warmup_epochs}) exceeds "
            f"'train.epochs' ({cfg.train.epochs}): set optim.warmup_epochs={cfg.train.epochs} "
            f"(or less), or train.epochs={math.ceil(cfg.optim.warmup_epochs)} (or more)"
        )


def _check_augment(data) -> None:
    from abdist.data.augment_chain import check_ops

    if data.augment_ops:
        if not all(isinstance(op, str) for op in data.augment_ops):
            raise UserError(
                f"'data.augment_ops' must be a list of op names; got {data.augment_ops}"
            )
        try:
            check_ops(data.augment_ops, data.augment_num_ops)
        except UserError as e:
            raise UserError(f"'data.augment_ops' / 'data.augment_num_ops': {e}") from None
    elif data.augment_prob < 1:
        raise UserError(
            f"'data.augment_prob={data.augment_prob}' is the share of samples the class-aware "
            "chain runs on, and no chain is configured: set data.augment_ops (e.g. "
            "[rotate,brightness,contrast,cutout]) or drop data.augment_prob"
        )


def check_positive_class(cfg, num_classes: int) -> int:
    """`train.positive_class`, checked against the data's number of classes (known only now)."""
    p = cfg.train.positive_class
    if p >= num_classes:
        raise UserError(
            f"'train.positive_class' is {p} but the data has {num_classes} classes "
            f"(0..{num_classes - 1}); set it to the class whose TPR the groups should share"
        )
    return p
