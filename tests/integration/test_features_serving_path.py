"""Feature parity, the serving path: Redis-gathered features equal the stream's and the evaluation's.

Issue 14 item 2: the three paths (the collaborative flow labelling examples, ``freshrec
eval``, serving) must produce identical features for the same state.
tests/unit/test_features_paths.py proves the evaluation equals the contract's stream rule;
this file adds serving. The events of that file are replayed by the contract's per-event
rule (``evaluation.collab_replay.CollabReplay``) and the resulting state is written to a real
Redis the way the flows write it: the collaborative state through
``stores.collab_store.write_batch`` (the flow's whole-shop batch, rows encoded as
``streams.collab_partition.stored_row``), user states and served popularity through
``stores.user_store``. Serving then gathers exactly as ``/recommend`` does
(``ServingRuntime``: its popularity and shop-view caches, its FAISS nearest-shopper index
loaded from Redis, ``serving.ranked.gather_shopper`` over ``read_shopper_inputs`` with the
decode caches) and every shopper's candidates, sources and rows must equal, bit for bit:

* the stream rule written out from ``ranking``'s pure functions (exact ``ShopperIndex``
  search, the contract's ShopView), and
* the evaluation's ``basket_features`` over its replay,

at the state's newest event time (serving's "now"), with ``sim`` 0 and no ANN candidates
as in the stream (the ``sim`` column's own parity is tests/unit/test_features_paths.py's).
Twice: with cold decode caches and again with warm ones (cached neighbour summaries).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evaluation.collab_replay import CollabReplay, basket_features
from freshrec.contracts import Event
from freshrec.settings import Settings
from ranking.collab import normalised, shopper_vector
from ranking.features import (
    FEATURE_NAMES,
    ShopperView,
    ShopView,
    candidates,
    feature_matrix,
    new_items_order,
    rows_needed,
    shopper_signals,
)
from serving.ranked import gather_shopper, shop_at
from serving.runtime import ServingRuntime
from serving.testing import CatalogTwin, hash_tools
from stores import collab_store
from stores.user_store import connect, write_partition_batch, write_user_states
from streams.collab_partition import stored_row
from tests.unit.test_features_paths import ITEMS, make_events

pytestmark = pytest.mark.integration


def _replay(settings: Settings) -> CollabReplay:
    replay = CollabReplay(settings)
    events = [Event.model_validate(r) for r in sorted(make_events(), key=lambda r: r["ts"])]
    group: list[Event] = []
    for e in events:
        if group and e.ts != group[0].ts:
            replay.apply_events(group)
            group = []
        group.append(e)
    replay.apply_events(group)
    return replay


def _write_like_the_flows(settings: Settings, replay: CollabReplay) -> float:
    """The replay's state in Redis as the users flow and the collaborative flow write it; its newest ts."""
    client = connect(settings)
    collab, served = replay.collab, replay.served
    newest = collab.pop_long.newest_ts
    assert newest == served.newest_ts
    write_user_states(client, settings, replay.states.values())
    write_partition_batch(client, settings, settings.topics.events, 0, 1, {}, served.entries, served.newest_ts,
                          served.first_seen)
    stats = collab.stats
    outcome = collab_store.write_batch(
        client, settings, topic=settings.topics.events, prev_offsets={"0": 99}, offsets={"0": 99}, runs=[],
        rows={i: stored_row(r) for i, r in collab.copurchase.rows.items()},
        stats={i: (stats.baskets.get(i, 0), stats.buyers.get(i, 0)) for i in stats.baskets.keys() | stats.buyers.keys()},
        pop_short=dict(collab.pop_short.entries), pop_long=dict(collab.pop_long.entries),
        first_seen=dict(collab.pop_long.first_seen), newest_ts=newest,
        vectors={u: shopper_vector(replay.states[u], replay.collab_rules).astype("<f4").tobytes()  # type: ignore[union-attr]
                 for u in replay.index.ids},
        full=True,
    )
    assert outcome is collab_store.Outcome.WRITTEN
    return newest


