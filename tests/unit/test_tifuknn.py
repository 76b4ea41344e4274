"""TIFU-KNN on a log small enough to compute by hand.

Items a, b, c, d (indices 0..3). Baskets (one shopper, one timestamp):

    day 0: u {a}     v {a, b}    z {b}
    day 1: u {a, b}  w {c, d}
    day 2: u {c}
    day 2: x views a (no basket: cold)

Parameters m = 2, r_b = 0.5, r_g = 0.5, alpha = 0.5. Queries at day 3.

u has 3 baskets; groups counted back from the newest: G0 = [day1, day2] (size 2),
G1 = [day0] (size 1), G = 2 groups. Weights = r_g**q * r_b**(pos from group's newest)
/ group size / G:
    day2: 1 * 1 / 2 / 2 = 0.25;  day1: 1 * 0.5 / 2 / 2 = 0.125;  day0: 0.5 * 1 / 1 / 2 = 0.25
    v_u = a 0.25 + 0.125 = 0.375, b 0.125, c 0.25;  |v_u|^2 = 0.140625 + 0.015625 + 0.0625 = 0.21875
v_v = (a 1, b 1), v_w = (c 1, d 1), v_z = (b 1): one basket, weight 1.

Cosine to u: v 0.5 / sqrt(0.21875 * 2) = 0.756; w 0.25 / sqrt(0.4375) = 0.378; z 0.125 / sqrt(0.21875) = 0.267.
Squared Euclidean to u: v 0.21875 + 2 - 1 = 1.21875; w 0.21875 + 2 - 0.5 = 1.71875; z 0.21875 + 1 - 0.25 = 0.96875.
So with k = 1 cosine picks v and Euclidean picks z; with k = 2 cosine picks v, w.
"""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.data import build_log
from evaluation.protocol import evaluate
from evaluation.tifuknn import TifuKnnMethod, TifuParams, TifuState, basket_weights, build_tifuknn, user_vector

DAY = 86400.0
A, B, C, D = 0, 1, 2, 3


def _log():  # type: ignore[no-untyped-def]
    rows = [
        ("u", "a", 0, "purchase"), ("v", "a", 0, "purchase"), ("v", "b", 0, "purchase"), ("z", "b", 0, "purchase"),
        ("u", "a", 1, "purchase"), ("u", "b", 1, "purchase"), ("w", "c", 1, "purchase"), ("w", "d", 1, "purchase"),
        ("u", "c", 2, "purchase"), ("x", "a", 2, "view"),
    ]
    events = [{"event_id": f"t:{n}", "user_id": u, "item_id": i, "ts": d * DAY, "kind": k} for n, (u, i, d, k) in enumerate(rows)]
    return build_log("t", events, [{"item_id": i, "title": i} for i in "abcd"])


def _replay(method, log) -> None:  # type: ignore[no-untyped-def]
    k = 0
    while k < len(log):
        j = k
        while j < len(log) and log.ts[j] == log.ts[k]:
            j += 1
        method.observe(log, k, j)
        k = j


def _method(k: int, metric: str = "cosine"):  # type: ignore[no-untyped-def]
    log = _log()
    m = build_tifuknn(log, TifuParams(group_size=2, r_b=0.5, r_g=0.5, k=k, alpha=0.5, metric=metric))  # type: ignore[arg-type]
    _replay(m, log)
    return m, log


def _pop_d() -> float:
    # popularity (14-day half-life) as of day 2, h = 0.5 ** (1 / 14): a = 2h^2 + h (u, v day 0; u day 1),
    # b = 2h^2 + h (v, z day 0; u day 1), c = h + 1, d = h; normalised by the max (a or b): d = 1 / (2h + 1)
    h = 0.5 ** (1 / 14)
    return 1 / (2 * h + 1)


