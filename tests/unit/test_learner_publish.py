"""The publish rule: a paired gain beyond the window's noise, never a tie; with a reason either way.

Also the per-example metrics it is fed (``learner.evaluate.rank_gains`` per window pair,
``basket_gains`` per held-back basket) and the ranker's judgement and publication.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from freshrec.settings import Settings
from learner.evaluate import basket_gains, metrics_from_ranks, rank_gains
from learner.gate import judge_ranker, publish_ranker
from learner.metrics import ndcg_at_k, recall_at_k
from learner.publish import decide_publish, paired_comparison


def _decide(cand: list[float], act: list[float], margin: float = 0.0, z: float = 1.0, trained: int = 32, min_n: int = 4):
    return decide_publish(
        cand, act, z=z, min_examples=min_n, trained_since_publish=trained, active_version="v000001-abcdef01", margin=margin
    )


def test_a_tie_is_held() -> None:
    """The old rule published this (margin 0, equal recall) and so rebuilt the index for nothing."""
    d = _decide([1, 0, 1, 0, 1, 0, 0, 0], [1, 0, 1, 0, 1, 0, 0, 0])
    assert not d.publish and "no gain (a tie)" in d.reason
    # Equal means from different pairs are a tie too: +1 on one pair, -1 on another.
    d = _decide([1, 0, 1, 0, 1, 0, 0, 1], [1, 0, 1, 0, 0, 0, 1, 1])
    assert not d.publish and d.comparison is not None and d.comparison.mean_gain == 0


def test_a_gain_within_the_noise_is_held_and_beyond_it_published() -> None:
    act = [0.0] * 16
    one_better = [1.0] + [0.0] * 15  # mean gain 1/16, s.e. 1/16: t = 1, not above z = 1
    d = _decide(one_better, act)
    assert not d.publish and "within 1 s.e." in d.reason
    three_better = [1.0] * 3 + [0.0] * 13  # t = 1.8
    d = _decide(three_better, act)
    assert d.publish and d.reason.startswith("publish:") and "recall@10 0.1875 vs 0.0000" in d.reason
    assert not _decide(three_better, act, z=2.0).publish  # z is the setting that decides
    assert _decide(one_better, act, z=0.5).publish


def test_a_uniform_gain_has_no_spread_and_is_published() -> None:
    d = _decide([0.5] * 8, [0.25] * 8)
    assert d.publish and d.comparison is not None and d.comparison.std_err == 0 and math.isinf(d.comparison.t())


def test_worse_is_held_and_the_margin_is_an_allowance() -> None:
    d = _decide([0, 0, 1, 0], [1, 1, 1, 0])
    assert not d.publish and d.reason.startswith("hold: worse;") and "v000001-abcdef01" in d.reason
    assert _decide([1, 0, 1, 0, 1, 0, 0, 0], [1, 0, 1, 0, 1, 0, 0, 0], margin=1.0).publish  # plumbing tests' setting
    d = _decide([0.0] * 8, [1.0] * 8, margin=0.5)
    assert not d.publish and "worse by more than the margin 0.5000" in d.reason


def test_too_few_examples_and_nothing_trained_are_held() -> None:
    d = _decide([1, 1], [0, 0])
    assert not d.publish and "only 2 window pairs could be evaluated, need 4" in d.reason
    d = _decide([1] * 8, [0] * 8, trained=0)
    assert not d.publish and "nothing trained since" in d.reason


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="margin"):
        _decide([1] * 8, [0] * 8, margin=-0.1)
    with pytest.raises(ValueError, match="z must be"):
        _decide([1] * 8, [0] * 8, z=-1)
    with pytest.raises(ValueError, match="one value per example"):
        paired_comparison([1, 2], [1])


def test_paired_comparison_by_hand() -> None:
    cmp = paired_comparison([0.5, 1.0, 0.0], [0.0, 0.5, 0.0])  # differences .5, .5, 0
    assert cmp.n == 3 and cmp.mean_gain == pytest.approx(1 / 3)
    assert cmp.std_err == pytest.approx(np.std([0.5, 0.5, 0.0], ddof=1) / math.sqrt(3))
    assert (cmp.candidate_mean, cmp.active_mean) == (pytest.approx(0.5), pytest.approx(1 / 6))


def test_rank_gains_average_to_the_window_metrics() -> None:
    ranks = np.array([0, 3, 9, 10, 50, -1])  # -1: target not in the catalog
    figures = metrics_from_ranks(ranks)
    known = ranks[ranks >= 0]
    assert rank_gains(known, "recall@10").tolist() == [1, 1, 1, 0, 0]
    assert rank_gains(known, "recall@10").mean() == pytest.approx(figures["recall@10"])
    assert rank_gains(known, "ndcg@10").mean() == pytest.approx(figures["ndcg@10"])
    assert (figures["n"], figures["unknown"]) == (5.0, 1.0)
    with pytest.raises(ValueError, match="recall@K or ndcg@K"):
        rank_gains(known, "map@10")


def test_basket_gains_match_the_list_metrics() -> None:
    """Two baskets of 12 candidates; the per-basket values equal learner.metrics' recall_at_k and ndcg_at_k."""
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(24)
    labels = np.zeros(24, dtype=int)
    labels[[1, 5, 11, 14, 20]] = 1
    groups, relevant = [12, 12], [4, 2]  # the first basket bought one item that was no candidate
    for metric, reference in (("recall@10", recall_at_k), ("ndcg@10", ndcg_at_k)):
        got = basket_gains(scores, labels, groups, metric, relevant)
        for g, (a, b) in enumerate(((0, 12), (12, 24))):
            ranked = [str(i) for i in a + np.argsort(-scores[a:b], kind="stable")]
            bought = {str(i) for i in range(a, b) if labels[i]} | ({"not-a-candidate"} if g == 0 else set())
            assert got[g] == pytest.approx(reference(ranked, bought, 10))
    assert basket_gains(scores, labels, groups, "recall@10")[0] == pytest.approx(
        recall_at_k([str(i) for i in np.argsort(-scores[:12], kind="stable")], {"1", "5", "11"}, 10)
    )
    with pytest.raises(ValueError):
        basket_gains(scores, labels, [12, 11], "recall@10")