def _stream_rule(replay: CollabReplay, user: str, ts: float) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The contract's example rule over the replay's state at ``ts`` (as test_features_paths.flow_examples)."""
    rules, collab, states = replay.feature_rules, replay.collab, replay.states
    state = states[user]
    rows = {i: collab.copurchase.row(i, ts) for i in rows_needed(state, rules)}
    vec = shopper_vector(state, replay.collab_rules)
    found = [] if vec is None else replay.index.search(vec, replay.neighbours, exclude=user)
    view = ShopperView(state, rows, [(sim, states[u]) for u, sim in found])
    pop = normalised(replay.served.scores(ts))
    shop = ShopView(
        now_ts=ts, popularity=pop,
        pop_short=normalised(collab.pop_short.scores(ts)), pop_long=normalised(collab.pop_long.scores(ts)),
        first_seen=collab.pop_long.first_seen, baskets=collab.stats.baskets, buyers=collab.stats.buyers,
        popular_top=sorted(pop, key=lambda i: (-pop[i], i)),
        new_items=new_items_order(collab.pop_long.first_seen, ts, rules.new_s),
    )
    sig = shopper_signals(view, ts, rules, shop)
    cands = candidates(sig, shop, rules)
    return cands.items, cands.sources, feature_matrix(sig, shop, cands.items, np.zeros(len(cands)), rules)


def test_serving_features_equal_the_stream_and_the_evaluation(fresh_settings: Settings, tmp_path: Path) -> None:
    from tests.unit.test_features_paths import settings as path_settings

    s = path_settings()
    settings = fresh_settings.model_copy(update={
        k: getattr(s, k) for k in ("collab_neighbours", "ranker_popular_candidates", "ranker_new_candidates",
                                   "ranker_ann_candidates", "ranker_copurchase_candidates", "ranker_neighbour_candidates")
    } | {"popularity_refresh_s": 3600.0, "ranker_poll_s": 3600.0})
    replay = _replay(settings)
    newest = _write_like_the_flows(settings, replay)

    runtime = ServingRuntime(settings, tools=hash_tools(CatalogTwin({i: None for i in ITEMS})), follow_topics=False)
    assert runtime.popularity.refresh() is not False
    assert runtime.shop.refresh(), runtime.shop.last_error
    assert runtime.shoppers.load_from_store() == len(replay.index.ids)
    rules = runtime.feature_rules
    assert rules == replay.feature_rules

    users = sorted(u for u, st in replay.states.items() if st.baskets)
    assert len(users) >= 5
    for rnd in ("cold caches", "warm caches"):
        for user in users:
            state = replay.states[user]
            shop = shop_at(runtime.shop.view, state)  # type: ignore[arg-type]
            assert shop.now_ts == newest
            view = gather_shopper(state, shop.now_ts, rules, runtime.collab_rules, settings.collab_neighbours,
                                  runtime.shoppers.search, runtime.read_shopper_inputs)
            sig = shopper_signals(view, shop.now_ts, rules, shop)
            cands = candidates(sig, shop, rules)
            served_x = feature_matrix(sig, shop, cands.items, np.zeros(len(cands)), rules)

            items, sources, x = _stream_rule(replay, user, newest)
            assert cands.items == items, (rnd, user)
            assert np.array_equal(cands.sources, sources), (rnd, user)
            differ = [FEATURE_NAMES[c] for c in range(x.shape[1]) if not np.array_equal(served_x[:, c], x[:, c])]
            assert not differ, (rnd, user, differ, np.abs(served_x - x).max())  # identical, not close

            ev = replay.shopper_view(user, newest)
            assert ev is not None
            bf = basket_features(ev, replay.shop_view(newest), rules)
            assert bf.items == cands.items and np.array_equal(bf.features, served_x), (rnd, user)
    assert runtime.states_cache.hits > 0 and runtime.rows_cache.hits > 0  # the second round read the caches
