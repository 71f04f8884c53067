"""Data entry point: turn the `data` config section into a DataBundle the trainer consumes."""

from __future__ import annotations

from abdist.errors import UserError


def build_data(cfg, rank: int = 0, world_size: int = 1):
    """Build train/val/test splits for `cfg` (a DataConfig); streamed shards are read per rank."""
    if cfg.source == "digits":
        from abdist.data.digits import load_digits_lt

        val = cfg.val if cfg.val < 1 else int(cfg.val)
        return load_digits_lt(
            profile=cfg.profile,
            imbalance_ratio=cfg.imbalance_ratio,
            minority_fraction=cfg.minority_fraction,
            test_per_class=cfg.test_per_class,
            val=val,
            seed=cfg.seed,
        )
    if cfg.source == "shards":
        if not cfg.root:
            raise UserError("data.source=shards needs data.root (a directory from abdist prepare)")
        from abdist.data.manifest import is_ffcv, read_manifest

        if not cfg.in_memory or is_ffcv(read_manifest(cfg.root)):
            from abdist.data.streaming import load_shards_streaming

            return load_shards_streaming(cfg, rank, world_size)
        from abdist.data.shard_memory import load_shards_in_memory

        return load_shards_in_memory(
            cfg.root, bad_data=cfg.bad_data, max_bad_fraction=cfg.max_bad_fraction
        )
    raise UserError(f"data.source '{cfg.source}' is not supported")


def build_augment(cfg, data, seed: int):
    """The training augmentation (abdist/data/augment.py) for `data` under the `data` config
    section `cfg`, or None when nothing is switched on."""
    from abdist.data.augment import build_train_augment

    return build_train_augment(cfg, data.num_classes, getattr(data, "normalization", None), seed)
