"""The vectorised features equal the per-item reference rules bit for bit (issue 14 item 4).

``ranking.features`` and ``ranking.collab.neighbour_signals`` were rewritten for serving's
cost (numpy over coded items, cached neighbour summaries, shop columns as arrays). The
rules below are the per-item loops they replaced, kept verbatim as the reference: on
random shops, every signal, candidate list and feature row must be the very same floats
(``np.array_equal``, not ``allclose``), with and without the serving-side caches.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pytest

from freshrec.contracts import Event
from ranking.collab import CollabRules, CollabState, neighbour_signals, neighbour_summary, normalised
from ranking.features import (
    COPURCHASE,
    NEIGHBOURS,
    NEW,
    OWN,
    POPULAR,
    FeatureRules,
    ShopperView,
    ShopView,
    candidates,
    feature_matrix,
    new_items_order,
    rows_needed,
    shopper_signals,
    with_columns,
)
from ranking.features import _strongest as strongest
from ranking.features import REPEAT_FLOOR, POP_FLOOR, SIGNAL_FLOOR, FEATURE_NAMES
from ranking.collab import reorder_ratio
from ranking.user_state import DAY_S, UserState, apply_event, decay_factor

T0 = 1_300_000_000.0
_ids = itertools.count()


# -- the reference: the per-item rules as they were before vectorising --------------------


def ref_neighbour_signals(neighbours, now_ts, basket_decay, recent_s, recent_half_life_s):  # type: ignore[no-untyped-def]
    knn: dict[str, float] = {}
    recent: dict[str, float] = {}
    for sim, state in neighbours:
        if sim <= 0:
            continue
        scores = state.basket_scores(basket_decay)
        top = max(scores.values(), default=0.0)
        if top > 0:
            for item, v in scores.items():
                knn[item] = knn.get(item, 0.0) + sim * v / top
        for it in state.history:
            if it.kind != "purchase":
                continue
            age = now_ts - it.ts
            if age < 0:
                continue
            if age > recent_s:
                break
            recent[it.item_id] = recent.get(it.item_id, 0.0) + sim * decay_factor(age, recent_half_life_s)
    return normalised(knn), normalised(recent)


def ref_cosine(
    weighted: Iterable[tuple[float, str]], rows: Mapping[str, Mapping[str, float]], baskets: Mapping[str, int], shrink: float
) -> dict[str, float]:
    """Sum of w * count(a, b) / (sqrt(n_a n_b) + shrink) over the weighted rows, written out."""
    out: dict[str, float] = {}
    for w, item in weighted:
        row = rows.get(item)
        if not row:
            continue
        for other, c in row.items():
            if other != item:
                denom = math.sqrt(float(baskets.get(item, 0)) * float(baskets.get(other, 0))) + shrink
                out[other] = out.get(other, 0.0) + w * (c / denom)
    return out


def ref_strongest(scores: Mapping[str, float], n: int) -> list[str]:
    return [item for item, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def ref_column(items: Sequence[str], values: Mapping[str, float], default: float = 0.0) -> np.ndarray:
    return np.fromiter((values.get(i, default) for i in items), dtype=np.float64, count=len(items))


def ref_rows(sig, shop, items, similarity, rules):  # type: ignore[no-untyped-def]
    n, now = len(items), shop.now_ts
    baskets_with = ref_column(items, sig.baskets_with)
    last_bought = ref_column(items, sig.last_bought, math.nan)
    bought = baskets_with > 0
    days_item = np.where(bought, np.log1p(np.maximum((now - np.nan_to_num(last_bought)) / DAY_S, 0.0)), 0.0)
    since_basket = 0.0 if sig.last_basket_ts is None else math.log1p(max(now - sig.last_basket_ts, 0.0) / DAY_S)
    age = now - ref_column(items, shop.first_seen, math.inf)
    item_baskets, item_buyers = ref_column(items, shop.baskets), ref_column(items, shop.buyers)
    cols = {
        "log_repeat": np.log(ref_column(items, sig.repeat) + REPEAT_FLOOR),
        "log_pop": np.log(np.maximum(ref_column(items, shop.popularity), 0.0) + POP_FLOOR),
        "sim": np.maximum(similarity.astype(np.float64), 0.0),
        "new": ((age >= 0.0) & (age <= rules.new_s)).astype(np.float64),
        "log_baskets_with": np.log1p(baskets_with),
        "log_share": np.log(baskets_with / max(sig.n_baskets, 1) + 0.01),
        "log_days_since_basket": np.full(n, since_basket),
        "log_days_since_item": days_item,
        "log_pop_short": np.log(np.maximum(ref_column(items, shop.pop_short), 0.0) + POP_FLOOR),
        "log_pop_long": np.log(np.maximum(ref_column(items, shop.pop_long), 0.0) + POP_FLOOR),
        "log_cooc": np.log(ref_column(items, sig.cooc) + SIGNAL_FLOOR),
        "log_cooc_last": np.log(ref_column(items, sig.cooc_last) + SIGNAL_FLOOR),
        "in_last_basket": np.fromiter((i in sig.last_basket for i in items), dtype=np.float64, count=n),
        "log_buyers": np.log1p(item_buyers),
        "log_knn": np.log(ref_column(items, sig.knn) + SIGNAL_FLOOR),
        "log_neighbour_recent": np.log(ref_column(items, sig.recent) + SIGNAL_FLOOR),
        "log_reorder_ratio": np.log(reorder_ratio(item_baskets, item_buyers)),
    }
    return np.stack([cols[c] for c in FEATURE_NAMES], axis=1).astype(np.float32)


# -- random shops ----------------------------------------------------------------------------


def random_shop(seed: int) -> tuple[CollabState, dict[str, UserState], float]:
    rng = np.random.default_rng(seed)
    items = [f"i{k}" for k in range(int(rng.integers(30, 300)))]
    users = [f"u{k}" for k in range(int(rng.integers(5, 60)))]
    collab, states = CollabState(CollabRules(top_k=20, row_cap=40)), {}
    ts = T0
    for _ in range(int(rng.integers(300, 1500))):
        ts += float(rng.exponential(0.2 * DAY_S))
        user = users[int(rng.integers(len(users)))]
        kind = "purchase" if rng.random() < 0.7 else str(rng.choice(["view", "cart", "cancel"]))
        for item in rng.choice(items, size=int(rng.integers(1, 6)) if kind == "purchase" else 1, replace=False):
            e = Event(event_id=f"x{next(_ids)}", user_id=user, kind=kind, ts=ts, item_id=str(item))
            s = states.setdefault(user, UserState(user))
            collab.apply(s, e)
            apply_event(s, e)
    return collab, states, ts + float(rng.uniform(0, 5 * DAY_S))


@pytest.mark.parametrize("seed", range(8))
def test_signals_candidates_and_rows_equal_the_reference(seed: int) -> None:
    collab, states, now = random_shop(seed)
    rng = np.random.default_rng(100 + seed)
    rules = FeatureRules(copurchase=15, neighbours=15, popular=20, new=10)
    pop = normalised(collab.pop_long.scores(now))
    shop = ShopView(
        now_ts=now, popularity=pop, pop_short=normalised(collab.pop_short.scores(now)), pop_long=pop,
        first_seen=collab.pop_long.first_seen, baskets=collab.stats.baskets, buyers=collab.stats.buyers,
        popular_top=sorted(pop, key=lambda i: (-pop[i], i)),
        new_items=new_items_order(collab.pop_long.first_seen, now, rules.new_s),
    )
    cached = with_columns(shop)
    assert cached == shop  # the columns take no part in equality
    users = sorted(states)
    checked = 0
    for user in users:
        state = states[user]
        if not state.baskets:
            continue
        others = [u for u in users if u != user]
        picked = rng.choice(others, size=min(len(others), int(rng.integers(0, 20))), replace=False)
        neighbours = [(float(rng.uniform(-0.2, 1.0)), states[str(u)]) for u in picked]
        rows = {i: collab.copurchase.row(i, now) for i in rows_needed(state, rules)}
        view = ShopperView(state, rows, neighbours)
        summarised = ShopperView(state, rows, [(s, neighbour_summary(st, rules.basket_decay)) for s, st in neighbours])
        knn, recent = ref_neighbour_signals(neighbours, now, rules.basket_decay, rules.recent_s, rules.recent_half_life_s)
        for v, sh in ((view, shop), (summarised, cached)):
            sig = shopper_signals(v, now, rules, sh)
            assert sig.knn == knn and sig.recent == recent  # dict equality: same keys, same floats
            weights = {i: w for i, w in sig.repeat.items()}
            assert sig.cooc == ref_cosine(((w, i) for i, w in _profile_weights(state, rules).items()), rows, shop.baskets, rules.shrink)
            assert weights == sig.repeat
            cands = candidates(sig, sh, rules, ann=["i3", "i1"])
            sim = rng.uniform(-1, 1, len(cands))
            x = feature_matrix(sig, sh, cands.items, sim, rules)
            assert np.array_equal(x, ref_rows(sig, shop, cands.items, sim, rules), equal_nan=True)
            assert cands.items == _ref_candidate_items(sig, shop, rules, ["i3", "i1"])
        checked += 1
    assert checked > 2


def _profile_weights(state: UserState, rules: FeatureRules) -> dict[str, float]:
    from ranking.features import profile

    return profile(state, rules)[0]


def _ref_candidate_items(sig, shop, rules, ann):  # type: ignore[no-untyped-def]
    order: dict[str, int] = {}

    def add(items: Iterable[str], flag: int) -> None:
        for item in items:
            order[item] = order.get(item, 0) | flag

    add(sorted(sig.repeat, key=lambda i: (-sig.repeat[i], i)), OWN)
    add((it.item_id for it in sig.state.history if it.kind != "cancel"), OWN)
    co = dict(sig.cooc)
    for item, v in sig.cooc_last.items():
        co[item] = co.get(item, 0.0) + v
    add(ref_strongest(co, rules.copurchase), COPURCHASE)
    nb = dict(sig.knn)
    for item, v in sig.recent.items():
        nb[item] = nb.get(item, 0.0) + v
    add(ref_strongest(nb, rules.neighbours), NEIGHBOURS)
    add(list(ann)[: rules.ann], 8)
    add(list(shop.popular_top)[: rules.popular], POPULAR)
    add(list(shop.new_items)[: rules.new], NEW)
    return list(order)


def test_strongest_keeps_ties_at_the_cut_in_id_order() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        n_items = int(rng.integers(0, 120))
        scores = {f"k{int(k)}": float(rng.integers(0, 6)) / 4 for k in rng.permutation(1000)[:n_items]}
        for n in (0, 1, 3, 10, 50):
            assert strongest(scores, n) == ref_strongest(scores, n)


def test_neighbour_signals_from_states_and_summaries_agree() -> None:
    collab, states, now = random_shop(99)
    neighbours = [(0.1 * (k % 7) - 0.05, s) for k, s in enumerate(states.values())]
    want = ref_neighbour_signals(neighbours, now, 0.9, 30 * DAY_S, 7 * DAY_S)
    assert neighbour_signals(neighbours, now, 0.9, 30 * DAY_S, 7 * DAY_S) == want
    summaries = [(s, neighbour_summary(st, 0.9)) for s, st in neighbours]
    assert neighbour_signals(summaries, now, 0.9, 30 * DAY_S, 7 * DAY_S) == want
    assert neighbour_signals([], now, 0.9, 30 * DAY_S, 7 * DAY_S) == ({}, {})


@pytest.mark.parametrize("seed", range(4))
def test_recent_purchases_at_any_now_equal_the_loop_that_skips_future_ones(seed: int) -> None:
    """"now" inside the histories: purchases after it are skipped, those older than the window end it."""
    _, states, end = random_shop(200 + seed)
    neighbours = [(0.9 - 0.01 * k, s) for k, s in enumerate(states.values())]
    summaries = [(sim, neighbour_summary(st, 0.9)) for sim, st in neighbours]
    windows_with_purchases = 0
    for now in np.linspace(T0, end, 7).tolist():
        want = ref_neighbour_signals(neighbours, now, 0.9, 3 * DAY_S, 1.5 * DAY_S)
        windows_with_purchases += bool(want[1])
        assert neighbour_signals(summaries, now, 0.9, 3 * DAY_S, 1.5 * DAY_S) == want
    assert windows_with_purchases >= 4  # so the check can fail


def test_top_items_and_new_items_equal_the_plain_python_rules_they_replace() -> None:
    """ranking.features.top_items / new_items_order run over every item per basket, in numpy;
    they must give exactly what heapq.nsmallest and the per-item window test gave."""
    import heapq
    import random

    from ranking.features import new_items_order, top_items

    rng = random.Random(11)
    for trial in range(30):
        n_items = rng.choice([0, 1, 5, 50, 3000])
        values = [rng.choice([1.0, 0.5, 0.25, rng.random()]) for _ in range(n_items)]  # many exact ties
        scores = {f"i{rng.randrange(10**6)}": v for v in values}
        for n in (0, 1, 10, 200, 5000):
            want = [k for k, _ in heapq.nsmallest(n, scores.items(), key=lambda kv: (-kv[1], kv[0]))]
            assert top_items(scores, n) == want
        now = 1.3e9
        first_seen = {k: now - rng.choice([0.0, 1.0, 86_400.0 * 30, 86_400.0 * 30 + 1e-6, -5.0, rng.uniform(-1e6, 9e6)])
                      for k in scores}
        fresh = [(ts, item) for item, ts in first_seen.items() if 0.0 <= now - ts <= 86_400.0 * 30]
        fresh.sort(key=lambda p: (-p[0], p[1]))
        assert new_items_order(first_seen, now, 86_400.0 * 30) == [item for _, item in fresh]
        for limit in (0, 1, 7, 10_000):
            assert new_items_order(first_seen, now, 86_400.0 * 30, limit) == [item for _, item in fresh][:limit]


@pytest.mark.parametrize("seed", range(6))
def test_coded_rows_decay_and_sum_to_the_floats_of_the_dict_rules(seed: int) -> None:
    """Serving's array rows (decayed with numpy, summed with bincount) against decayed_row and
    the per-entry cosine loop: same keys, order (by id) and floats; basket counts missing
    from the shop and items coded after its columns were built count as 0."""
    from ranking.collab import CodedRow, coded_decayed_row, decayed_row, stored_row_arrays
    from ranking.features import ShopView, _weighted_cosine, with_columns

    rng = np.random.default_rng(300 + seed)
    rules = CollabRules(top_k=int(rng.integers(3, 30)), row_cap=60)
    items = [f"i{k}" for k in range(80)]
    rows = {}
    for item in rng.choice(items, size=12, replace=False).tolist():
        others = rng.choice(items, size=int(rng.integers(0, 60)), replace=False).tolist()
        row = {o: (float(rng.choice([1.0, 2.0, rng.uniform(0.1, 9)])), float(T0 + rng.integers(0, 5) * DAY_S))
               for o in others}  # repeated values and times: ties at the cut
        if rng.random() < 0.8:
            row[item] = (float(rng.uniform(1, 20)), T0)
        rows[item] = row
    # basket counts for most items (some missing: 0), repeated values included
    baskets = {i: int(rng.choice([1, 2, rng.integers(1, 50)])) for i in items if rng.random() < 0.85}
    shop = ShopView(now_ts=T0, baskets=baskets)
    # the last "now" decays every value to 0.0: the order is then the names' alone
    for now in (T0 - DAY_S, T0 + 3.5 * DAY_S, T0 + 400 * DAY_S, T0 + 1e6 * DAY_S):
        coded = {i: coded_decayed_row(stored_row_arrays(r, i), now, rules) for i, r in rows.items()}
        plain = {i: decayed_row(r, i, now, rules) for i, r in rows.items()}
        for i in rows:
            assert isinstance(coded[i], CodedRow)
            assert list(coded[i].items()) == list(plain[i].items())
        weighted = [(float(w), i) for w, i in zip(rng.uniform(0.1, 1, len(rows)), list(rows) + ["absent"], strict=False)]
        got = _weighted_cosine(weighted, coded, with_columns(shop), 10.0)  # the vectorised sums
        want = _weighted_cosine(weighted, plain, shop, 10.0)  # the loop
        assert got == want and got == ref_cosine(weighted, plain, baskets, 10.0) and len(got) > 0
