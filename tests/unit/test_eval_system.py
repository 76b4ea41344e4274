"""The system replay (streams state + serving's ranking functions) on a tiny log with hand-made vectors.

The end-to-end check against a real serving app is tests/integration/test_eval_serving_parity.py;
these pin the pieces that make it hold: serving's order survives the protocol's tie rule,
the cold rule and the popularity view are serving's, and the item space is built as
serving builds its pair.
"""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.data import build_log
from evaluation.item_space import VersionSpace, pair_scale
from evaluation.methods import SystemMethod, SystemReplay, encode_catalog, rank_scores
from evaluation.protocol import evaluate, top_k
from freshrec.settings import Settings
from ranking.scoring import BlendWeights, LogBlendWeights, scale_from_settings

DAY = 86400.0


def _log():  # type: ignore[no-untyped-def]
    rows = [
        ("u", "a", 0.0, "purchase"), ("u", "b", 0.0, "purchase"), ("u", "a", DAY, "purchase"),
        ("v", "c", 2 * DAY, "purchase"), ("v", "c", 2 * DAY, "purchase"), ("u", "b", 3 * DAY, "cancel"),
        ("u", "c", 10 * DAY, "purchase"), ("w", "d", 10 * DAY, "purchase"),
    ]
    events = [{"event_id": f"t:{k}", "user_id": u, "item_id": i, "ts": t, "kind": kd} for k, (u, i, t, kd) in enumerate(rows)]
    return build_log("t", events, [{"item_id": i, "title": f"t{i}"} for i in "abcd"])


def test_system_method_uses_stream_state_and_serving_blend() -> None:
    log = _log()
    vecs = np.eye(4, dtype=np.float32)
    settings = Settings(popularity_half_life_days=14.0)
    replay = SystemReplay(log, settings)
    m = SystemMethod("frozen", replay, vecs, BlendWeights(repeat=1.0, similarity=0.0, popularity=0.1), 200)
    res = evaluate(log, 10 * DAY, [m])
    u = replay.states[log.user_ids.index("u")]
    # the cancel took b's single purchase back out of u's frequency, as the stream does
    assert "b" not in u.freq and "a" in u.freq
    assert replay.popularity.first_seen["c"] == 2 * DAY
    # u's basket {c}: a (repeat) first, then c (popular) -> hit at rank 2
    assert res["frozen"].as_dict()["all"]["recall@10"] == pytest.approx(0.5)  # w's basket {d}: never seen -> 0


def test_scores_before_basket_ingested() -> None:
    log = _log()
    replay = SystemReplay(log, Settings())
    m = SystemMethod("frozen", replay, np.eye(4, dtype=np.float32), BlendWeights(), 200)
    k = int(np.searchsorted(log.ts, 10 * DAY))
    evaluate(log.window(10 * DAY), 10 * DAY, [m])
    s = m.scores(log.user_ids.index("u"), 10 * DAY)
    seen = np.zeros(log.n_items, dtype=bool)
    seen[log.item[:k]] = True
    assert top_k(s, seen, 1) == [log.item_ids.index("a")]


def test_encode_catalog_keeps_item_order() -> None:
    titles = ["ccc", "a", "bb"]
    out = encode_catalog(lambda texts: np.array([[len(t), 0.0] for t in texts]), titles)
    assert out[:, 0].tolist() == [3.0, 1.0, 2.0]


def test_leaving_window_keeps_the_newest_pairs_back_as_the_learner_does() -> None:
    from evaluation.methods import leaving_window
    from freshrec.contracts import TrainPair
    from learner.intake import HoldoutWindow

    pairs = [TrainPair(pair_id=f"p{i}", user_id="u", context_text="c", target_item=f"i{i}", target_text="t") for i in range(5)]
    window = HoldoutWindow(3)
    assert [p.pair_id for p in leaving_window(window, pairs)] == ["p0", "p1"]
    assert [p.pair_id for p in window.pairs()] == ["p2", "p3", "p4"]
    short = HoldoutWindow(3)
    assert leaving_window(short, pairs[:2]) == []
    assert short.pairs() == pairs[:2]


