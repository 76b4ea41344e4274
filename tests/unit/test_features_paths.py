"""Feature parity: the evaluation's ranking rows equal the contract's flow rule, computed independently.

Issue 14 item 2 asks for one test that the three paths (the collaborative flow labelling
examples, ``freshrec eval``, serving) produce identical features for the same state.
This file covers the evaluation against the contract's per-event rule and example rule
(docs/ranking_stage_contract.md), written out here step by step from ``ranking``'s pure
functions, not through ``evaluation.collab_replay``:

* every example ``evaluation.ranker_method.ExampleStream`` records has, for each of the
  flow's candidates, the very row the flow computes (the flow has no vectors, so its
  ``sim`` is 0 and it has no ANN candidates: the evaluation's rows are compared with
  ``sim`` set aside, which is checked on its own against ``similarity_column`` over the
  flow's state, and its extra candidates are exactly ANN ones);
* the labels and the basket are the flow's;
* the evaluation's own user states equal ``SystemReplay``'s (the blend's) after the replay.

Serving's path (the same events' state written to Redis as the flows write it, gathered
as /recommend does) is tests/integration/test_features_serving_path.py.

The events avoid two things the protocol and the flow treat differently on purpose: two
shoppers buying at the same second (the flow upserts shopper vectors per line, the
evaluation per timestamp) and another event of a shopper at the second of their basket
before its first purchase line.
"""

from __future__ import annotations

from collections.abc import Container, Iterator

import numpy as np
import pytest

