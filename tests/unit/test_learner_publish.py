"""The publish rule: not worse than active by more than the margin, with a reason either way."""

from __future__ import annotations

import pytest

from learner.publish import decide_publish


def _decide(cand: float, act: float, margin: float = 0.0, n: int = 100, trained: int = 32):
    return decide_publish(
        {"recall@10": cand, "ndcg@10": cand / 2},
        {"recall@10": act, "ndcg@10": act / 2},
        margin,
        evaluated_pairs=n,
        min_pairs=16,
        trained_since_publish=trained,
        active_version="v000001-abcdef01",
    )


def test_better_or_equal_candidate_is_published() -> None:
    assert _decide(0.30, 0.25).publish
    d = _decide(0.25, 0.25)
    assert d.publish and d.reason.startswith("publish:") and "0.2500 vs 0.2500" in d.reason


def test_worse_within_margin_is_published() -> None:
    assert _decide(0.24, 0.25, margin=0.02).publish


def test_worse_beyond_margin_is_held_with_the_figures() -> None:
    d = _decide(0.20, 0.25, margin=0.02)
    assert not d.publish
    assert "worse by 0.0500" in d.reason and "margin 0.0200" in d.reason and "v000001-abcdef01" in d.reason


def test_too_few_pairs_is_held() -> None:
    d = _decide(0.9, 0.1, n=5)
    assert not d.publish and "only 5 window pairs" in d.reason


def test_nothing_trained_since_publication_is_held() -> None:
    d = _decide(0.9, 0.1, trained=0)
    assert not d.publish and "nothing trained since" in d.reason


def test_missing_metric_and_negative_margin() -> None:
    assert not decide_publish({}, {"recall@10": 0.1}, 0.0, 100, 1, 1, "base").publish
    with pytest.raises(ValueError):
        _decide(0.3, 0.2, margin=-0.1)