def test_basket_weights_hand_computed() -> None:
    # n = 5, m = 2: groups from the newest have sizes 2, 2, 1; G = 3.
    # p0: 0.25 * 1 / 1 / 3; p1: 0.5 * 0.5 / 2 / 3; p2: 0.5 * 1 / 2 / 3; p3: 1 * 0.5 / 2 / 3; p4: 1 * 1 / 2 / 3
    assert basket_weights(5, 2, 0.5, 0.5) == pytest.approx([1 / 12, 1 / 24, 1 / 12, 1 / 12, 1 / 6])
    # fewer baskets than m: one group, the paper's within-group average
    assert basket_weights(2, 7, 0.9, 0.7) == pytest.approx([0.9 / 2, 1 / 2])


def test_user_vector_hand_computed() -> None:
    idx, val = user_vector([np.array([A]), np.array([A, B]), np.array([C])], 2, 0.5, 0.5)
    assert idx.tolist() == [A, B, C]
    assert val == pytest.approx([0.375, 0.125, 0.25])


def test_cosine_k1_picks_v_and_mixes_half_and_half() -> None:
    m, log = _method(k=1)
    u = log.user_ids.index("u")
    rows = m.state.neighbours(u, 3 * DAY, 1)
    assert [log.user_ids[s] for s in m.state.shopper_of(rows)] == ["v"]
    # pred = 0.5 * v_u + 0.5 * v_v = a 0.1875 + 0.5, b 0.0625 + 0.5, c 0.125, d 0
    assert m.prediction(u, 3 * DAY) == pytest.approx([0.6875, 0.5625, 0.125, 0.0])
    # ranked items: 2 + pred / max(pred); d (pred 0) falls back to popularity
    assert m.scores(u, 3 * DAY) == pytest.approx([3.0, 2 + 0.5625 / 0.6875, 2 + 0.125 / 0.6875, _pop_d()])


def test_cosine_k2_averages_v_and_w() -> None:
    m, log = _method(k=2)
    u = log.user_ids.index("u")
    rows = m.state.neighbours(u, 3 * DAY, 2)
    assert [log.user_ids[s] for s in m.state.shopper_of(rows)] == ["v", "w"]
    # mean(v_v, v_w) = 0.5 each; pred = 0.5 * v_u + 0.25 = a 0.4375, b 0.3125, c 0.375, d 0.25
    assert m.prediction(u, 3 * DAY) == pytest.approx([0.4375, 0.3125, 0.375, 0.25])
    assert m.scores(u, 3 * DAY) == pytest.approx([3.0, 2 + 0.3125 / 0.4375, 2 + 0.375 / 0.4375, 2 + 0.25 / 0.4375])


def test_euclidean_k1_picks_the_small_vector_z() -> None:
    m, log = _method(k=1, metric="euclidean")
    u = log.user_ids.index("u")
    assert [log.user_ids[s] for s in m.state.shopper_of(m.state.neighbours(u, 3 * DAY, 1))] == ["z"]
    # pred = 0.5 * v_u + 0.5 * v_z = a 0.1875, b 0.0625 + 0.5, c 0.125
    assert m.prediction(u, 3 * DAY) == pytest.approx([0.1875, 0.5625, 0.125, 0.0])
    assert m.scores(u, 3 * DAY) == pytest.approx([2 + 0.1875 / 0.5625, 3.0, 2 + 0.125 / 0.5625, _pop_d()])


def test_cold_shopper_gets_popularity() -> None:
    m, log = _method(k=1)
    x = log.user_ids.index("x")
    h = 0.5 ** (1 / 14)
    top = 2 * h * h + h
    assert m.prediction(x, 3 * DAY) is None
    assert m.scores(x, 3 * DAY) == pytest.approx([1.0, 1.0, (h + 1) / top, h / top])