def test_basket_gains_recall_is_the_protocols_on_a_basket_larger_than_k() -> None:
    """The gate judges rankers by ``freshrec eval``'s Recall@10: hits over min(10, |basket|).

    A basket of 14 bought items whose 10 best-scored candidates are all bought scores 1.0,
    as ``evaluation.metrics.recall_at_k`` scores it (dividing by 14 would give 0.71 and
    weigh large baskets less in the gate than in the evaluation).
    """
    from evaluation.metrics import recall_at_k as protocol_recall

    scores = -np.arange(20, dtype=np.float64)  # candidate r ranks r-th
    labels = np.zeros(20, dtype=int)
    labels[:12] = 1  # 12 bought candidates (the 10 best among them) ...
    got = basket_gains(scores, labels, [20], "recall@10", relevant=[14])  # ... of 14 bought items
    assert got[0] == pytest.approx(1.0)
    assert got[0] == pytest.approx(protocol_recall(list(range(10)), set(range(12)) | {98, 99}))
    labels[:] = 0
    labels[[0, 15]] = 1  # 2 bought candidates, one in the top 10, of 3 bought items
    assert basket_gains(scores, labels, [20], "recall@10", relevant=[3])[0] == pytest.approx(1 / 3)


def _baskets(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``n`` baskets of 20 candidates with one bought item each, at row 0 of the basket."""
    labels = np.zeros(n * 20, dtype=int)
    labels[::20] = 1
    return np.random.default_rng(seed).standard_normal(n * 20), labels, [20] * n


def test_judge_ranker_publishes_a_better_ranker_and_holds_a_copy(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, ranker_min_gate_baskets=30)
    noise, labels, groups = _baskets(60)
    oracle = noise + 10 * labels  # ranks every bought item first
    better = judge_ranker(oracle, noise, labels, groups, settings, trained_since_publish=100, active_version="blend")
    assert better.decision.publish and better.unit == "baskets"
    assert better.candidate["recall@10"] == 1.0 and better.candidate["n"] == 60.0
    tie = judge_ranker(noise, noise, labels, groups, settings, trained_since_publish=100, active_version="blend")
    assert not tie.decision.publish and "a tie" in tie.decision.reason
    few = judge_ranker(oracle[:400], noise[:400], labels[:400], groups[:20], settings, 100, "blend")
    assert not few.decision.publish and "only 20 baskets" in few.decision.reason


def test_publish_ranker_writes_activates_and_records_the_figures(tmp_path: Path) -> None:
    from models.ranker import MLPRanker
    from models.ranker_registry import RankerRegistry

    settings = Settings(state_dir=tmp_path, ranker_min_gate_baskets=30)
    noise, labels, groups = _baskets(60)
    judgement = judge_ranker(noise + 10 * labels, noise, labels, groups, settings, 100, "blend")
    model = MLPRanker({"mean": np.zeros(2), "std": np.ones(2), "w0": np.ones(2), "b0": np.zeros(())}, ("a", "b"), "s1")
    registry = RankerRegistry(tmp_path / "rankers")
    loaded = publish_ranker(registry, model, None, judgement, examples_seen=60)
    assert registry.active() == loaded.version and loaded.manifest.parent is None
    metrics = loaded.manifest.metrics
    assert metrics["recall@10"] == 1.0 and metrics["eval_baskets"] == 60 and metrics["gate_gain"] > 0
    held = judge_ranker(noise, noise, labels, groups, settings, 100, loaded.version)
    with pytest.raises(ValueError, match="the gate held"):
        publish_ranker(registry, model, loaded.version, held, 60)
    assert registry.versions() == [loaded.version]


class _NoTextEncoder:
    """Every window pair below has its context in the matrix, so nothing is encoded as text."""

    version = "test"

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        raise AssertionError(f"asked to encode {texts}")


def test_judge_candidate_holds_an_identical_adapter_and_publishes_a_better_one(tmp_path: Path) -> None:
    """The adapter gate end to end: an unchanged candidate was published before (a tie), now it is held."""
    from freshrec.contracts import TrainPair
    from learner.evaluate import ActiveEncoder, ItemMatrix, TargetPopularity
    from learner.gate import judge_candidate

    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(80)]
    vecs = rng.standard_normal((80, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = {i: n for n, i in enumerate(ids)}
    pairs = [TrainPair(pair_id=str(k), user_id=f"u{k}", context_items=[ids[k]], context_text="x", context_texts=["x"],
                       target_item=ids[40 + k], target_text="y") for k in range(40)]
    better = vecs.copy()
    better[40:] = vecs[:40] + 0.01  # each target right beside its context
    better /= np.linalg.norm(better, axis=1, keepdims=True)
    active_matrix = ItemMatrix("v000001-abcdef01", "fp", ids, vecs, index)
    settings = Settings(state_dir=tmp_path)
    args = dict(active=ActiveEncoder("v000001-abcdef01", _NoTextEncoder()), active_matrix=active_matrix, window=pairs,
                popularity=TargetPopularity.days(7.0), settings=settings, trained_since_publish=64)
    same = judge_candidate(_NoTextEncoder(), active_matrix, **args)
    assert not same.decision.publish and "a tie" in same.decision.reason
    cand = judge_candidate(_NoTextEncoder(), ItemMatrix("c", "fp", ids, better, index), **args)
    assert cand.decision.publish and cand.candidate["recall@10"] == 1.0 > cand.active["recall@10"]
    assert cand.candidate["n"] == 40 and {"eval_pairs", "active_recall@10", "gate_gain"} <= set(cand.manifest_metrics())
