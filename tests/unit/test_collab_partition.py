"""The collaborative flow's partition without Kafka or Redis: examples, basket closing, snapshots, order, bounds."""

from __future__ import annotations

import base64
import math
import pickle
from typing import Any

import numpy as np
import orjson
import pytest

from freshrec.contracts import Event
from freshrec.settings import Settings
from ranking.features import COLUMN, FEATURE_NAMES, FEATURE_SCHEMA, REPEAT_FLOOR
from streams.collab_partition import BASKET_CLOSE_S, STAGE, CollabPartition, Message, example_id
from tests.unit.test_features_paths import flow_examples, make_events
from tests.unit.test_features_paths import settings as paths_settings

T0 = 1_300_000_000.0


def msg(event: dict[str, Any], offset: int, partition: int = 0, key: bytes | None = None) -> Message:
    return Message(key if key is not None else str(event["user_id"]).encode(), orjson.dumps(event), "events", offset,
                   partition, (1, int(float(event["ts"]) * 1000)))  # type: ignore[arg-type]


def ev(n: int, user: str, kind: str, item: str, ts: float) -> dict[str, Any]:
    return {"event_id": f"e{n}", "user_id": user, "kind": kind, "item_id": item, "ts": ts}


def examples(batch: Any) -> dict[str, dict[str, Any]]:
    return {orjson.loads(r)["example_id"]: orjson.loads(r) for _, r in batch.examples}