def test_shared_state_ingests_once_and_k_prefixes_agree() -> None:
    """Two methods (k 1 and 2) on one state: each range counted once; k = 1 is k = 2's first neighbour."""
    log = _log()
    state = TifuState(log.n_users, log.n_items, 2, 0.5, 0.5)
    one, two = TifuKnnMethod(state, 1, 0.5, "k1"), TifuKnnMethod(state, 2, 0.5, "k2")
    for method in (one, two):
        _replay(method, log)
    u = log.user_ids.index("u")
    assert len(state.baskets[u]) == 3
    assert state.neighbours(u, 3 * DAY, 1).tolist() == state.neighbours(u, 3 * DAY, 2)[:1].tolist()
    assert one.prediction(u, 3 * DAY) == pytest.approx([0.6875, 0.5625, 0.125, 0.0])
    assert two.prediction(u, 3 * DAY) == pytest.approx([0.4375, 0.3125, 0.375, 0.25])


def test_neighbours_rebuilt_once_a_day_own_vector_always_current() -> None:
    """Day 3: v buys c. u's neighbours keep v's day-start vector until day 4; v's own vector moves at once."""
    log = _log()
    m = build_tifuknn(log, TifuParams(group_size=2, r_b=0.5, r_g=0.5, k=1, alpha=0.5))
    _replay(m, log)
    u, v = log.user_ids.index("u"), log.user_ids.index("v")
    before = m.prediction(u, 3 * DAY)
    m.state.baskets[v].append(np.array([C]))  # as observe would record it
    m.state.dirty.add(v)
    assert m.prediction(u, 3 * DAY + 60) == pytest.approx(before)
    # v's vector now: 2 baskets, one group: (0.5 * {a, b} + 1 * {c}) / 2 = a 0.25, b 0.25, c 0.5
    assert m.state.vector(v)[1] == pytest.approx([0.25, 0.25, 0.5])  # type: ignore[index]
    # day 4: cosine(u, v) = (0.09375 + 0.03125 + 0.125) / sqrt(0.21875 * 0.375) = 0.873 > w's 0.378: still v, new vector
    assert m.prediction(u, 4 * DAY) == pytest.approx([0.1875 + 0.125, 0.0625 + 0.125, 0.125 + 0.25, 0.0])
    assert m.state.rebuilds == 2


def test_protocol_scores_tifuknn_before_the_basket() -> None:
    """Through the protocol: u's day-3 basket {b, d} is ranked a, b, c, d (cosine k 1) -> recall 1, d at rank 4."""
    log = _log()
    events = [{"event_id": f"e:{n}", "user_id": log.user_ids[log.user[n]], "item_id": log.item_ids[log.item[n]],
               "ts": float(log.ts[n]), "kind": ("purchase", "cancel", "cart", "click", "view", "search")[log.kind[n]]}
              for n in range(len(log))]
    events += [{"event_id": "e:b", "user_id": "u", "item_id": "b", "ts": 3 * DAY, "kind": "purchase"},
               {"event_id": "e:d", "user_id": "u", "item_id": "d", "ts": 3 * DAY, "kind": "purchase"}]
    log = build_log("t", events, [{"item_id": i, "title": i} for i in "abcd"])
    m = build_tifuknn(log, TifuParams(group_size=2, r_b=0.5, r_g=0.5, k=1, alpha=0.5))
    res = evaluate(log, 3 * DAY, [m])["tifuknn"].as_dict()
    # ranking a (3.0), b (2.82), c (2.18), d (pop 0.34): hits at ranks 2 and 4 of an ideal 2
    assert res["all"]["recall@10"] == 1.0
    assert res["all"]["ndcg@10"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(5)) / (1 + 1 / np.log2(3)))


def test_bad_parameters_refused() -> None:
    with pytest.raises(ValueError):
        TifuState(1, 1, 0, 0.5, 0.5)
    with pytest.raises(ValueError):
        TifuState(1, 1, 2, 0.5, 0.5, "manhattan")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TifuKnnMethod(TifuState(1, 1, 2, 0.5, 0.5), 0, 0.5)
