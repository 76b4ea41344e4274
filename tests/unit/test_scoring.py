"""The recommend/search blend as pure functions (ranking.scoring)."""

from __future__ import annotations

import doctest
import math
from dataclasses import dataclass

import numpy as np
import pytest

from ranking import scoring
from ranking.scoring import (
    BlendWeights,
    LogBlendWeights,
    blend,
    history_weights,
    log_blend,
    new_arrivals,
    normalise_by_max,
    search_vector,
    top_k,
    user_vector,
)
from serving.shopper_data import PopularityCache, PopularityView

DAY = 86_400.0


@dataclass(frozen=True)
class It:
    item_id: str
    kind: str
    ts: float


class DictSpace:
    """An ItemSpace over a dict of unit vectors (exact inner-product search)."""

    def __init__(self, vecs: dict[str, np.ndarray]) -> None:
        self.vecs = {k: (v / np.linalg.norm(v)).astype(np.float32) for k, v in vecs.items()}

    def vectors(self, ids):  # type: ignore[no-untyped-def]
        return {i: self.vecs[i] for i in ids if i in self.vecs}

    def nearest(self, vector, k, exclude=()):  # type: ignore[no-untyped-def]
        skip = set(exclude)
        scored = [(i, float(v @ vector)) for i, v in self.vecs.items() if i not in skip]
        return sorted(scored, key=lambda p: (-p[1], p[0]))[:k]

    def __contains__(self, item):  # type: ignore[no-untyped-def]
        return item in self.vecs


def test_module_example_runs() -> None:
    result = doctest.testmod(scoring, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_history_weights_kind_and_recency() -> None:
    hist = [It("a", "purchase", 100 * DAY), It("b", "view", 100 * DAY), It("c", "purchase", 70 * DAY), It("d", "cancel", 100 * DAY)]
    w = history_weights(hist, now_ts=100 * DAY, half_life_s=30 * DAY)
    assert w["a"] == pytest.approx(1.0)
    assert w["b"] == pytest.approx(0.25)
    assert w["c"] == pytest.approx(0.5)  # one half-life old
    assert "d" not in w  # a cancel says nothing about taste


def test_history_weights_sum_repeats_and_ignore_future_skew() -> None:
    hist = [It("a", "click", 10.0), It("a", "click", 10.0), It("b", "cart", 20.0)]
    w = history_weights(hist, now_ts=10.0, half_life_s=DAY)  # b is "in the future": age 0
    assert w == {"a": pytest.approx(1.0), "b": pytest.approx(0.75)}


def test_user_vector_is_weighted_unit_mean_of_known_items() -> None:
    vecs = {"a": np.array([1, 0, 0], np.float32), "b": np.array([0, 1, 0], np.float32)}
    u = user_vector({"a": 3.0, "b": 1.0, "unknown": 5.0}, vecs)
    assert u is not None
    assert np.linalg.norm(u) == pytest.approx(1.0)
    assert u[0] == pytest.approx(3 / np.sqrt(10))
    assert user_vector({"x": 1.0}, vecs) is None
    assert user_vector({}, vecs) is None


def test_user_vector_none_when_vectors_cancel() -> None:
    vecs = {"a": np.array([1, 0], np.float32), "b": np.array([-1, 0], np.float32)}
    assert user_vector({"a": 1.0, "b": 1.0}, vecs) is None


def test_normalise_by_max() -> None:
    assert normalise_by_max({"a": 2.0, "b": 1.0, "c": 0.0, "d": -1.0}) == {"a": 1.0, "b": 0.5}
    assert normalise_by_max({"a": 0.0}) == {}
    assert normalise_by_max({}) == {}


def test_blend_formula() -> None:
    w = BlendWeights(repeat=1.0, similarity=0.5, popularity=0.2)
    s = blend({"a": 10.0, "b": 5.0}, {"b": 0.8, "c": -0.3}, {"a": 0.5, "c": 1.0}, w)
    assert s["a"] == pytest.approx(1.0 + 0 + 0.2 * 0.5)
    assert s["b"] == pytest.approx(0.5 + 0.5 * 0.8)
    assert s["c"] == pytest.approx(0.2 * 1.0)  # negative similarity counts as 0, popularity still counts
    assert set(s) == {"a", "b", "c"}  # default candidates: repeat and similarity keys
    s2 = blend({}, {}, {"c": 1.0}, w, candidates=["c"])
    assert s2 == {"c": pytest.approx(0.2)}


def test_blend_is_scale_free_in_repeat() -> None:
    w = BlendWeights()
    a = blend({"x": 1.0, "y": 3.0}, {"x": 0.2}, {}, w)
    b = blend({"x": 100.0, "y": 300.0}, {"x": 0.2}, {}, w)
    assert a == pytest.approx(b)


def test_repeat_purchase_dominates_with_default_weights() -> None:
    """The strongest signal on this data: a shopper's own top repeat item outranks any
    merely similar or popular item under the default weights."""
    w = BlendWeights()
    s = blend({"mine": 2.0}, {"similar": 1.0}, {"popular": 1.0, "similar": 1.0}, w, candidates=["mine", "similar", "popular"])
    assert top_k(s, 1)[0][0] == "mine"


def test_top_k_ties_by_id_and_exclude() -> None:
    assert top_k({"b": 1.0, "a": 1.0, "c": 2.0}, 2) == [("c", 2.0), ("a", 1.0)]
    assert top_k({"b": 1.0, "a": 1.0, "c": 2.0}, 5, exclude={"c"}) == [("a", 1.0), ("b", 1.0)]
    assert top_k({}, 3) == []


def test_search_vector_blend() -> None:
    q = np.array([1, 0], np.float32)
    u = np.array([0, 1], np.float32)
    assert np.array_equal(search_vector(q, None, 0.5), q)
    assert np.array_equal(search_vector(q, u, 0.0), q)
    v = search_vector(q, u, 0.25)
    assert np.linalg.norm(v) == pytest.approx(1.0)
    assert v[0] > v[1] > 0
    assert np.array_equal(search_vector(q, -q, 0.5), q)  # degenerate: fall back to the query


def _space() -> DictSpace:
    return DictSpace(
        {
            "mug_red": np.array([1.0, 0.1, 0.0]),
            "mug_blue": np.array([0.95, 0.2, 0.0]),
            "cup": np.array([0.8, 0.3, 0.1]),
            "lamp": np.array([0.0, 0.1, 1.0]),
            "candle": np.array([0.1, 0.2, 0.9]),
            "bestseller": np.array([0.0, 1.0, 0.0]),
        }
    )


def test_recommend_personal_blend() -> None:
    space = _space()
    hist = [It("mug_red", "purchase", 100.0), It("lamp", "view", 10.0)]
    ranked = scoring.recommend(
        hist,
        {"mug_red": 3.0},
        space,
        {"bestseller": 1.0, "candle": 0.2},
        ["bestseller", "candle"],
        BlendWeights(1.0, 0.5, 0.1),
        k=4,
        now_ts=100.0,
        half_life_s=DAY,
    )
    ids = [i for i, _ in ranked]
    assert ids[0] == "mug_red"  # the repeat purchase
    assert ids[1] in {"mug_blue", "cup"}  # then what is like the user's history
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True)


