import torch

from abdist.config import load_config
from abdist.data import build_data
from abdist.data.digits import load_digits_lt
from abdist.data.prepare import PrepareOptions, prepare
from abdist.engine.trainer import train
from tests.conftest import FAST, REPO


def test_shards_in_memory_hold_the_digits_splits_and_train(tmp_path):
    shards = tmp_path / "shards"
    prepare("digits", shards, PrepareOptions(imbalance_ratio=10.0, seed=0))
    cfg = load_config(REPO / "configs/digits_lt/la.yaml",
                      [*FAST, "data.source=shards", f"data.root={shards}"])  # fmt: skip
    data = build_data(cfg.data)
    ref = load_digits_lt(imbalance_ratio=10.0, seed=0)
    assert data.class_counts == ref.class_counts
    assert len(data.val) == len(ref.val) and len(data.test) == len(ref.test)
    assert data.in_channels == 1 and data.image_size == 8
    # normalised with training statistics
    assert abs(float(data.train.images.mean())) < 1e-4
    assert torch.bincount(data.test.labels).tolist() == torch.bincount(ref.test.labels).tolist()
    m = train(cfg, tmp_path / "run")
    assert m["class_counts"] == ref.class_counts and 0 <= m["balanced_error"] <= 1
