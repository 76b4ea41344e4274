"""ranking.collab: co-purchase, item statistics, two-horizon popularity, shopper vectors."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import orjson
import pytest

from freshrec.contracts import Event
from ranking.collab import (
    CoPurchase,
    cosine,
    CollabRules,
    CollabState,
    ShopperIndex,
    confidence,
    decayed_row,
    neighbour_signals,
    reorder_ratio,
    shopper_vector,
)
from ranking.user_state import DAY_S, UserState, apply_event

_ids = itertools.count()


def ev(user: str, item: str, ts: float, kind: str = "purchase") -> Event:
    return Event(event_id=f"e{next(_ids)}", user_id=user, kind=kind, ts=ts, item_id=item)


def run(events: list[Event], rules: CollabRules = CollabRules()) -> tuple[CollabState, dict[str, UserState]]:
    """The collaborative flow's per-event rule: collab first (state before), then user state."""
    collab = CollabState(rules)
    states: dict[str, UserState] = {}
    for e in events:
        state = states.setdefault(e.user_id, UserState(e.user_id))
        if e.event_id in state.recent_ids:
            continue
        collab.apply(state, e)
        apply_event(state, e)
    return collab, states


T0 = 1_300_000_000.0


def test_basket_lines_pair_once_whatever_their_order() -> None:
    lines = ["a", "b", "c"]
    forward, _ = run([ev("u", i, T0) for i in lines])
    backward, _ = run([ev("u", i, T0) for i in reversed(lines)])
    for collab in (forward, backward):
        rows = {k: collab.copurchase.row(k, T0) for k in lines}
        assert rows["a"] == {"b": 1.0, "c": 1.0, "a": 1.0}
        assert rows["b"] == {"a": 1.0, "c": 1.0, "b": 1.0}
    assert forward.copurchase.rows == {k: dict(sorted(v.items())) for k, v in backward.copurchase.rows.items()} or all(
        forward.copurchase.rows[k] == backward.copurchase.rows[k] for k in lines
    )


def test_a_duplicate_line_counts_no_second_pair_and_no_second_basket() -> None:
    collab, _ = run([ev("u", "a", T0), ev("u", "b", T0), ev("u", "b", T0)])
    assert collab.copurchase.row("a", T0)["b"] == 1.0
    assert collab.stats.baskets == {"a": 1, "b": 1}
    # popularity counts every purchase line, as served popularity does
    assert collab.pop_short.scores()["b"] == pytest.approx(2.0)


def test_counts_decay_and_buyers_count_first_purchases_only() -> None:
    rules = CollabRules(copurchase_half_life_s=10 * DAY_S)
    collab, _ = run(
        [ev("u", "a", T0), ev("u", "b", T0), ev("u", "a", T0 + 10 * DAY_S), ev("u", "b", T0 + 10 * DAY_S), ev("v", "a", T0 + 10 * DAY_S)],
        rules,
    )
    row = collab.copurchase.row("a", T0 + 10 * DAY_S)
    assert row["b"] == pytest.approx(1.5)  # 0.5 (one half-life old) + 1
    assert row["a"] == pytest.approx(2.5)  # three baskets with a: 0.5 + 1 + 1
    assert collab.stats.baskets == {"a": 3, "b": 2}
    assert collab.stats.buyers == {"a": 2, "b": 1}
    assert reorder_ratio(3, 2) == pytest.approx(2 / 5)
    assert confidence(row, "a", shrink=0.5) == {"b": pytest.approx(1.5 / 3.0)}


def test_memory_is_bounded_by_items_times_row_cap() -> None:
    rules = CollabRules(top_k=5, row_cap=8, max_basket_lines=64)
    rng = random.Random(3)
    items = [f"i{k}" for k in range(60)]
    events = []
    for b in range(300):
        for item in rng.sample(items, 12):
            events.append(ev(f"u{b % 40}", item, T0 + b * 3600))
    collab, _ = run(events, rules)
    assert max(len(r) for r in collab.copurchase.rows.values()) <= rules.row_cap
    assert collab.copurchase.entries() <= len(collab.copurchase.rows) * rules.row_cap
    for item in items:
        row = collab.copurchase.row(item, T0 + 300 * 3600)
        assert len(row) <= rules.row_cap + 1  # a read returns what is stored (and the own count)
        assert set(row) == set(collab.copurchase.rows[item]) | {item}


def test_a_cut_keeps_the_most_specific_partners_not_the_most_frequent() -> None:
    """Row a: p is bought with a most often but with everything (400 baskets); r only with a.
    A cut to 2 keeps the two largest cosines count / (sqrt(n_a n_b) + 10), not the two largest counts."""
    co = CoPurchase(CollabRules(top_k=2, row_cap=3))
    row = {"a": (10.0, T0), "p": (5.0, T0), "r": (2.0, T0), "s": (3.0, T0)}
    baskets = {"a": 10, "p": 400, "r": 2, "s": 50}
    by_count = sorted((o for o in row if o != "a"), key=lambda o: -row[o][0])[:2]
    by_cosine = sorted((o for o in row if o != "a"), key=lambda o: -cosine(row[o][0], 10, baskets[o], 10.0))[:2]
    assert by_count == ["p", "s"] and by_cosine == ["r", "s"]
    co._prune("a", dict(row), T0, baskets)
    assert set(co.rows["a"]) == {"a", "r", "s"}  # the own count always stays
    assert cosine(5.0, 10, 400, 10.0) == pytest.approx(5.0 / (math.sqrt(4000.0) + 10.0))