def test_recommend_cold_user_gets_popularity() -> None:
    ranked = scoring.recommend(
        [], {}, _space(), {"bestseller": 1.0, "candle": 0.5}, ["bestseller", "candle"], BlendWeights(), k=2, now_ts=0.0, half_life_s=DAY
    )
    assert [i for i, _ in ranked] == ["bestseller", "candle"]


def test_recommend_never_returns_items_missing_from_the_space() -> None:
    """A deleted item stays in Redis history and popularity; it must not come back."""
    space = _space()
    hist = [It("deleted", "purchase", 5.0), It("cup", "purchase", 5.0)]
    ranked = scoring.recommend(
        hist, {"deleted": 9.0, "cup": 1.0}, space, {"deleted": 1.0}, ["deleted"], BlendWeights(), k=10, now_ts=5.0, half_life_s=DAY
    )
    ids = [i for i, _ in ranked]
    assert "deleted" not in ids and ids[0] == "cup"


def test_popular_filters_by_presence() -> None:
    out = scoring.popular({"a": 1.0, "b": 0.5, "c": 0.2}, ["a", "b", "c"], 2, {"b", "c"})
    assert out == [("b", 0.5), ("c", 0.2)]


def test_weights_from_settings() -> None:
    from freshrec.settings import Settings

    s = Settings(blend_repeat=2.0, blend_similarity=0.1, blend_popularity=0.0)
    assert BlendWeights.from_settings(s) == BlendWeights(2.0, 0.1, 0.0)


