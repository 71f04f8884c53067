"""Hand-computed checks for abdist.metrics (every expected number is worked out in a comment)."""

import json

import pytest
import torch

from abdist.group_metrics import group_metrics
from abdist.metrics import ConfusionAccumulator, class_metrics, confusion_matrix

# 4 classes; class 3 never occurs as a label (absent from the evaluated set) but is predicted once.
#   class 0: labels 0,0,0,0 -> preds 0,0,0,1   recall 3/4
#   class 1: labels 1,1     -> preds 1,3       recall 1/2
#   class 2: labels 2,2,2,2 -> preds 2,2,2,2   recall 4/4
LABELS = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
PREDS = [0, 0, 0, 1, 1, 3, 2, 2, 2, 2]
EXPECTED_CONFUSION = [
    [3, 1, 0, 0],
    [0, 1, 0, 1],
    [0, 0, 4, 0],
    [0, 0, 0, 0],
]


def test_confusion_matrix_hand_example_rows_true_cols_pred():
    cm = confusion_matrix(torch.tensor(PREDS), torch.tensor(LABELS), 4)
    assert cm.dtype == torch.long
    assert cm.tolist() == EXPECTED_CONFUSION
    # Lists are accepted too, and any shape is flattened.
    cm2 = confusion_matrix(torch.tensor(PREDS).reshape(2, 5), LABELS, 4)
    assert cm2.tolist() == EXPECTED_CONFUSION


@pytest.mark.parametrize(
    ("preds", "labels", "match"),
    [
        ([0, 1], [0, 3], "labels contains 3"),  # label == num_classes
        ([0, 1], [-1, 0], "labels contains -1"),
        ([0, 5], [0, 1], "preds contains 5"),
        ([0], [0, 1], "same|elements"),
        (torch.tensor([0.0, 1.0]), [0, 1], "integer"),  # logits/floats are not class indices
    ],
)
def test_confusion_matrix_rejects_bad_input(preds, labels, match):
    with pytest.raises(ValueError, match=match):
        confusion_matrix(preds, labels, 3)


def test_class_metrics_absent_class_is_excluded_from_averages():
    m = class_metrics(torch.tensor(EXPECTED_CONFUSION))
    assert m["num_samples"] == 10
    # accuracy = (3 + 1 + 4) / 10 = 0.8
    assert m["accuracy"] == pytest.approx(0.8)
    # recalls over present classes: 3/4, 1/2, 1; class 3 has no samples -> None
    assert m["per_class_recall"] == [pytest.approx(0.75), pytest.approx(0.5), 1.0, None]
    # balanced error = 1 - (0.75 + 0.5 + 1) / 3 = 1 - 0.75 = 0.25
    # (if absent class 3 were counted as recall 0 it would be 1 - 2.25 / 4 = 0.4375)
    assert m["balanced_error"] == pytest.approx(0.25)
    assert m["worst_class_recall"] == pytest.approx(0.5)
    # G-mean = (0.75 * 0.5 * 1) ** (1/3) = 0.375 ** (1/3) = 0.72112...
    assert m["gmean_recall"] == pytest.approx(0.375 ** (1 / 3))
    assert m["gmean_recall"] == pytest.approx(0.7211247852)
    # H-mean = 3 / (1/0.75 + 1/0.5 + 1/1) = 3 / (4/3 + 3) = 9/13 = 0.69230...
    assert m["hmean_recall"] == pytest.approx(9 / 13)
    # Plain Python values only, so the dict goes straight into metrics.json.
    assert json.loads(json.dumps(m)) == m
    assert all(type(v) in (int, float, list) for v in m.values())


def test_class_metrics_zero_recall_class_zeroes_gmean_and_hmean():
    # labels 0,0,1,1 all predicted 0: recalls [2/2, 0/2] = [1, 0]
    cm = confusion_matrix([0, 0, 0, 0], [0, 0, 1, 1], 2)
    assert cm.tolist() == [[2, 0], [2, 0]]
    m = class_metrics(cm)
    assert m["accuracy"] == pytest.approx(0.5)  # 2 / 4
    assert m["balanced_error"] == pytest.approx(0.5)  # 1 - (1 + 0) / 2
    assert m["worst_class_recall"] == 0.0
    assert m["gmean_recall"] == 0.0
    assert m["hmean_recall"] == 0.0


