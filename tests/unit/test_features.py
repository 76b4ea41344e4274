"""ranking.features: candidates with their sources, and feature rows checked by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from freshrec.contracts import Event
from ranking.collab import CollabRules, CollabState, normalised
from ranking.features import (
    ANN,
    COPURCHASE,
    FEATURE_NAMES,
    FEATURE_SCHEMA,
    NEIGHBOURS,
    NEW,
    OWN,
    POPULAR,
    FeatureRules,
    ShopperSignals,
    ShopperView,
    ShopView,
    candidates,
    feature_matrix,
    labels,
    new_items_order,
    rows_needed,
    shopper_signals,
    similarity_column,
)
from ranking.user_state import DAY_S, UserState, apply_event

_ids = itertools.count()
T0 = 1_300_000_000.0


def ev(user: str, item: str, ts: float, kind: str = "purchase") -> Event:
    return Event(event_id=f"f{next(_ids)}", user_id=user, kind=kind, ts=ts, item_id=item)


def world() -> tuple[CollabState, dict[str, UserState]]:
    collab = CollabState(CollabRules())
    states: dict[str, UserState] = {}
    events = [
        ev("u", "a", T0),
        ev("u", "b", T0),
        ev("u", "a", T0 + 2 * DAY_S),
        ev("v", "a", T0 + 3 * DAY_S),
        ev("v", "c", T0 + 3 * DAY_S),
        ev("u", "d", T0 + 4 * DAY_S, "view"),
    ]
    for e in events:
        s = states.setdefault(e.user_id, UserState(e.user_id))
        collab.apply(s, e)
        apply_event(s, e)
    return collab, states


def views(now: float) -> tuple[ShopperSignals, ShopView]:
    collab, states = world()
    rules = FeatureRules()
    u = states["u"]
    rows = {item: collab.copurchase.row(item, now) for item in rows_needed(u, rules)}
    view = ShopperView(u, rows, [(0.5, states["v"])])
    shop = ShopView(
        now_ts=now,
        popularity=normalised(collab.pop_long.scores(now)),
        pop_short=normalised(collab.pop_short.scores(now)),
        pop_long=normalised(collab.pop_long.scores(now)),
        first_seen=collab.pop_long.first_seen,
        baskets=collab.stats.baskets,
        buyers=collab.stats.buyers,
        popular_top=["a", "c", "b"],
        new_items=new_items_order(collab.pop_long.first_seen, now, rules.new_s),
    )
    return shopper_signals(view, now, rules, shop), shop


def test_schema_names_the_columns() -> None:
    assert FEATURE_SCHEMA.startswith("f3-") and len(FEATURE_NAMES) == 17


def test_candidates_remember_every_source() -> None:
    now = T0 + 5 * DAY_S
    sig, shop = views(now)
    cands = candidates(sig, shop, FeatureRules(), ann=["e"])
    src = dict(zip(cands.items, cands.sources.tolist(), strict=True))
    assert cands.items[:2] == ["a", "b"]  # own items by repeat, strongest first
    assert src["a"] & OWN and src["a"] & POPULAR and src["a"] & NEW
    assert src["d"] == OWN | NEW  # viewed: history; first seen 1 day ago
    assert src["e"] == ANN


def test_copurchase_and_neighbour_sources() -> None:
    now = T0 + 5 * DAY_S
    sig, shop = views(now)
    assert sig.cooc["c"] > 0 and sig.knn["c"] > 0
    cands = candidates(sig, shop, FeatureRules())
    src = dict(zip(cands.items, cands.sources.tolist(), strict=True))
    assert src["c"] & COPURCHASE and src["c"] & NEIGHBOURS


def test_feature_rows_by_hand() -> None:
    now = T0 + 5 * DAY_S
    sig, shop = views(now)
    items = ["a", "b", "c", "zz"]
    sim = np.array([0.5, -0.2, 0.0, 0.3])
    x = feature_matrix(sig, shop, items, sim, FeatureRules())
    assert x.shape == (4, 17) and x.dtype == np.float32
    col = {n: x[:, k] for k, n in enumerate(FEATURE_NAMES)}
    # u's baskets: {a, b} at T0 and {a} at T0 + 2d; basket scores a = 1 + 0.9, b = 0.9
    assert col["log_repeat"] == pytest.approx(np.log([1.0 + 0.005, 0.9 / 1.9 + 0.005, 0.005, 0.005]), rel=1e-6)
    assert col["sim"] == pytest.approx([0.5, 0.0, 0.0, 0.3])
    assert col["log_baskets_with"] == pytest.approx(np.log1p([2, 1, 0, 0]))
    assert col["log_share"] == pytest.approx(np.log([1.0 + 0.01, 0.5 + 0.01, 0.01, 0.01]), rel=1e-6)
    assert col["log_days_since_basket"] == pytest.approx(np.full(4, math.log1p(3.0)))
    assert col["log_days_since_item"] == pytest.approx([math.log1p(3.0), math.log1p(5.0), 0.0, 0.0])
    assert col["in_last_basket"].tolist() == [1.0, 0.0, 0.0, 0.0]
    # a: 3 baskets (u twice, v once), 2 buyers; c: 1 basket, 1 buyer; zz: unknown
    assert col["log_buyers"] == pytest.approx(np.log1p([2, 1, 1, 0]))
    assert col["log_reorder_ratio"] == pytest.approx(np.log([2 / 5, 1 / 3, 1 / 3, 1 / 2]), rel=1e-6)
    assert col["new"].tolist() == [1.0, 1.0, 1.0, 0.0]  # first seen 5, 5 and 2 days ago (new_s 30 d); zz never
    assert np.all(np.isfinite(x))


def test_rows_do_not_depend_on_the_other_candidates() -> None:
    now = T0 + 5 * DAY_S
    sig, shop = views(now)
    rules = FeatureRules()
    cands = candidates(sig, shop, rules)
    full = feature_matrix(sig, shop, cands.items, np.zeros(len(cands)), rules)
    mask = np.arange(len(cands)) % 2 == 0
    part = cands.keep(mask)
    assert np.array_equal(feature_matrix(sig, shop, part.items, np.zeros(len(part)), rules), full[mask])


def test_similarity_column_uses_the_user_vector_and_the_scale() -> None:
    from ranking.scoring import SimilarityScale

    _, states = world()
    vecs = {"a": np.array([1.0, 0.0], dtype=np.float32), "b": np.array([0.0, 1.0], dtype=np.float32)}
    col = similarity_column(states["u"], ["a", "b", "zz"], vecs, FeatureRules(), SimilarityScale(0.1, 2.0))
    assert col[2] == 0.0 and col[0] > col[1] > 0.1


def test_labels() -> None:
    assert labels(["a", "b", "c"], {"c", "a", "x"}).tolist() == [1.0, 0.0, 1.0]


def test_the_profile_sizes_come_from_the_settings_and_bound_the_rows_read() -> None:
    """``ranker_profile_items`` / ``ranker_last_basket_items`` reach the rules every path builds,
    and cap the co-purchase rows a ranking reads (serving reads exactly ``rows_needed``)."""
    from freshrec.settings import Settings

    rules = FeatureRules.from_settings(Settings(ranker_profile_items=2, ranker_last_basket_items=1))
    assert (rules.profile_items, rules.last_basket_items) == (2, 1)
    u = UserState("u")
    for k, ts in enumerate((1.0, 2.0)):  # two baskets: a b c, then d e
        for item in ("abc" if k == 0 else "de"):
            apply_event(u, Event(event_id=f"{item}{k}", user_id="u", item_id=item, kind="purchase", ts=ts))
    needed = rows_needed(u, rules)
    assert len(needed) <= 3 and len(set(needed)) == len(needed)  # 2 strongest + 1 last-basket line, deduplicated
    wide = rows_needed(u, FeatureRules.from_settings(Settings()))
    assert set(wide) == set("abcde") and set(needed) < set(wide)