def test_log_blend_hand_computed() -> None:
    w = LogBlendWeights(repeat=1.0)  # similarity 2, popularity 0.8, new 0.5; floors 0.005 and 0.001
    s = log_blend(
        {"a": 4.0, "b": 1.0},  # normalised: a 1, b 0.25
        {"b": 0.5, "c": -0.2, "d": 0.3},
        {"a": 0.1, "b": 1.0, "d": 0.2},
        {"d"},
        w,
    )
    assert s["a"] == pytest.approx(math.log(1.005) + 0.8 * math.log(0.101))  # -1.829
    assert s["b"] == pytest.approx(math.log(0.255) + 0.8 * math.log(1.001) + 2 * 0.5)  # -0.366
    assert s["c"] == pytest.approx(math.log(0.005) + 0.8 * math.log(0.001))  # -10.82: negative cosine counts 0
    assert s["d"] == pytest.approx(math.log(0.005) + 0.8 * math.log(0.201) + 2 * 0.3 + 0.5)  # -5.48
    # b, bought less than a but popular now and like the shopper's taste, leads; the new
    # arrival d beats c, which is neither new, popular nor similar.
    assert [i for i, _ in top_k(s, 4)] == ["b", "a", "d", "c"]
    assert set(s) == {"a", "b", "c", "d"}  # default candidates: repeat, similarity and new keys


def test_log_blend_repeat_leads_when_popularity_and_similarity_tie() -> None:
    """Bought twice beats bought once beats never bought, all else equal."""
    s = log_blend({"twice": 2.0, "once": 1.0}, {"twice": 0.5, "once": 0.5, "never": 0.5}, {}, set(), LogBlendWeights())
    assert [i for i, _ in top_k(s, 3)] == ["twice", "once", "never"]


def test_new_arrivals_window_in_event_time() -> None:
    first = {"old": 0.0, "edge": 70 * DAY, "new": 99 * DAY, "future": 101 * DAY}
    assert new_arrivals(first, 100 * DAY, 30 * DAY) == {"edge", "new", "future"}
    assert new_arrivals({}, 100 * DAY, 30 * DAY) == frozenset()


def test_recommend_log_blend_adds_new_arrivals_to_the_pool() -> None:
    """A new line far from the shopper's taste and not yet popular still gets a chance."""
    space = _space()
    hist = [It("mug_red", "purchase", 100.0)]
    args = (hist, {"mug_red": 3.0}, space, {"bestseller": 1.0}, ["bestseller"])
    kw = {"k": 10, "now_ts": 100.0, "half_life_s": DAY, "candidates": 2}
    ranked = dict(scoring.recommend(*args, LogBlendWeights(repeat=1.0), new_items={"lamp", "gone"}, **kw))  # type: ignore[arg-type]
    assert "lamp" in ranked and "gone" not in ranked  # new and present; a new id missing from the index never comes back
    assert "candle" not in ranked  # neither near (2 neighbours), popular, bought nor new
    # the repeat purchase, the bestseller, the nearest neighbour, then the new arrival
    assert list(ranked) == ["mug_red", "bestseller", "mug_blue", "lamp"]
    cos = float(space.vecs["lamp"] @ space.vecs["mug_red"])  # the user vector is mug_red's
    assert ranked["lamp"] == pytest.approx(math.log(0.005) + 0.8 * math.log(0.001) + 2 * cos + 0.5)
    linear = dict(scoring.recommend(*args, BlendWeights(), new_items={"lamp"}, **kw))  # type: ignore[arg-type]
    assert "lamp" not in linear  # the linear blend has no new-arrival term and no such candidates


def test_weights_from_settings_follow_blend_mode() -> None:
    from freshrec.settings import Settings

    s = Settings(blend_log_repeat=1.5, blend_log_similarity=1.0, blend_log_popularity=0.4, blend_log_new=0.2)
    assert scoring.weights_from_settings(s) == LogBlendWeights(1.5, 1.0, 0.4, 0.2)
    assert Settings().blend_mode == "log" and scoring.weights_from_settings(Settings()) == LogBlendWeights()
    assert isinstance(scoring.weights_from_settings(Settings(blend_mode="linear")), BlendWeights)
    with pytest.raises(ValueError):
        Settings(blend_mode="cubic")


@dataclass(frozen=True)
class _Reading:
    scores: dict[str, float]
    first_seen: dict[str, float]
    newest_ts: float


def test_popularity_cache_keeps_new_arrivals_as_of_the_newest_event() -> None:
    reading = _Reading({"a": 4.0, "b": 2.0}, {"a": 0.0, "b": 80 * DAY, "c": 95 * DAY}, 100 * DAY)
    cache = PopularityCache(lambda: reading, every_s=60.0, new_s=30 * DAY)
    assert cache.refresh()
    view = cache.view
    assert view.scores == {"a": 1.0, "b": 0.5} and view.ranked == ("a", "b")
    assert view.new_items == {"b", "c"}  # c: seen, never bought yet
    assert PopularityView.of({"a": 1.0}).new_items == frozenset()