def features(record: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(record["features_f32"])
    return np.frombuffer(raw, dtype="<f4").reshape(len(record["items"]), len(FEATURE_NAMES))


def tiny() -> list[dict[str, Any]]:
    """u1 buys {a, b} on day 0, {a, c} on day 1 (second basket: the first example), views, then {b} on day 2."""
    day = 86_400.0
    return [
        ev(0, "u1", "purchase", "a", T0), ev(1, "u1", "purchase", "b", T0),
        ev(2, "u2", "purchase", "a", T0 + 100), ev(3, "u2", "purchase", "c", T0 + 100),
        ev(4, "u1", "purchase", "a", T0 + day), ev(5, "u1", "purchase", "c", T0 + day), ev(6, "u1", "purchase", "a", T0 + day),
        ev(7, "u1", "view", "d", T0 + day + 60),  # a later event of u1: closes the basket
        ev(8, "u1", "purchase", "b", T0 + 2 * day),
    ]


def test_example_of_a_tiny_stream_equals_the_hand_computation() -> None:
    s = Settings(collab_neighbours=5)
    part = CollabPartition.from_settings(s)
    batch = part.apply([msg(e, k) for k, e in enumerate(tiny())])
    got = examples(batch)
    day1 = T0 + 86_400.0
    assert list(got) == [example_id("u1", day1)]  # u1's first basket makes none; u2 has one basket only
    ex = got[example_id("u1", day1)]
    assert ex["schema"] == FEATURE_SCHEMA and ex["user_id"] == "u1" and ex["ts"] == day1
    assert ex["basket"] == ["a", "c"]  # the repeated line of a counts once
    # Candidates: own items by repeat score (a, b tie at 1 basket each -> by id), then co-purchase
    # (c: bought with a by u2), then the popular items; c is a label, b is not.
    items = ex["items"]
    assert items[:2] == ["a", "b"] and "c" in items
    assert dict(zip(items, ex["labels"], strict=True)) == {i: int(i in {"a", "c"}) for i in items}
    x = features(ex)
    a, c = items.index("a"), items.index("c")
    assert x[a, COLUMN["log_repeat"]] == pytest.approx(math.log(1.0 + REPEAT_FLOOR), rel=1e-6)
    assert x[a, COLUMN["log_baskets_with"]] == pytest.approx(math.log1p(1), rel=1e-6)
    assert x[c, COLUMN["log_baskets_with"]] == 0.0
    assert x[a, COLUMN["in_last_basket"]] == 1.0 and x[c, COLUMN["in_last_basket"]] == 0.0
    assert x[a, COLUMN["log_days_since_basket"]] == pytest.approx(math.log1p(1.0), rel=1e-6)
    assert x[:, COLUMN["sim"]].tolist() == [0.0] * len(items)  # the stream has no vectors
    # Buyers and baskets before the basket: a was bought by u1 and u2 (2 baskets, 2 buyers).
    assert x[a, COLUMN["log_buyers"]] == pytest.approx(math.log1p(2), rel=1e-6)
    assert x[a, COLUMN["log_reorder_ratio"]] == pytest.approx(math.log((2 - 2 + 1) / (2 + 2)), rel=1e-6)
    # The neighbour u2 (shares a) bought c: it has a neighbour signal, b (only u1's) has none.
    assert x[c, COLUMN["log_knn"]] > math.log(1e-3) + 1e-6
    assert [h[0] for h in ex["history"]] == ["b", "a"]  # before the basket, newest first (equal ts: arrival order)


def test_examples_equal_the_contract_rule_written_out() -> None:
    """The parity reference of tests/unit/test_features_paths.py, now against the flow's partition."""
    s = paths_settings()
    raw = sorted(make_events(), key=lambda r: r["ts"])  # type: ignore[arg-type,return-value]
    want = flow_examples([Event.model_validate(r) for r in raw], s)
    part = CollabPartition.from_settings(s)
    got: dict[str, dict[str, Any]] = {}
    for k in range(0, len(raw), 37):
        got |= examples(part.apply([msg(e, j) for j, e in enumerate(raw[k : k + 37], start=k)]))
    got |= examples(part.apply([msg(ev(10_000, "late", "view", "i0", T0 + 1e7), len(raw))]))  # closes the rest by time
    assert len(want) > 60 and set(got) == {example_id(u, ts) for u, ts in want}
    for (user, ts), (items, x, y, before) in want.items():
        ex = got[example_id(user, ts)]
        assert ex["items"] == items
        assert np.array_equal(features(ex), x)  # identical, not close
        assert ex["labels"] == [int(v) for v in y]
        assert ex["history"] == before.to_dict()["history"]


def test_a_basket_closes_at_the_next_later_event_or_an_hour_of_event_time() -> None:
    part = CollabPartition.from_settings(Settings())
    part.apply([msg(ev(0, "u1", "purchase", "a", T0), 0), msg(ev(1, "u2", "purchase", "a", T0), 1)])
    opened = part.apply([msg(ev(2, "u1", "purchase", "b", T0 + 10), 2), msg(ev(3, "u2", "purchase", "b", T0 + 20), 3)])
    assert not opened.examples and set(part.open) == {("u1", T0 + 10), ("u2", T0 + 20)}
    # A line at the same second joins the basket; u1's view at the same second does not close it.
    same = part.apply([msg(ev(4, "u1", "purchase", "c", T0 + 10), 4), msg(ev(5, "u1", "view", "z", T0 + 10), 5)])
    assert not same.examples
    closed = part.apply([msg(ev(6, "u1", "view", "z", T0 + 11), 6)])  # u1's next, later event
    assert [orjson.loads(r)["basket"] for _, r in closed.examples] == [["b", "c"]]
    # u2's basket waits for u2, or until the flow's event time passes its time + 1 h.
    edge = part.apply([msg(ev(7, "u3", "view", "z", T0 + 20 + BASKET_CLOSE_S), 7)])
    assert not edge.examples
    late = part.apply([msg(ev(8, "u3", "view", "z", T0 + 21 + BASKET_CLOSE_S), 8)])
    assert [(u, orjson.loads(r)["basket"]) for u, r in late.examples] == [("u2", ["b"])]
    assert not part.open


def test_bad_records_are_dead_letters_and_duplicates_count_once() -> None:
    part = CollabPartition.from_settings(Settings())
    good = ev(0, "u1", "purchase", "a", T0)
    batch = part.apply([
        msg(good, 0), msg(good, 1),  # a re-sent event: the window drops it
        Message(b"u1", b"{not json", "events", 2, 0, None),
        msg(ev(1, "u1", "purchase", "b", T0), 3, key=b"someone-else"),
    ])
    assert batch.applied == 1 and batch.duplicates == 1
    assert [d.field for d in batch.dead_letters] == ["record", "key"] and {d.stage for d in batch.dead_letters} == {STAGE}
    assert batch.offsets == {"0": 3} and batch.runs == [(0, 3)]
    assert part.collab.stats.baskets == {"a": 1}


def _interleaved(raw: list[dict[str, Any]], parts: int, seed: int) -> list[Message]:
    """Events spread over ``parts`` partitions by user (as the producer keys them), shuffled across partitions."""
    queues: list[list[Message]] = [[] for _ in range(parts)]
    for e in raw:
        p = int(str(e["user_id"])[1:]) % parts
        queues[p].append(msg(e, len(queues[p]), partition=p))
    rng = np.random.default_rng(seed)
    out: list[Message] = []
    while any(queues):
        p = int(rng.choice([k for k in range(parts) if queues[k]]))
        take = int(rng.integers(1, 6))
        out.extend(queues[p][:take])
        del queues[p][:take]
    return out


def _whole(part: CollabPartition) -> tuple[Any, ...]:
    return (
        {u: s.to_bytes() for u, s in part.states.items()},
        orjson.dumps(part.collab.to_dict()),
        part.served.entries, part.index.ids, part.index.matrix[: len(part.index.ids)].tobytes(), part.offsets,
    )


def test_snapshot_round_trip_and_a_replay_that_follows_the_recorded_order() -> None:
    """Snapshot mid-stream, restore, replay the rest *in another interleaving* following the
    recorded order: the state and every example equal an uninterrupted run's."""
    s = paths_settings()
    raw = sorted(make_events(), key=lambda r: r["ts"])  # type: ignore[arg-type,return-value]
    first = _interleaved(raw, 3, seed=1)
    clean = CollabPartition.from_settings(s)
    log: list[tuple[dict[str, int], list[tuple[int, int]]]] = []
    want: dict[str, bytes] = {}
    snap = None
    for k in range(0, len(first), 25):
        batch = clean.apply(first[k : k + 25])
        log.append((batch.prev_offsets, batch.runs))
        want |= {orjson.loads(r)["example_id"]: r for _, r in batch.examples}
        if k == 100:
            snap = pickle.dumps(clean.snapshot())
    assert snap is not None
    restored = CollabPartition.from_settings(s, pickle.loads(snap))
    assert restored.snapshot() == pickle.loads(snap)  # round trip
    assert restored.follow(log) and restored.plan
    # After the crash Bytewax re-reads every partition from the snapshot's offsets, fetched in another order.
    rest = _interleaved(raw, 3, seed=2)
    rest = [m for m in rest if m.offset > restored.offsets.get(str(m.partition), -1)]  # type: ignore[operator]
    replayed: dict[str, bytes] = {}
    for k in range(0, len(rest), 7):
        replayed |= {orjson.loads(r)["example_id"]: r for _, r in restored.apply(rest[k : k + 7]).examples}
    assert not restored.plan and not any(restored.pending.values())
    assert _whole(restored) == _whole(clean)
    assert replayed and all(want[i] == r for i, r in replayed.items())  # byte-identical examples


def test_follow_refuses_a_log_that_does_not_reach_back() -> None:
    part = CollabPartition.from_settings(Settings())
    assert not part.follow([({"0": 5}, [(0, 9)])]) and not part.plan


def test_copurchase_memory_bound_holds_through_the_flow() -> None:
    s = Settings(collab_top_k=3, collab_row_cap=5, collab_max_basket_lines=64)
    part = CollabPartition.from_settings(s)
    rng = np.random.default_rng(0)
    n = 0
    for day in range(30):
        batch = []
        for u in range(20):
            ts = T0 + day * 86_400.0 + u
            for item in rng.choice(60, size=6, replace=False):
                batch.append(msg(ev(n, f"u{u}", "purchase", f"i{item}", ts), n))
                n += 1
        out = part.apply(batch)
        assert all(len(orjson.loads(r)) <= 5 for r in out.rows.values())
    rows = part.collab.copurchase.rows
    assert len(rows) == 60 and max(len(r) for r in rows.values()) <= 5
    assert part.collab.copurchase.entries() <= 60 * 5
    full = part.full_batch()
    assert full is not None and set(full.rows) == set(rows) and full.prev_offsets == full.offsets


# -- retention: shoppers silent for stream_retention_days are forgotten ------------------------


def test_retention_forgets_a_silent_shopper_everywhere_and_a_returning_one_starts_afresh() -> None:
    day = 86_400.0
    s = Settings(stream_retention_days=10, collab_neighbours=5)
    part = CollabPartition.from_settings(s)
    events = [
        ev(0, "u1", "purchase", "a", T0), ev(1, "u1", "purchase", "b", T0 + day),
        ev(2, "u2", "purchase", "a", T0 + 2 * day), ev(3, "u2", "purchase", "c", T0 + 5 * day),
    ]
    first = part.apply([msg(e, k) for k, e in enumerate(events)])
    assert first.forgotten == 0 and set(part.states) == {"u1", "u2"} and set(part.index.ids) == {"u1", "u2"}
    # u1's newest event is day 1: an event on day 12 is past its 10 days, u2's (day 5) is not
    later = part.apply([msg(ev(4, "u3", "view", "d", T0 + 12 * day), 4)])
    assert later.forgotten == 1 and set(part.states) == {"u2", "u3"}
    assert part.index.ids == ["u2"] and part.index.rows == {"u2": 0}
    assert later.vectors == {"u1": None}  # Redis and serving's index drop u1's vector
    assert "u1" not in part.snapshot()[1]  # nor is it in the next snapshot
    back = part.apply([msg(ev(5, "u1", "purchase", "a", T0 + 13 * day), 5)])
    assert part.states["u1"].events == 1 and len(part.states["u1"].baskets) == 1  # afresh: one basket
    assert back.vectors["u1"] is not None and back.forgotten == 0
    assert part.index.ids == ["u2", "u1"]


def test_retention_zero_keeps_every_shopper() -> None:
    part = CollabPartition.from_settings(Settings(stream_retention_days=0))
    part.apply([msg(ev(0, "u1", "purchase", "a", T0), 0), msg(ev(1, "u2", "view", "a", T0 + 5000 * 86_400.0), 1)])
    assert set(part.states) == {"u1", "u2"}


def test_shopper_index_remove_moves_the_last_row_and_search_finds_the_rest() -> None:
    from ranking.collab import ShopperIndex

    rng = np.random.default_rng(5)
    index = ShopperIndex(8)
    vecs = {f"u{k}": (v / np.linalg.norm(v)).astype(np.float32) for k, v in enumerate(rng.normal(size=(200, 8)))}
    for u, v in vecs.items():
        index.upsert(u, v)
    for k in range(200):
        if k % 4 != 1:
            index.remove(f"u{k}")
    index.remove("absent")
    kept = {u: v for u, v in vecs.items() if int(u[1:]) % 4 == 1}
    assert sorted(index.ids) == sorted(kept) and all(index.ids[r] == u for u, r in index.rows.items())
    assert index.matrix.shape[0] == 128  # 50 of 256 rows left: under a quarter, so halved
    q = vecs["u1"]
    want = sorted((u for u in kept if float(np.dot(kept[u], q)) > 0), key=lambda u: -float(np.dot(kept[u], q)))[:5]
    assert [u for u, _ in index.search(q, 5)] == want


@pytest.mark.parametrize("retention_days", [3.0, 730.0])
def test_retention_replays_exactly_after_a_restart(retention_days: float) -> None:
    """A snapshot, a restart and a replay in another interleaving forget exactly what an uninterrupted run forgot."""
    s = paths_settings().model_copy(update={"stream_retention_days": retention_days})
    raw = sorted(make_events(), key=lambda r: r["ts"])  # type: ignore[arg-type,return-value]
    first = _interleaved(raw, 3, seed=1)
    clean = CollabPartition.from_settings(s)
    log: list[tuple[dict[str, int], list[tuple[int, int]]]] = []
    forgotten = 0
    snap = None
    for k in range(0, len(first), 25):
        batch = clean.apply(first[k : k + 25])
        forgotten += batch.forgotten
        log.append((batch.prev_offsets, batch.runs))
        if k == 100:
            snap = pickle.dumps(clean.snapshot())
    assert (forgotten > 0) == (retention_days < 10)  # 3 days: shoppers skip days and are forgotten
    restored = CollabPartition.from_settings(s, pickle.loads(snap))
    assert restored.follow(log)
    rest = [m for m in _interleaved(raw, 3, seed=2) if m.offset > restored.offsets.get(str(m.partition), -1)]  # type: ignore[operator]
    for k in range(0, len(rest), 7):
        restored.apply(rest[k : k + 7])
    assert _whole(restored) == _whole(clean)
    assert restored.recency.last == clean.recency.last


def test_a_version_1_snapshot_is_read_with_the_order_rebuilt_from_the_states() -> None:
    part = CollabPartition.from_settings(Settings())
    part.apply([msg(e, k) for k, e in enumerate(tiny())])
    v1 = (1, *part.snapshot()[1:12])
    restored = CollabPartition.from_settings(Settings(), v1)
    assert list(restored.recency.last) == ["u2", "u1"]  # u2's newest event is older than u1's
    assert _whole(restored) == _whole(part)


def test_with_retention_the_evaluation_computes_the_flows_examples() -> None:
    """The evaluation's replay forgets the shoppers the flow forgets, before the same baskets:
    with a 3-day retention (shoppers forgotten and coming back) its rows are the flow's examples."""
    from evaluation.collab_replay import CollabReplay
    from tests.unit.test_features_paths import gathered_baskets

    s = paths_settings().model_copy(update={"stream_retention_days": 3.0})
    raw = sorted(make_events(), key=lambda r: r["ts"])  # type: ignore[arg-type,return-value]
    part = CollabPartition.from_settings(s)
    flow: dict[str, dict[str, Any]] = {}
    forgotten = 0
    for k in range(0, len(raw), 20):
        batch = part.apply([msg(e, k + j) for j, e in enumerate(raw[k : k + 20])])
        flow |= examples(batch)
        forgotten += batch.forgotten
    kept, rows = set(part.states), list(part.index.ids)
    # an event far later closes the last open baskets (and forgets everyone)
    flow |= examples(part.apply([msg(ev(10**6, "zz", "view", "i0", T0 + 1e8), 10**6)]))
    assert forgotten > 0 and len(flow) > 20
    collab = CollabReplay(s)
    by_key = {(r["user_id"], r["ts"]): r for r in flow.values()}
    checked = 0
    for key, bf in gathered_baskets(collab, by_key):
        record = by_key[key]
        assert bf.items == record["items"]
        assert np.array_equal(bf.features.astype(np.float32), features(record))
        checked += 1
    assert checked == len(flow)
    assert set(collab.states) == kept and collab.index.ids == rows  # the same shoppers kept, in the same rows
