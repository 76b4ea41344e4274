"""The per-partition event-id window: bounded, oldest evicted first, carried by snapshots."""

from __future__ import annotations

import pickle

import orjson
import pytest

from streams.dedupe import EventIdWindow, id_hash
from ranking.pairs import PairRules
from streams.user_partition import SNAPSHOT_VERSION, UserPartition
from ranking.user_state import DAY_S, StateRules, UserState
from tests.unit.test_streams_partition import Msg, T0


def test_window_drops_repeats_and_evicts_the_oldest_first() -> None:
    w = EventIdWindow(3)
    assert [w.add(e) for e in ("a", "b", "c")] == [True, True, True]
    assert not w.add("a") and len(w) == 3
    assert w.add("d")  # evicts a, the oldest
    assert len(w) == 3 and "a" not in w and all(e in w for e in "bcd")
    assert w.add("a")  # forgotten, so new again; evicts b
    assert "b" not in w and list(w.ordered()) == [id_hash(e) for e in "cda"]


def test_window_stays_bounded_over_many_ids() -> None:
    w = EventIdWindow(1000)
    for i in range(25_000):
        assert w.add(f"e{i}")
    assert len(w) == 1000 and len(w.ordered()) == 1000
    assert "e24999" in w and "e24000" in w and "e23999" not in w and "e0" not in w


def test_window_survives_snapshot_and_restore_in_order() -> None:
    w = EventIdWindow(5)
    for i in range(8):
        w.add(f"e{i}")
    snap = pickle.loads(pickle.dumps(w.snapshot()))
    assert len(snap) == 5 * 8
    r = EventIdWindow(5, snap)
    assert list(r.ordered()) == list(w.ordered())
    assert not r.add("e7") and r.add("e8") and "e3" not in r  # e3 was the oldest kept
    # A smaller window after a restart keeps the newest ids.
    small = EventIdWindow(2, snap)
    assert list(small.ordered()) == [id_hash("e6"), id_hash("e7")]


def test_window_of_zero_remembers_nothing() -> None:
    w = EventIdWindow(0)
    assert w.add("a") and w.add("a") and len(w) == 0


def _purchases(n: int, start_offset: int) -> list[Msg]:
    return [
        Msg(b"u1", orjson.dumps({"event_id": f"ds:{i}", "user_id": "u1", "item_id": f"i{i % 7}", "kind": "purchase",
                                 "ts": T0 + i}), start_offset + i)
        for i in range(n)
    ]


def test_a_file_replayed_twice_counts_once_far_beyond_the_per_user_window() -> None:
    # 200 events of one user: the per-user window (64 ids) forgets the first ones long
    # before the replay repeats them; the partition window does not.
    p = UserPartition(StateRules(dedupe_ids=64), PairRules(), 14 * DAY_S, dedupe_window=1000)
    first = p.apply(_purchases(200, 0))
    again = p.apply(_purchases(200, 200))
    assert first.applied == 200 and again.applied == 0 and again.duplicates == 200
    assert not again.users and not again.popularity and again.last_offset == 399
    state = UserState.from_bytes(first.users["u1"])
    assert p.state("u1") == state and state.events == 200


def test_the_window_travels_in_the_partition_snapshot() -> None:
    p = UserPartition(StateRules(), PairRules(), 14 * DAY_S, dedupe_window=1000)
    p.apply(_purchases(100, 0))
    snap = pickle.loads(pickle.dumps(p.snapshot()))
    assert snap[0] == SNAPSHOT_VERSION
    q = UserPartition(StateRules(), PairRules(), 14 * DAY_S, snap, dedupe_window=1000)
    assert q.apply(_purchases(100, 100)).applied == 0
    with pytest.raises(ValueError, match="v2 is not readable"):
        UserPartition(StateRules(), PairRules(), 14 * DAY_S, (2, {}, {}, 0.0, {}, -1))