from evaluation.collab_replay import BasketFeatures, CollabReplay, VectorSpace, basket_features
from evaluation.data import build_log
from evaluation.methods import SystemReplay
from evaluation.protocol import timestamp_groups
from evaluation.ranker_method import ExampleStream
from freshrec.contracts import Event
from freshrec.settings import Settings
from ranking.collab import CollabRules, CollabState, ShopperIndex, normalised, shopper_vector
from ranking.features import (
    ANN,
    COLUMN,
    FeatureRules,
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
from ranking.scoring import SimilarityScale
from ranking.user_state import DAY_S, Popularity, StateRules, UserState, apply_event, popularity_weight

T0 = 1_290_000_000.0
ITEMS = [f"i{k}" for k in range(24)]


def make_events(seed: int = 3) -> list[dict[str, object]]:
    """Six shoppers over 40 days: baskets of 1-4 lines, views, a cancel, a duplicate line."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    n = 0
    for day in range(40):
        for u in range(6):
            if rng.random() < 0.5:
                continue
            ts = T0 + day * DAY_S + u * 600.0  # one shopper per second: see the module docstring
            if rng.random() < 0.3:
                rows.append({"event_id": f"e{n}", "user_id": f"u{u}", "kind": "view", "ts": ts - 60.0,
                             "item_id": ITEMS[int(rng.integers(len(ITEMS)))]})
                n += 1
            favourites = ITEMS[u * 3 : u * 3 + 6]
            lines = rng.choice(favourites + ITEMS[:4], size=int(rng.integers(1, 5)), replace=False)
            for item in lines:
                rows.append({"event_id": f"e{n}", "user_id": f"u{u}", "kind": "purchase", "ts": ts, "item_id": str(item)})
                n += 1
            if day == 20 and u == 1:
                rows.append(dict(rows[-1]))  # a redelivered line: same event id, dropped as a duplicate
                rows.append({"event_id": f"e{n}", "user_id": "u1", "kind": "cancel", "ts": ts + 30.0, "item_id": str(lines[0])})
                n += 1
    return rows


def settings() -> Settings:
    return Settings(collab_neighbours=3, ranker_popular_candidates=5, ranker_new_candidates=4, ranker_ann_candidates=3,
                    ranker_copurchase_candidates=6, ranker_neighbour_candidates=6)


FlowExample = tuple[list[str], np.ndarray, np.ndarray, UserState]  # items, rows, labels, state before


def flow_examples(events: list[Event], s: Settings) -> dict[tuple[str, float], FlowExample]:
    """The contract's flow, written out: per-event rule, and an example at each basket's first line."""
    rules, crules, srules = FeatureRules.from_settings(s), CollabRules.from_settings(s), StateRules.from_settings(s)
    collab, index = CollabState(crules), ShopperIndex(crules.shopper_dim)
    served = Popularity(s.popularity_half_life_days * DAY_S)
    states: dict[str, UserState] = {}
    made: dict[tuple[str, float], tuple[list[str], np.ndarray, UserState]] = {}
    bought: dict[tuple[str, float], set[str]] = {}
    for e in events:
        state = states.setdefault(e.user_id, UserState(e.user_id))
        if e.event_id in state.recent_ids:
            continue
        if e.kind == "purchase":
            assert e.item_id is not None
            bought.setdefault((e.user_id, e.ts), set()).add(e.item_id)
            if e.ts not in state.baskets and state.baskets:  # the first line of a new basket
                ts = e.ts
                rows = {i: collab.copurchase.row(i, ts) for i in rows_needed(state, rules)}
                vec = shopper_vector(state, crules)
                assert vec is not None
                found = index.search(vec, s.collab_neighbours, exclude=e.user_id)
                view = ShopperView(state, rows, [(sim, states[u]) for u, sim in found])
                pop = normalised(served.scores(ts))
                shop = ShopView(
                    now_ts=ts, popularity=pop,
                    pop_short=normalised(collab.pop_short.scores(ts)), pop_long=normalised(collab.pop_long.scores(ts)),
                    first_seen=collab.pop_long.first_seen, baskets=collab.stats.baskets, buyers=collab.stats.buyers,
                    popular_top=sorted(pop, key=lambda i: (-pop[i], i)),
                    new_items=new_items_order(collab.pop_long.first_seen, ts, rules.new_s),
                )
                sig = shopper_signals(view, ts, rules, shop)
                cands = candidates(sig, shop, rules)
                x = feature_matrix(sig, shop, cands.items, np.zeros(len(cands)), rules)
                made[(e.user_id, ts)] = (cands.items, x, UserState.from_dict(state.to_dict()))
        collab.apply(state, e)
        weight = popularity_weight(state, e)
        apply_event(state, e, srules)
        served.observe(e.ts)
        assert e.item_id is not None
        served.see(e.item_id, e.ts)
        if weight:
            served.add(e.item_id, weight, e.ts)
        if e.kind == "purchase":
            index.upsert(e.user_id, shopper_vector(state, crules))
    return {key: (items, x, labels(items, bought[key]), before) for key, (items, x, before) in made.items()}


class Source:
    """Item vectors as ``SystemMethod`` holds them (rows in log order) and a non-trivial scale."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(11)
        m = rng.normal(size=(n, 8)).astype(np.float32)
        self.vectors = m / np.linalg.norm(m, axis=1, keepdims=True)
        self.similarity_scale = SimilarityScale(0.05, 1.7)


def replay_stream(s: Settings) -> tuple[ExampleStream, SystemReplay, object]:
    log = build_log("paths", make_events(), [{"item_id": i, "title": i} for i in ITEMS])
    index = {iid: k for k, iid in enumerate(log.item_ids)}
    stream = ExampleStream(CollabReplay(s), Source(log.n_items), log.item_ids, index, log.user_ids, record_from=T0, keep=10_000)
    system = SystemReplay(log, s)
    bounds = timestamp_groups(log.ts)
    for g in range(bounds.size - 1):
        stream.observe(log, int(bounds[g]), int(bounds[g + 1]))
        system.observe(log, int(bounds[g]), int(bounds[g + 1]))
    return stream, system, log


def wire_events() -> list[Event]:
    return [Event.model_validate(r) for r in sorted(make_events(), key=lambda r: r["ts"])]  # type: ignore[arg-type,return-value]


def test_evaluation_rows_equal_the_flow_rule() -> None:
    s = settings()
    flow = flow_examples(wire_events(), s)
    stream, _, _ = replay_stream(s)
    examples = {(ex.user_id, ex.ts): ex for ex in stream.examples}
    assert len(flow) > 60 and set(examples) == set(flow)
    rules = FeatureRules.from_settings(s)
    space = stream.space()
    sim_col = COLUMN["sim"]
    others = [k for k in range(len(COLUMN)) if k != sim_col]
    ann_only = 0
    for key, (items, x, y, before) in flow.items():
        ex = examples[key]
        pos = {item: k for k, item in enumerate(ex.items)}
        assert set(items) <= set(pos)
        rows = ex.features[[pos[i] for i in items]]
        assert np.array_equal(rows[:, others], x[:, others]), key  # identical, not close
        assert np.array_equal(ex.labels[[pos[i] for i in items]], y)
        sim = similarity_column(before, ex.items, space.rows(), rules, space.scale)
        assert np.array_equal(ex.features[:, sim_col], np.maximum(sim, 0.0).astype(np.float32))
        extra = [i for i in ex.items if i not in set(items)]
        ann_only += len(extra)
        assert len(extra) <= rules.ann
    assert ann_only > 0  # the evaluation's ANN candidates were exercised


def gathered_baskets(collab: CollabReplay, wanted: Container[tuple[str, float]]) -> Iterator[tuple[tuple[str, float], BasketFeatures]]:
    """Replay :func:`make_events` through ``collab`` in timestamp groups, as ``freshrec eval``
    does, yielding before each group the features without vectors (``basket_features``) of
    each (shopper, time) of the group in ``wanted``."""
    log = build_log("paths", make_events(), [{"item_id": i, "title": i} for i in ITEMS])
    bounds = timestamp_groups(log.ts)
    for g in range(bounds.size - 1):
        ts = float(log.ts[bounds[g]])
        for user in sorted({log.user_ids[int(u)] for u in log.user[bounds[g] : bounds[g + 1]]}):
            if (user, ts) in wanted:
                view = collab.shopper_view(user, ts)
                assert view is not None
                yield (user, ts), basket_features(view, collab.shop_view(ts), collab.feature_rules)
        collab.observe(log, int(bounds[g]), int(bounds[g + 1]))


def test_gatherer_alone_matches_the_flow_without_vectors() -> None:
    """Without vectors, ``basket_features`` is the flow's example itself (candidates, order and rows)."""
    s = settings()
    flow = flow_examples(wire_events(), s)
    checked = 0
    for key, bf in gathered_baskets(CollabReplay(s), flow):
        items, x, _, _ = flow[key]
        assert bf.items == items and np.array_equal(bf.features, x)
        assert not (bf.sources & ANN).any()
        checked += 1
    assert checked == len(flow)


def test_own_states_equal_the_blend_replays() -> None:
    stream, system, log = replay_stream(settings())
    mine = stream.collab.states
    assert len(mine) == len(system.states)
    for u, state in system.states.items():
        assert mine[log.user_ids[u]].to_dict() == state.to_dict()  # type: ignore[attr-defined]
    served = stream.collab.served.scores()
    assert served == pytest.approx(system.popularity.scores(), abs=0.0)
