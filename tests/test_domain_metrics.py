"""Domain fairness figures by hand on tiny confusion matrices (abdist/group_metrics.py)."""

import pytest
import torch

from abdist.group_metrics import domain_metrics


def test_two_domains_by_hand():
    # Group 0 (colour): class 0 8/10 right, class 1 6/10 right. Group 1 (grayscale): 5/10, 9/10.
    colour = [[8, 2], [4, 6]]
    gray = [[5, 5], [1, 9]]
    m = domain_metrics(torch.tensor([colour, gray]))
    assert m["domain_accuracy"] == {0: 0.7, 1: 0.7}
    assert m["mean_domain_accuracy"] == pytest.approx(0.7)
    assert m["class_domain_recall"] == {0: [0.8, 0.6], 1: [0.5, 0.9]}
    assert m["eo_gap_per_class"] == pytest.approx([0.3, 0.3])
    assert m["max_eo_gap"] == pytest.approx(0.3)
    # Predicted 0: 12 from colour, 6 from grayscale -> share from grayscale 1/3, |1/3 - 1/2|.
    # Predicted 1: 8 colour, 14 grayscale -> 14/22; |14/22 - 1/2| = 3/22.
    assert m["bias"] == pytest.approx((1 / 6 + 3 / 22) / 2)
    assert m["worst_cell_accuracy"] == 0.5


def test_unequal_domains_compare_with_each_domain_s_share_and_empty_cells_are_skipped():
    # Domain 1 has a quarter of the samples and no class-1 sample.
    a = [[10, 0, 0], [0, 10, 0], [0, 0, 10]]
    b = [[5, 0, 5], [0, 0, 0], [0, 0, 0]]
    m = domain_metrics(torch.tensor([a, b]), group_ids=[3, 7])
    assert m["class_domain_recall"][7] == [0.5, None, None]
    # A class only one domain has has no gap to measure: 0 (the gap over one value).
    assert m["eo_gap_per_class"] == [0.5, 0.0, 0.0]
    # Predicted 0: 15 (5 from domain 7, share 1/3 vs 10/40 = 1/4) -> 1/12; predicted 1: 10, all
    # from domain 3 (1 vs 3/4) -> 1/4; predicted 2: 15, 5 from domain 7 -> 1/12.
    assert m["bias"] == pytest.approx((1 / 12 + 1 / 4 + 1 / 12) / 3)
    assert m["worst_cell_accuracy"] == 0.5


def test_one_domain_has_no_gaps_and_bad_shapes_are_refused():
    m = domain_metrics(torch.tensor([[[3, 1], [0, 4]]]))
    assert m["max_eo_gap"] == 0.0 and m["bias"] == 0.0
    with pytest.raises(ValueError, match=r"\[G, C, C\]"):
        domain_metrics(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="at least one sample"):
        domain_metrics(torch.zeros(1, 2, 2, dtype=torch.long))
