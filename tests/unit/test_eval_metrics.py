"""Recall@10 / NDCG@10 and the ranking rule, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.metrics import SliceStats, ndcg_at_k, recall_at_k
from evaluation.protocol import timestamp_groups, top_k


def test_recall_divides_by_min_of_k_and_basket() -> None:
    assert recall_at_k([1, 2, 3], {2, 9}) == 0.5
    # 12-item basket, 10 of its items in the top 10: a perfect 1.0, not 10/12
    basket = set(range(12))
    assert recall_at_k(list(range(10)), basket) == 1.0
    assert recall_at_k([20, 21], {20}) == 1.0


def test_ndcg_binary_gains_hand_computed() -> None:
    # hits at ranks 2 and 4 (1-based); basket of 3 -> ideal has 3 hits on top
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k([7, 1, 8, 2, 9], {1, 2, 3}) == pytest.approx(dcg / ideal)
    assert ndcg_at_k([1], {1}) == pytest.approx(1.0)


def test_unseen_basket_items_still_count() -> None:
    # item 5 could not be ranked (never seen) but stays in the denominator
    assert recall_at_k([1, 2], {1, 5}) == 0.5


def test_empty_basket_is_an_error() -> None:
    with pytest.raises(ValueError):
        recall_at_k([1], set())


def test_slice_stats_average_over_baskets() -> None:
    s = SliceStats()
    s.add(1.0, 0.5)
    s.add(0.0, 0.0)
    assert s.as_dict() == {"recall@10": 0.5, "ndcg@10": 0.25, "baskets": 2}


def test_top_k_masks_and_breaks_ties_by_index() -> None:
    scores = np.array([0.5, 0.9, 0.5, 0.9, 0.1])
    mask = np.array([True, True, True, False, True])
    assert top_k(scores, mask, 3) == [1, 0, 2]
    assert top_k(scores, np.zeros(5, dtype=bool), 3) == []
    # many equal scores: still the lowest indices, in order
    assert top_k(np.zeros(50), np.ones(50, dtype=bool), 10) == list(range(10))


def test_timestamp_groups() -> None:
    ts = np.array([1.0, 1.0, 2.0, 3.0, 3.0, 3.0])
    assert timestamp_groups(ts).tolist() == [0, 2, 3, 6]
