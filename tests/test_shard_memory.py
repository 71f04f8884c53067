import pytest
import torch

from abdist.config import load_config
from abdist.data import build_data
from abdist.data.digits import load_digits_lt
from abdist.data.prepare import PrepareOptions, prepare
from abdist.engine.recipe import run
from abdist.engine.trainer import train
from abdist.losses import build_loss_spec
from abdist.methods.autobalance import AutoBalance
from abdist.report import report
from tests.conftest import FAST, REPO


@pytest.mark.numerics
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


@pytest.mark.numerics
def test_group_shards_tune_autobalance_for_equal_opportunity_and_report_group_metrics(tmp_path):
    import json

    import pytest

    from abdist.engine.trainer import evaluate
    from abdist.errors import UserError
    from abdist.group_metrics import group_confusion_metrics, group_metrics
    from abdist.models import create_model

    csv = tmp_path / "groups.csv"
    csv.write_text("".join(f"{i},{'ab'[i % 2]}\n" for i in range(1797)))  # sklearn's digits
    shards = tmp_path / "shards"
    prepare("digits", shards, PrepareOptions(imbalance_ratio=10.0, seed=0, groups=str(csv)))
    over = [*FAST, "data.source=shards", f"data.root={shards}", "autobalance.warmup_epochs=1",
            "autobalance.objective=equal_opportunity_gap", "autobalance.tune=[w,l]",
            "autobalance.retrain=false",
            "train.positive_class=3"]  # fmt: skip
    cfg = load_config(REPO / "configs/digits_lt/autobalance.yaml", over)
    data = build_data(cfg.data)
    assert data.num_groups == 2 and data.val.groups is not None

    # evaluate's per-group confusions give exactly what group_metrics computes from predictions.
    model = create_model("small_cnn", 10, in_channels=1, image_size=8).eval()
    conf = evaluate(model, data.test, num_classes=10, batch_size=64, device="cpu",
                    autocast=torch.autocast("cpu", enabled=False), num_groups=2)  # fmt: skip
    with torch.no_grad():
        preds = model(data.test.images).argmax(1)
    assert group_confusion_metrics(conf, 3) == group_metrics(preds, data.test.labels,
                                                             data.test.groups, 3)  # fmt: skip

    m = train(cfg, tmp_path / "run")
    g = m["groups"]
    assert g["positive_class"] == 3 and sum(g["group_size"].values()) == len(data.test)
    tprs = [v for v in g["group_tpr"].values() if v is not None]
    assert m["equal_opportunity_gap"] == pytest.approx(max(tprs) - min(tprs))
    log = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert all(0 <= r["val_equal_opportunity_gap"] <= 1 for r in log)
    # The hyper steps ran on the group objective: l left its LA initialisation.
    alpha = json.loads((tmp_path / "run/alpha.json").read_text())
    counts = torch.tensor(alpha["class_counts"], dtype=torch.float64)
    la = (counts / counts.sum()).log()
    assert (torch.tensor(alpha["l"], dtype=torch.float64) - la).abs().max() > 1e-3

    # Per-(group, class) cells: searched, written to alpha.json, frozen into the retrain.
    cell_over = [*over[:-1], "autobalance.per_group=true", "autobalance.retrain=true"]
    cells_cfg = load_config(REPO / "configs/digits_lt/autobalance.yaml", cell_over)
    run(cells_cfg, tmp_path / "cells")
    alpha = json.loads((tmp_path / "cells/alpha.json").read_text())
    cells = alpha["cells"]
    assert cells["num_groups"] == 2 and alpha["tuned"] == ["w", "l"]
    assert [len(cells[k]) for k in ("w", "l", "delta")] == [2, 2, 2]
    assert all(len(row) == 10 for k in ("w", "l", "delta") for row in cells[k])
    assert torch.tensor(cells["cell_counts"]).sum(0).tolist() == alpha["class_counts"]
    # The retrain's method is built from these cells: [G, C] rows, batches carrying groups.
    merged = data.with_val_merged()
    frozen = AutoBalance(cells_cfg, merged, build_loss_spec("la", merged.class_counts), None,
                         "cpu", frozen=alpha)  # fmt: skip
    assert "groups" in frozen.needs and frozen.current["l"].tolist() == cells["l"]
    wrong = {**alpha, "cells": {**cells, "num_groups": 3}}
    with pytest.raises(UserError, match="retrain on the data searched on"):
        AutoBalance(cells_cfg, merged, build_loss_spec("la", merged.class_counts), None, "cpu",
                    frozen=wrong)  # fmt: skip
    assert "digits" in report([tmp_path / "cells"], tmp_path / "plots")  # the table, no crash

    with pytest.raises(UserError, match="positive_class"):
        bad = [*FAST, "data.source=shards", f"data.root={shards}", "train.positive_class=10"]
        train(load_config(REPO / "configs/digits_lt/la.yaml", bad), tmp_path / "bad")
