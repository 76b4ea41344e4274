"""Per-partition processing as pure code: validation to dead letters, snapshot/restore."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import pytest

from freshrec.contracts import CatalogDelete
from streams.catalog_partition import CatalogPartition
from streams.user_partition import UserPartition
from ranking.user_state import DAY_S, StateRules, UserState
from ranking.pairs import PairRules

T0 = 1_300_000_000.0


@dataclass
class Msg:
    key: bytes | None
    value: bytes | None
    offset: int
    topic: str = "ev"
    partition: int = 0
    timestamp: tuple[int, int] | None = (1, 1_700_000_000_000)


def events(n: int, user: str = "u1", start: int = 0) -> list[Msg]:
    return [
        Msg(user.encode(), orjson.dumps({"event_id": f"e{i}", "user_id": user, "item_id": f"i{i % 4}",
                                         "kind": "purchase", "ts": T0 + i}), start + i - 0)
        for i in range(start, start + n)
    ]


def new_partition(resume: object = None) -> UserPartition:
    return UserPartition(StateRules(), PairRules(), 14 * DAY_S, resume)


def test_invalid_messages_become_dead_letters_and_the_rest_applies() -> None:
    p = new_partition()
    msgs = events(3)
    msgs.insert(1, Msg(b"u1", b"{oops", 99))
    msgs.insert(2, Msg(b"zz", orjson.dumps({"event_id": "x", "user_id": "u1", "item_id": "i", "kind": "click", "ts": T0}), 100))
    msgs.append(Msg(b"u1", orjson.dumps({"event_id": "f", "user_id": "u1", "item_id": "i", "kind": "click",
                                         "ts": 1_800_000_000.0}), 101))
    batch = p.apply(msgs)
    assert batch.applied == 3 and batch.last_offset == 101 and batch.first_offset == 0
    assert [d.field for d in batch.dead_letters] == ["record", "key", "ts"]
    assert all(d.stage == "streams.users" for d in batch.dead_letters)
    assert UserState.from_bytes(batch.users["u1"]).events == 3
    assert set(batch.popularity) == {"i0", "i1", "i2"}


def test_snapshot_restore_then_same_events_give_same_bytes() -> None:
    a = new_partition()
    a.apply(events(10))
    snap = a.snapshot()
    rest = events(10, start=10)
    out_a = a.apply(rest)
    b = new_partition(snap)
    out_b = b.apply(rest)
    assert out_a.users == out_b.users and out_a.popularity == out_b.popularity
    assert out_a.first_seen == out_b.first_seen
    assert a.snapshot() == b.snapshot()
    # The snapshot is a copy: later batches do not change it.
    assert snap[1] != a.snapshot()[1]


def _event(eid: str, item: str, ts: float, kind: str = "view", offset: int = 0) -> Msg:
    return Msg(b"u1", orjson.dumps({"event_id": eid, "user_id": "u1", "item_id": item, "kind": kind, "ts": ts}), offset)


def test_first_seen_is_tracked_and_only_changes_are_written() -> None:
    p = new_partition()
    b1 = p.apply([_event("e1", "a", T0 + 10, "view", 0), _event("e2", "b", T0 + 20, "purchase", 1),
                  _event("e3", "a", T0 + 30, "cart", 2)])
    assert b1.first_seen == {"a": T0 + 10, "b": T0 + 20}  # any kind counts; the earliest time
    b2 = p.apply([_event("e4", "a", T0 + 40, "click", 3), _event("e5", "c", T0 + 50, "view", 4)])
    assert b2.first_seen == {"c": T0 + 50}  # a's later sighting changes nothing
    b3 = p.apply([_event("e6", "b", T0 + 1, "view", 5), _event("e6", "d", T0, "view", 6)])
    assert b3.first_seen == {"b": T0 + 1}  # a late event lowers it; the duplicate id is dropped
    assert p.popularity.first_seen == {"a": T0 + 10, "b": T0 + 1, "c": T0 + 50}


def test_snapshot_keeps_first_seen_and_refuses_an_older_format() -> None:
    a = new_partition()
    a.apply([_event("e1", "a", T0, "view", 0)])
    b = new_partition(a.snapshot())
    assert b.popularity.first_seen == {"a": T0}
    assert not b.apply([_event("e2", "a", T0 + 5, "view", 1)]).first_seen
    with pytest.raises(ValueError, match="v1 is not readable"):
        new_partition((1, {}, {}, 0.0, -1))  # v1 had no first-seen times


def test_catalog_partition_emits_only_changes() -> None:
    p = CatalogPartition()
    item = {"item_id": "i1", "title": "Mug"}
    batch = p.apply([
        Msg(b"i1", orjson.dumps(item), 0),
        Msg(b"i1", orjson.dumps(item | {"ts": 9.0}), 1),  # only ts differs: no change
        Msg(b"i2", orjson.dumps({"item_id": "i2", "title": "Lamp"}), 2),
        Msg(b"i2", orjson.dumps({"op": "delete", "item_id": "i2"}), 3),
        Msg(b"i3", orjson.dumps({"op": "delete", "item_id": "i3"}), 4),
        Msg(b"i4", orjson.dumps({"op": "upsert"}), 5),
    ])
    assert [r.item_id for r in batch.changed] == ["i1", "i2", "i2"]
    assert isinstance(batch.changed[-1], CatalogDelete)
    assert set(batch.upserts) == {"i1"} and batch.deletes == ["i2"]
    assert [d.field for d in batch.dead_letters] == ["item_id"]
    again = CatalogPartition(p.snapshot()).apply([Msg(b"i1", orjson.dumps(item), 6)])
    assert again.changed == [] and again.last_offset == 6


def test_unkeyed_events_go_to_dead_letter_with_the_keying_rule() -> None:
    p = new_partition()
    unkeyed = [Msg(None, m.value, m.offset) for m in events(4)]
    batch = p.apply(unkeyed)
    assert batch.applied == 0 and not batch.users and batch.last_offset == 3
    assert [d.field for d in batch.dead_letters] == ["key"] * 4
    assert all("no key" in d.reason and "keyed by user_id" in d.reason for d in batch.dead_letters)
    assert p.users() == {}


def test_unkeyed_catalog_records_go_to_dead_letter() -> None:
    p = CatalogPartition()
    batch = p.apply([Msg(None, orjson.dumps({"item_id": "i1", "title": "Mug"}), 0)])
    assert not batch.upserts and not batch.changed and len(p) == 0
    assert [d.field for d in batch.dead_letters] == ["key"] and "keyed by item_id" in batch.dead_letters[0].reason


def test_full_batch_is_the_whole_partition_state() -> None:
    p = new_partition()
    assert p.full_batch() is None  # nothing seen yet: nothing to rebuild
    p.apply(events(5, "u1"))
    p.apply(events(3, "u2", start=5))
    full = p.full_batch()
    assert full is not None and (full.topic, full.partition, full.last_offset) == ("ev", 0, 12)
    assert {u: UserState.from_bytes(b) for u, b in full.users.items()} == p.users()
    assert full.popularity == p.popularity.entries and full.first_seen == p.popularity.first_seen
    assert full.newest_ts == p.popularity.newest_ts
    # The snapshot carries topic and partition, so a resumed partition can rebuild before any message.
    again = new_partition(p.snapshot()).full_batch()
    assert again is not None and again.users == full.users and again.last_offset == 12


def test_catalog_full_batch_has_current_records_and_deletions() -> None:
    p = CatalogPartition()
    mug = {"item_id": "i1", "title": "Mug", "ts": 1.0}
    p.apply([
        Msg(b"i1", orjson.dumps(mug), 0),
        Msg(b"i2", orjson.dumps({"item_id": "i2", "title": "Lamp"}), 1),
        Msg(b"i1", orjson.dumps(mug | {"ts": 2.0}), 2),  # same content: Redis keeps the ts-1 record
        Msg(b"i2", orjson.dumps({"op": "delete", "item_id": "i2"}), 3),
    ])
    full = CatalogPartition(p.snapshot()).full_batch()
    assert full is not None and full.last_offset == 3 and (full.topic, full.partition) == ("ev", 0)
    assert full.upserts == {"i1": orjson.dumps({"op": "upsert", "item_id": "i1", "title": "Mug", "category": "",
                                                "description": "", "ts": 1.0})}
    assert full.deletes == ["i2"]
    p.apply([Msg(b"i2", orjson.dumps({"item_id": "i2", "title": "Lamp 2"}), 4)])
    again = p.full_batch()
    assert again is not None and set(again.upserts) == {"i1", "i2"} and again.deletes == []
    with pytest.raises(ValueError, match="v1 is not readable"):
        CatalogPartition((1, {}, -1))
