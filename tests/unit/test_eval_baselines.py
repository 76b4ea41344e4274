"""The baselines and the protocol on a small case computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.baselines import CooccurrenceMethod, CoPurchase, PopularityMethod, RepeatMethod, UserFrequency
from evaluation.data import CANCEL, PURCHASE, build_log
from evaluation.protocol import evaluate, top_k

DAY = 86400.0


def _log(rows: list[tuple[str, str, float, str]]):  # type: ignore[no-untyped-def]
    events = [
        {"event_id": f"t:{k}", "user_id": u, "item_id": i, "ts": ts, "kind": kind} for k, (u, i, ts, kind) in enumerate(rows)
    ]
    items = [{"item_id": i, "title": f"title {i}"} for i in ("a", "b", "c", "d")]
    return build_log("t", events, items)


def _replay(method, log, stop: int | None = None):  # type: ignore[no-untyped-def]
    stop = len(log) if stop is None else stop
    k = 0
    while k < stop:
        j = k
        while j < stop and log.ts[j] == log.ts[k]:
            j += 1
        method.observe(log, k, j)
        k = j


def test_popularity_half_life_hand_computed() -> None:
    # a bought twice on day 0, b once on day 14: at day 14, a = 2 * 0.5 = 1.0, b = 1.0; c on day 14 too
    log = _log([("u", "a", 0.0, "purchase"), ("v", "a", 0.0, "purchase"), ("u", "b", 14 * DAY, "purchase"),
                ("w", "c", 14 * DAY, "purchase"), ("w", "c", 14 * DAY + 1, "cancel")])
    m = PopularityMethod(log.n_items, half_life_days=14.0)
    _replay(m, log)
    a, b, c, d = (log.item_ids.index(x) for x in "abcd")
    s = m.scores(0, 15 * DAY)
    # the second decay step (1 s) is negligible; the cancel does not count for popularity
    assert s[a] == pytest.approx(1.0, rel=1e-5) and s[b] == pytest.approx(1.0, rel=1e-5)
    assert s[c] == pytest.approx(1.0, rel=1e-5) and s[d] == 0.0


def test_repeat_orders_by_decayed_frequency_then_popularity() -> None:
    # u: a once on day 0, b once on day 90 (half-life 90: a = 0.5, b = 1) -> b, a;
    # then popularity: c (bought by 2 others) before d (never)
    log = _log([("u", "a", 0.0, "purchase"), ("v", "c", 80 * DAY, "purchase"), ("w", "c", 85 * DAY, "purchase"),
                ("u", "b", 90 * DAY, "purchase")])
    m = RepeatMethod(log.n_items, half_life_days=90.0)
    _replay(m, log)
    a, b, c, d = (log.item_ids.index(x) for x in "abcd")
    u = log.user_ids.index("u")
    ranked = top_k(m.scores(u, 91 * DAY), np.ones(log.n_items, dtype=bool), 4)
    assert ranked == [b, a, c, d]
    f = dict(zip(*m.freq.items(u)))
    assert f[a] == pytest.approx(0.5) and f[b] == pytest.approx(1.0)


def test_repeat_ties_broken_by_popularity() -> None:
    log = _log([("v", "b", 0.0, "purchase"), ("u", "a", DAY, "purchase"), ("u", "b", DAY, "purchase")])
    m = RepeatMethod(log.n_items)
    _replay(m, log)
    a, b = log.item_ids.index("a"), log.item_ids.index("b")
    u = log.user_ids.index("u")
    assert top_k(m.scores(u, 2 * DAY), np.ones(log.n_items, dtype=bool), 2) == [b, a]


def test_cancel_subtracts_one_purchase() -> None:
    f = UserFrequency(90.0)
    f.apply(0, 1, PURCHASE, 0.0)
    f.apply(0, 1, PURCHASE, 0.0)
    f.apply(0, 1, CANCEL, 0.0)
    items, freq = f.items(0)
    assert items.tolist() == [1] and freq.tolist() == [1.0]
    f.apply(0, 1, CANCEL, 0.0)
    assert f.items(0)[0].size == 0
    f.apply(0, 2, CANCEL, 0.0)  # a return of something never bought changes nothing
    assert f.items(0)[0].size == 0


def test_copurchase_cosine_with_shrink_hand_computed() -> None:
    co = CoPurchase(4)
    co.add_basket(np.array([0, 1]))
    co.add_basket(np.array([0, 1, 2]))
    co.add_basket(np.array([0]))
    # n = [3, 2, 1, 0]; C01 = 2, C02 = 1, C12 = 1; sim(0,1) = 2 / (sqrt(6) + shrink)
    sim = co.similarity_rows(np.array([0]), shrink=1.0)[0]
    assert sim[0] == 0.0
    assert sim[1] == pytest.approx(2 / (np.sqrt(6) + 1))
    assert sim[2] == pytest.approx(1 / (np.sqrt(3) + 1))
    assert sim[3] == 0.0


def test_cooccurrence_hand_computed() -> None:
    # x bought a+b together; u bought a: u's score for b = w_cooc * 1 (normalised), for a = w_repeat * 1 + cooc(a, a)=0
    log = _log([("x", "a", 0.0, "purchase"), ("x", "b", 0.0, "purchase"), ("u", "a", DAY, "purchase")])
    m = CooccurrenceMethod(log.n_items, w_repeat=1.0, w_cooc=0.5, w_pop=0.0, shrink=0.0)
    _replay(m, log)
    a, b, c = (log.item_ids.index(x) for x in "abc")
    u = log.user_ids.index("u")
    s = m.scores(u, 2 * DAY)
    assert s[a] == pytest.approx(1.0) and s[b] == pytest.approx(0.5) and s[c] == 0.0


def test_protocol_scores_before_ingesting_and_slices() -> None:
    # day 0: u buys a, b (history). day 10 (eval): u buys a, c -> repeat ranks a, b, then c? c was
    # seen on day 5 (v bought it). v's basket on day 10 is a cold-start item d never seen before.
    log = _log([("u", "a", 0.0, "purchase"), ("u", "b", 0.0, "purchase"), ("v", "c", 5 * DAY, "purchase"),
                ("u", "a", 10 * DAY, "purchase"), ("u", "c", 10 * DAY, "purchase"), ("w", "d", 10 * DAY, "purchase")])
    res = evaluate(log, 10 * DAY, [RepeatMethod(log.n_items), PopularityMethod(log.n_items)])
    rep = res["repeat"].as_dict()
    # u's basket {a, c}: top 10 over seen {a, b, c} = [a, b, c] (a, b bought; c by popularity) -> recall 1.0
    # w's basket {d}: d was never seen -> recall 0.0 (still counted)
    assert rep["all"] == {"recall@10": 0.5, "ndcg@10": pytest.approx((1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3)) / 2),
                          "baskets": 2}
    assert rep["warm"]["baskets"] == 1 and rep["warm"]["recall@10"] == 1.0
    # explore for u: rank only never-bought {c} against the novel part {c} -> 1.0
    assert rep["explore"] == {"recall@10": 1.0, "ndcg@10": 1.0, "baskets": 1}
