"""The ranker study's own arithmetic: its Recall@10 and its coordinate ascent (bench/ranker_study.py)."""

from __future__ import annotations

import numpy as np

from bench.ranker_study import Basket, fit_linear, recall


def basket(features: list[list[float]], bought: list[bool], denominator: int) -> Basket:
    f = np.asarray(features, dtype=np.float32)
    return Basket(0.0, f, np.asarray(bought), denominator, f[:, 0].copy())


def test_recall_counts_hits_in_the_top_ten_over_the_protocol_denominator() -> None:
    # 12 candidates scored 11..0 by column 0; bought: the best, and the 11th (outside the top 10).
    feats = [[float(11 - k), 0.0] for k in range(12)]
    bought = [k in (0, 10) for k in range(12)]
    b = basket(feats, bought, denominator=3)  # a 3-item basket, one item never seen
    assert recall([b], None) == 1 / 3
    assert recall([b], lambda x: -x[:, 0]) == 1 / 3  # the 11th is now in the top ten, the best is not
    small = basket([[1.0, 0.0], [0.0, 0.0]], [True, True], denominator=2)
    assert recall([b, small], None) == (1 / 3 + 1.0) / 2


def test_coordinate_ascent_moves_weight_to_the_informative_feature() -> None:
    rng = np.random.default_rng(0)
    train = []
    for _ in range(40):
        signal = rng.normal(size=30)
        noise = rng.normal(size=30)
        bought = signal > np.sort(signal)[-4]  # the top 3 by signal are bought
        f = np.stack([noise, signal], axis=1)
        train.append(Basket(0.0, f.astype(np.float32), bought, 3, noise))
    start = np.array([1.0, 0.0])
    before = recall(train, lambda x: x[:, [0, 1]] @ start)
    w = fit_linear(train, [0, 1], start, (0.5, 0.2))
    after = recall(train, lambda x: x[:, [0, 1]] @ w)
    assert after > before and after > 0.9
    assert w[1] > abs(w[0])


def test_neighbours_score_what_similar_shoppers_bought() -> None:
    """u shares a and b with v and nothing with w: v's other item c scores, w's d does not."""
    from bench.ranker_study import Neighbours
    from evaluation.data import build_log
    from evaluation.methods import SystemMethod, SystemReplay
    from freshrec.settings import Settings
    from ranking.scoring import LogBlendWeights

    day = 86400.0
    rows = [("u", "a", 0.0), ("u", "b", 0.0), ("v", "a", day), ("v", "b", day), ("v", "c", day), ("w", "d", day)]
    events = [{"event_id": f"t:{k}", "user_id": u, "item_id": i, "ts": t, "kind": "purchase"} for k, (u, i, t) in enumerate(rows)]
    log = build_log("t", events, [{"item_id": i, "title": i} for i in "abcd"])
    replay = SystemReplay(log, Settings())
    system = SystemMethod("frozen", replay, np.eye(4, dtype=np.float32), LogBlendWeights(), 10)
    neighbours = Neighbours(log, system)
    replay.observe(log, 0, len(log))
    for user, ts in (("u", 0.0), ("v", day), ("w", day)):
        items = np.asarray([log.item_ids.index(i) for u2, i, t in rows if u2 == user])
        neighbours.bought(log.user_ids.index(user), ts, items)
    knn, recent = neighbours.scores(log.user_ids.index("u"), 2 * day)
    c, d = log.item_ids.index("c"), log.item_ids.index("d")
    assert knn[c] > 0 and knn[d] == 0
    assert recent[c] > 0 and recent[d] == 0
    assert knn.max() == 1.0 and recent.max() == 1.0


def test_where_the_hits_are_splits_own_items_from_new_ones() -> None:
    from bench.ranker_study import ALL, where_the_hits_are

    owned = ALL.index("log_baskets_with")
    f = np.zeros((12, len(ALL)), dtype=np.float32)
    f[:6, owned] = 1.0  # candidates 0..5 are the shopper's own items
    score = np.arange(12, 0, -1, dtype=np.float64)  # served order 0, 1, ..., 11
    bought = np.zeros(12, dtype=bool)
    bought[[0, 5, 7, 11]] = True  # own 0 and 5 (both in the top ten), new 7 (in) and 11 (out)
    figures = where_the_hits_are([Basket(0.0, f, bought, 4, score)])
    assert figures["top10 share own items"] == 0.6
    assert figures["recall@10 from own items"] == 0.5
    assert figures["recall@10 from never-bought"] == 0.25
    assert figures["oracle recall@10 own items ordered perfectly"] == 0.5


def test_cycle_columns_time_a_reorder_against_the_shoppers_own_gaps() -> None:
    """Three baskets on days 0, 10 and 20, each with a, the middle one with b; asked on day 25:
    a is half its 10-day gap past its last purchase, b was bought once, two baskets ago, c never."""
    from bench.ranker_study import FeatureRecorder, ShopperHistory

    day = 86400.0
    rec = FeatureRecorder.__new__(FeatureRecorder)  # only the history is needed for _cycle
    rec.history = ShopperHistory(
        baskets_with={0: {0: 3, 1: 1}}, first_bought={0: {0: 0.0, 1: 10 * day}},
        last_bought={0: {0: 20 * day, 1: 10 * day}}, last_basket_index={0: {0: 2, 1: 1}},
        first_basket={0: 0.0}, baskets={0: 3}, last_basket={0: (20 * day, np.array([0]))},
    )
    cols = rec._cycle(0, 25 * day, np.array([0, 1, 2]), np.array([3.0, 1.0, 0.0]), np.array([5.0, 15.0, -1.0]))
    np.testing.assert_allclose(cols["log_item_gap"], np.log1p([10.0, 0.0, 0.0]))
    np.testing.assert_allclose(cols["log_due_item"], [np.log(6 / 11), 0.0, 0.0])
    np.testing.assert_allclose(cols["log_due_shopper"], [np.log(6 / 11), np.log(16 / 11), 0.0])
    np.testing.assert_allclose(cols["log_shopper_gap"], np.log1p([10.0] * 3))
    np.testing.assert_allclose(cols["log_baskets_since_item"], np.log1p([0.0, 1.0, 0.0]))