def test_class_metrics_many_medium_few_buckets_and_boundaries():
    # Training counts chosen on the bucket boundaries (defaults: many > 100, few < 20):
    #   500 -> many, 101 -> many, 100 -> medium, 20 -> medium, 19 -> few
    counts = [500, 101, 100, 20, 19]
    cm = [
        [2, 0, 0, 0, 0],  # class 0 recall 2/2 = 1
        [1, 1, 0, 0, 0],  # class 1 recall 1/2 = 0.5
        [0, 0, 1, 1, 0],  # class 2 recall 1/2 = 0.5
        [0, 0, 2, 0, 0],  # class 3 recall 0/2 = 0
        [3, 0, 0, 0, 1],  # class 4 recall 1/4 = 0.25
    ]
    m = class_metrics(torch.tensor(cm), class_counts=counts)
    assert m["many_shot_accuracy"] == pytest.approx(0.75)  # (1 + 0.5) / 2
    assert m["medium_shot_accuracy"] == pytest.approx(0.25)  # (0.5 + 0) / 2
    assert m["few_shot_accuracy"] == pytest.approx(0.25)  # 0.25 / 1
    # Custom thresholds: many > 100, medium exactly 100, few < 100.
    m2 = class_metrics(cm, class_counts=counts, many_shot_min=100, few_shot_max=100)
    # many: 500, 101 -> (1 + 0.5) / 2; medium: exactly 100 -> 0.5; few: 20, 19 -> (0 + 0.25) / 2
    assert m2["many_shot_accuracy"] == pytest.approx(0.75)
    assert m2["medium_shot_accuracy"] == pytest.approx(0.5)
    assert m2["few_shot_accuracy"] == pytest.approx(0.125)
    with pytest.raises(ValueError, match="few_shot_max"):
        class_metrics(cm, class_counts=counts, many_shot_min=10, few_shot_max=20)


def test_class_metrics_bucket_without_present_class_is_none():
    # Class 2 is few-shot (5 training samples) but absent from the evaluated set.
    cm = [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    m = class_metrics(cm, class_counts=torch.tensor([500, 50, 5]))
    assert m["many_shot_accuracy"] == pytest.approx(1.0)  # class 0: 1/1
    assert m["medium_shot_accuracy"] == pytest.approx(0.5)  # class 1: 1/2
    assert m["few_shot_accuracy"] is None
    # Without class_counts the bucket keys are not reported at all.
    assert "many_shot_accuracy" not in class_metrics(cm)


def test_class_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="no samples"):
        class_metrics(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="square"):
        class_metrics(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="class_counts has 2"):
        class_metrics([[1, 0, 0], [0, 1, 0], [0, 0, 1]], class_counts=[10, 10])


def test_gmean_is_stable_for_many_classes():
    # 2000 classes at recall 0.5: the naive product 0.5**2000 underflows to 0.0 in float64.
    cm = torch.zeros(2000, 2000, dtype=torch.long)
    idx = torch.arange(2000)
    cm[idx, idx] = 1
    cm[idx, (idx + 1) % 2000] = 1
    m = class_metrics(cm)
    assert m["gmean_recall"] == pytest.approx(0.5)
    assert m["hmean_recall"] == pytest.approx(0.5)


def test_group_metrics_hand_example():
    # positive_class = 1; group ids 0 and 5 (groups 1..4 absent -> not reported)
    #   group 0: labels 1,1,0,0  preds 1,0,0,0 -> acc 3/4, TPR 1/2, FPR 0/2, P(pred=1) 1/4
    #   group 5: labels 1,1,0,0  preds 1,1,1,1 -> acc 2/4, TPR 2/2, FPR 2/2, P(pred=1) 4/4
    labels = [1, 1, 0, 0, 1, 1, 0, 0]
    preds = [1, 0, 0, 0, 1, 1, 1, 1]
    groups = [0, 0, 0, 0, 5, 5, 5, 5]
    m = group_metrics(torch.tensor(preds), torch.tensor(labels), torch.tensor(groups))
    assert m["group_size"] == {0: 4, 5: 4}
    assert m["group_accuracy"] == {0: 0.75, 5: 0.5}
    assert m["worst_group_accuracy"] == 0.5
    assert m["group_tpr"] == {0: 0.5, 5: 1.0}
    assert m["group_fpr"] == {0: 0.0, 5: 1.0}
    assert m["group_positive_rate"] == {0: 0.25, 5: 1.0}
    assert m["equal_opportunity_gap"] == pytest.approx(0.5)  # 1 - 1/2
    assert m["demographic_parity_gap"] == pytest.approx(0.75)  # 1 - 1/4
    assert m["equalized_odds_gap"] == pytest.approx(1.0)  # max(TPR gap 0.5, FPR gap 1 - 0)
    json.dumps(m)  # int keys are fine for json


