"""Recall@10 and NDCG@10 with binary gains, in both shapes (ranks and ranked lists)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from learner.metrics import (
    ndcg_at_k,
    ndcg_from_ranks,
    recall_at_k,
    recall_from_ranks,
    retrieval_metrics,
    target_ranks,
)


def test_target_ranks_counts_strictly_better_items() -> None:
    items = np.eye(4, dtype=np.float32)
    queries = np.array([[0.9, 0.5, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]], dtype=np.float32)
    assert target_ranks(queries, items, np.array([0, 1])).tolist() == [0, 2]


def test_rank_metrics_by_hand() -> None:
    ranks = np.array([0, 1, 9, 10, 50])
    assert recall_from_ranks(ranks, 10) == pytest.approx(3 / 5)
    expected = (1.0 + 1 / math.log2(3) + 1 / math.log2(11)) / 5
    assert ndcg_from_ranks(ranks, 10) == pytest.approx(expected)
    assert recall_from_ranks(np.array([]), 10) == 0.0 and ndcg_from_ranks(np.array([]), 10) == 0.0


def test_retrieval_metrics_perfect_and_reported_count() -> None:
    rng = np.random.default_rng(0)
    items = rng.standard_normal((30, 8)).astype(np.float32)
    out = retrieval_metrics(items[:5] * 10, items, np.arange(5))
    assert out["n"] == 5.0
    assert set(out) == {"recall@10", "ndcg@10", "n"}


def test_target_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="out of range"):
        target_ranks(np.zeros((1, 2)), np.zeros((3, 2)), np.array([3]))


def test_list_metrics_with_several_relevant_items() -> None:
    ranked = ["a", "x", "b", "y"]
    assert recall_at_k(ranked, {"a", "b", "c"}, 10) == pytest.approx(2 / 3)
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, {"a", "b", "c"}, 10) == pytest.approx((1 + 1 / math.log2(4)) / ideal)
    assert recall_at_k(ranked, set(), 10) == 0.0 and ndcg_at_k(ranked, set(), 10) == 0.0
    # a repeated item counts once, at its first position
    assert recall_at_k(["a", "a", "b"], {"a", "b"}, 2) == pytest.approx(1.0)


def test_list_and_rank_shapes_agree_for_one_target() -> None:
    for rank in (0, 3, 9, 10, 20):
        ranked = [f"o{i}" for i in range(rank)] + ["t"] + [f"p{i}" for i in range(20)]
        assert recall_at_k(ranked, {"t"}) == recall_from_ranks(np.array([rank]))
        assert ndcg_at_k(ranked, {"t"}) == pytest.approx(ndcg_from_ranks(np.array([rank])))


def test_learner_metrics_show_the_adapter_and_follow_its_active_version() -> None:
    from learner.metrics import LearnerMetrics

    m = LearnerMetrics()
    m.adapter(pairs_trained=64, steps=2, loss=None, active_version="base")
    text = m.render().decode()
    assert "freshrec_learner_adapter_pairs_trained 64.0" in text and "freshrec_learner_adapter_steps 2.0" in text
    assert 'freshrec_learner_adapter_info{version="base"} 1.0' in text
    m.adapter(pairs_trained=96, steps=3, loss=0.5, active_version="v000001-0123abcd")
    text = m.render().decode()
    assert "freshrec_learner_adapter_loss 0.5" in text
    assert 'version="base"' not in text and 'freshrec_learner_adapter_info{version="v000001-0123abcd"} 1.0' in text