def test_rank_scores_hand_the_protocol_servings_order_ties_included() -> None:
    """Serving breaks score ties by item id; the protocol by item index. Ranks, not raw scores, survive that."""
    index = {"b": 0, "a": 1, "c": 2, "d": 3}  # log order is not id order
    served = [("a", 0.5), ("b", 0.5), ("c", 0.1)]  # a before b: a tie broken by id
    s = rank_scores(served, index, 4)
    assert np.isneginf(s[3])  # outside serving's pool
    ranked = top_k(s, np.ones(4, dtype=bool), 3)
    assert ranked == [1, 0, 2]
    raw = np.array([0.5, 0.5, 0.1, -np.inf])  # what returning serving's raw scores would give
    assert top_k(raw, np.ones(4, dtype=bool), 3) == [0, 1, 2]


def test_scores_are_recommends_ranking_and_cold_shoppers_get_servings_popularity() -> None:
    from ranking import scoring

    log = _log()
    settings = Settings()
    replay = SystemReplay(log, settings)
    weights = LogBlendWeights()
    m = SystemMethod("frozen", replay, np.eye(4, dtype=np.float32), weights, 200)
    replay.observe(log, 0, len(log))
    u = log.user_ids.index("u")
    state = replay.states[u]
    view = replay.popularity_view()
    direct = scoring.recommend(
        state.history, state.basket_scores(settings.repeat_basket_decay), m.space.space, view.scores, view.ranked,
        weights, 10, now_ts=state.last_ts, half_life_s=settings.user_vector_half_life_days * DAY,
        candidates=200, new_items=view.new_items, similarity_scale=m.similarity_scale,
    )
    assert m.ranking(u, 10) == direct
    ranked = top_k(m.scores(u, 11 * DAY), np.ones(log.n_items, dtype=bool), 10)
    assert [log.item_ids[k] for k in ranked] == [i for i, _ in direct]
    # a shopper the replay has never seen: serving's popular(), best first, ties by id
    cold = m.ranking(-1, 10)
    assert cold == scoring.popular(view.scores, view.ranked, 10, m.space.space)
    assert [i for i, _ in cold] == sorted(view.scores, key=lambda i: (-view.scores[i], i))


def test_popularity_view_is_servings_as_of_the_newest_event() -> None:
    """New arrivals are judged against the newest event applied (serving's "now"), not a later clock."""
    log = _log()
    replay = SystemReplay(log, Settings(blend_new_days=5.0))
    replay.observe(log, 0, int(np.searchsorted(log.ts, 10 * DAY)))  # up to day 3
    view = replay.popularity_view()
    assert view.new_items == {"a", "b", "c"}  # all first seen within 5 days of day 3
    raw = replay.popularity.scores()
    assert set(view.ranked) == {i for i, v in raw.items() if v > 0} and "b" not in view.ranked  # b's purchase was returned
    replay.observe(log, int(np.searchsorted(log.ts, 10 * DAY)), len(log))  # day 10
    assert replay.popularity_view().new_items == {"d"}  # c, first seen on day 2, is 8 days old on day 10


def test_version_space_keeps_log_rows_and_fits_servings_scale() -> None:
    from serving.pair import ActivePair
    from serving.swap import PairBuilder

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((30, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"i{(7 * k) % 30:02d}" for k in range(30)]  # not in id order
    settings = Settings()
    space = VersionSpace.from_vectors(vectors, ids, settings, version="v")
    assert np.array_equal(space.vectors, vectors)
    assert np.array_equal(space.index.reconstruct(ids[5]), vectors[5])
    builder = PairBuilder(ActivePair(), None, similarity=lambda v: scale_from_settings(v, settings))  # type: ignore[arg-type]
    expected = builder._similarity_scale(space.index)
    assert pair_scale(space.index, settings) == expected == space.similarity
    assert expected.scale != 1.0  # a real fit, not the identity on both sides