def test_group_metrics_group_without_positives_is_left_out_of_tpr_gap():
    # group 0: labels 1,0 preds 1,0 -> TPR 1/1, FPR 0/1, P(pred=1) 1/2
    # group 1: labels 0,0 preds 0,1 -> TPR undefined (no positives), FPR 1/2, P(pred=1) 1/2
    m = group_metrics([1, 0, 0, 1], [1, 0, 0, 0], [0, 0, 1, 1])
    assert m["group_tpr"] == {0: 1.0, 1: None}
    assert m["equal_opportunity_gap"] == 0.0  # only group 0 defines a TPR
    assert m["demographic_parity_gap"] == 0.0  # 1/2 - 1/2
    assert m["equalized_odds_gap"] == pytest.approx(0.5)  # FPR gap 1/2 - 0


def test_group_metrics_multiclass_one_vs_rest():
    # positive_class = 2; labels 2,2,0,1 preds 2,1,2,1 (single group)
    #   TPR = 1/2 (one of two true 2s predicted 2); FPR = 1/2 (label 0 predicted 2; label 1 not)
    m = group_metrics([2, 1, 2, 1], [2, 2, 0, 1], [0, 0, 0, 0], positive_class=2)
    assert m["group_tpr"] == {0: 0.5}
    assert m["group_fpr"] == {0: 0.5}
    assert m["group_accuracy"] == {0: 0.5}  # correct: idx 0 and 3


def test_accumulator_batches_and_merge_equal_one_shot():
    full = confusion_matrix(PREDS, LABELS, 4)
    acc = ConfusionAccumulator(4)
    acc.update(torch.tensor(PREDS[:3]), torch.tensor(LABELS[:3]))
    acc.update(torch.tensor(PREDS[3:]), torch.tensor(LABELS[3:]))
    assert torch.equal(acc.confusion, full)

    # Two "ranks" each see half of the data; merging gives the whole matrix.
    a, b = ConfusionAccumulator(4), ConfusionAccumulator(4)
    a.update(PREDS[:5], LABELS[:5])
    b.update(PREDS[5:], LABELS[5:])
    assert a.merge(b) is a
    assert a.confusion.tolist() == EXPECTED_CONFUSION
    # A raw tensor (e.g. the result of an all_reduce) can be merged too: counts double.
    a.merge(full)
    assert a.confusion.tolist() == (2 * full).tolist()
    assert a.compute()["balanced_error"] == pytest.approx(0.25)  # same recalls as before

    # `confusion` is a copy: mutating it must not corrupt the accumulator.
    c = acc.confusion
    c += 100
    assert torch.equal(acc.confusion, full)
    acc.reset()
    assert int(acc.confusion.sum()) == 0

    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(ConfusionAccumulator(3))


def test_accumulator_on_cuda_if_available():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    acc = ConfusionAccumulator(4)
    acc.update(torch.tensor(PREDS, device="cuda"), torch.tensor(LABELS, device="cuda"))
    assert acc.confusion.device.type == "cuda"
    assert acc.compute()["accuracy"] == pytest.approx(0.8)


def test_confusion_matrix_per_group_is_the_confusion_of_each_group_s_samples():
    gen = torch.Generator().manual_seed(0)
    p, y, g = (torch.randint(0, n, (200,), generator=gen) for n in (4, 4, 3))
    conf = confusion_matrix(p, y, 4, groups=g, num_groups=3)
    assert conf.shape == (3, 4, 4) and int(conf.sum()) == 200
    for i in range(3):
        assert torch.equal(conf[i], confusion_matrix(p[g == i], y[g == i], 4))
    with pytest.raises(ValueError, match="groups"):
        confusion_matrix(p, y, 4, groups=g, num_groups=2)