def test_a_read_row_follows_every_change_of_the_row() -> None:
    """``CoPurchase.row`` reads cached arrays; each line that changes a row (a new partner, a
    count, a cut) and each snapshot install must show in the next read, as ``decayed_row`` of
    the stored row gives it, with the same keys, order and floats."""
    rules = CollabRules(top_k=3, row_cap=4)
    co = CoPurchase(rules)
    rng = random.Random(5)
    items = [f"i{k}" for k in range(12)]
    baskets = {i: 1 for i in items}
    ts = T0
    for step in range(300):
        ts += 3_600.0 * rng.random()
        basket = rng.sample(items, 4)
        for k, item in enumerate(basket):
            baskets[item] += 1
            co.add_line(item, basket[:k], ts, True, baskets)
        for item in rng.sample(items, 3):  # read, so the next change must drop a cached row
            read = co.row(item, ts + step)
            assert list(read.items()) == list(decayed_row(co.rows.get(item, {}), item, ts + step, rules).items())
    snapshot = {k: dict(v) for k, v in co.rows.items()}
    snapshot["i0"] = {"i0": (1.0, ts), "i1": (0.5, ts)}
    co.replace_rows(snapshot)
    assert co.row("i0", ts) == {"i1": 0.5, "i0": 1.0}


def test_large_baskets_stop_pairing_at_the_line_limit() -> None:
    rules = CollabRules(max_basket_lines=3)
    collab, _ = run([ev("u", i, T0) for i in "abcde"], rules)
    assert set(collab.copurchase.row("c", T0)) == {"a", "b", "c"}
    assert set(collab.copurchase.row("d", T0)) == {"d"}  # the 4th line pairs with nothing
    assert collab.stats.baskets["e"] == 1


def test_a_cancel_lowers_popularity_only_if_it_undoes_a_purchase() -> None:
    collab, _ = run([ev("u", "a", T0), ev("u", "a", T0 + 1, "cancel"), ev("v", "b", T0 + 1, "cancel")])
    assert collab.pop_long.scores()["a"] == pytest.approx(0.0, abs=1e-6)
    assert "b" not in collab.pop_long.entries
    assert collab.pop_long.first_seen == {"a": T0, "b": T0 + 1}


def test_snapshot_round_trip_through_json() -> None:
    rules = CollabRules()
    collab, _ = run([ev("u", i, T0 + k) for k, i in enumerate("abcab")] + [ev("v", "c", T0 + 9)])
    raw = orjson.dumps(collab.to_dict())
    back = CollabState.from_dict(orjson.loads(raw), rules)
    assert back.to_dict() == collab.to_dict()
    with pytest.raises(ValueError, match="format"):
        CollabState.from_dict({"v": 99}, rules)


def test_shopper_vectors_estimate_basket_cosine_and_search_finds_the_twin() -> None:
    rules = CollabRules(shopper_dim=256)
    events = [ev("u", i, T0) for i in ["a", "b", "c"]] + [ev("twin", i, T0) for i in ["a", "b", "c"]]
    events += [ev("other", i, T0) for i in ["x", "y", "z"]]
    _, states = run(events)
    vecs = {u: shopper_vector(s, rules) for u, s in states.items()}
    assert np.dot(vecs["u"], vecs["twin"]) == pytest.approx(1.0, abs=1e-6)
    index = ShopperIndex(rules.shopper_dim)
    for u, v in vecs.items():
        index.upsert(u, v)
    found = index.search(vecs["u"], 2, exclude="u")
    assert found[0][0] == "twin"
    assert shopper_vector(UserState("cold"), rules) is None


def test_neighbour_signals_weight_by_similarity_and_recency() -> None:
    _, states = run([ev("n1", "a", T0), ev("n2", "b", T0 - 40 * DAY_S), ev("n2", "c", T0 - 7 * DAY_S)])
    knn, recent = neighbour_signals([(1.0, states["n1"]), (0.5, states["n2"])], T0, 0.9, 30 * DAY_S, 7 * DAY_S)
    # n1's a: 1.0 * 1; n2's b and c, each scaled by n2's max: b in the older basket 0.9, c 1.0
    assert knn == pytest.approx({"a": 1.0, "b": 0.45, "c": 0.5})
    # recent: a at age 0 (1.0), c one half-life old with weight 0.5 -> 0.25, b too old
    assert recent == pytest.approx({"a": 1.0, "c": 0.25})