def test_popularity_cache_reads_the_hashes_only_when_the_flow_applied_something() -> None:
    reads, offsets, seen = [], {"events:0": 10, "events:1": 4}, []
    reading = _Reading({"a": 4.0, "b": 2.0}, {}, 100 * DAY)

    def read() -> _Reading:
        reads.append(1)
        return reading

    cache = PopularityCache(read, every_s=60.0, read_applied=lambda: dict(offsets))
    cache.listeners.append(seen.append)
    assert cache.refresh() and len(reads) == 1 and cache.view.applied_partitions == 2
    first = cache.view
    assert cache.refresh() and cache.refresh()  # idle: one small read each, no hashes, no new view
    assert len(reads) == 1 and cache.view is first and seen == [first] and cache.unchanged == 2
    offsets["events:1"] = 5  # the flow applied a batch
    reading = _Reading({"a": 4.0, "b": 8.0}, {}, 101 * DAY)
    assert cache.refresh() and len(reads) == 2 and cache.view is not first and cache.view.ranked == ("b", "a")
    offsets.clear()  # an emptied Redis is a change too
    assert cache.refresh() and len(reads) == 3 and cache.view.applied_partitions == 0


def _cosines(v: np.ndarray, n: int = 20_000, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(v), n), rng.integers(0, len(v), n)
    keep = i != j
    return (v[i[keep]] * v[j[keep]]).sum(axis=1)


def _unit(m: np.ndarray) -> np.ndarray:
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)


def test_similarity_scale_maps_a_collapsed_space_onto_the_reference_spread() -> None:
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(600, 16)))
    collapsed = _unit(base + 2.5 * np.ones(16, dtype=np.float32))  # everything in one cone
    target_mean, target_std = float(_cosines(base).mean()), float(_cosines(base).std())
    assert _cosines(collapsed).mean() > target_mean + 0.5  # the trained-adapter failure, in miniature
    s = scoring.fit_similarity_scale(collapsed, target_mean, target_std)
    mapped = s.shift + s.scale * _cosines(collapsed)
    assert mapped.mean() == pytest.approx(target_mean, abs=0.02)
    assert mapped.std() == pytest.approx(target_std, rel=0.05)
    assert s.scale > 0  # increasing: the nearest items stay the nearest
    assert scoring.fit_similarity_scale(collapsed, target_mean, target_std) == s  # same vectors, same map
    own = scoring.fit_similarity_scale(base, target_mean, target_std)  # a space already at the reference
    assert own.scale == pytest.approx(1.0, abs=0.05) and own.shift == pytest.approx(0.0, abs=0.02)


def test_similarity_scale_of_a_degenerate_space_is_the_identity() -> None:
    one = _unit(np.ones((1, 4)))
    same = _unit(np.ones((5, 4)))
    assert scoring.fit_similarity_scale(one, 0.2, 0.1) == scoring.IDENTITY_SCALE
    assert scoring.fit_similarity_scale(same, 0.2, 0.1) == scoring.IDENTITY_SCALE
    from freshrec.settings import Settings

    assert scoring.scale_from_settings(same, Settings(blend_calibrate_similarity=False)) == scoring.IDENTITY_SCALE


def test_recommend_blends_the_scaled_cosine() -> None:
    space = _space()
    hist = [It("mug_red", "purchase", 100.0)]
    kw = {"k": 3, "now_ts": 100.0, "half_life_s": DAY, "candidates": 3}
    w = LogBlendWeights(repeat=1.0, new=0.0)
    args = (hist, {"mug_red": 3.0}, space, {"bestseller": 1.0, "mug_blue": 1.0}, ["bestseller"])
    plain = dict(scoring.recommend(*args, w, **kw))  # type: ignore[arg-type]
    halved = dict(scoring.recommend(*args, w, similarity_scale=scoring.SimilarityScale(-0.1, 0.5), **kw))  # type: ignore[arg-type]
    cos = float(space.vecs["mug_blue"] @ space.vecs["mug_red"])
    assert plain["mug_blue"] == pytest.approx(math.log(0.005) + 0.8 * math.log(1.001) + 2 * cos)
    assert halved["mug_blue"] == pytest.approx(math.log(0.005) + 0.8 * math.log(1.001) + 2 * (0.5 * cos - 0.1))
