"""Bounded users-flow state (issue 16 item 7): what a partition forgets, and that it replays identically."""

from __future__ import annotations

import pickle
import random
import orjson

from ranking.pairs import PairRules
from ranking.user_state import DAY_S, StateRules, UserState
from streams.retention import Recency, popularity_to_cut
from streams.user_partition import UserPartition
from tests.unit.test_streams_partition import Msg

T0 = 1_300_000_000.0


def msg(offset: int, user: str, item: str, ts: float, kind: str = "purchase") -> Msg:
    body = {"event_id": f"e{offset}", "user_id": user, "item_id": item, "kind": kind, "ts": ts}
    return Msg(user.encode(), orjson.dumps(body), offset)


def partition(resume: object = None, retention_days: float = 30.0, items: int = 100_000, live: int = 10_000) -> UserPartition:
    return UserPartition(StateRules(), PairRules(), 7 * DAY_S, resume, 1_000_000, retention_days * DAY_S, items, live)


def test_recency_expires_least_recently_touched_first_and_keeps_the_newer_time() -> None:
    r = Recency()
    r.touch("a", 10.0)
    r.touch("b", 20.0)
    r.touch("a", 5.0)  # a late event: a moves to the end but keeps its newer time 10
    assert r.last == {"b": 20.0, "a": 10.0}
    assert list(r.expired(15.0)) == []  # b is first and still within: nothing behind it goes yet
    assert list(r.expired(25.0)) == ["b", "a"]
    assert len(r) == 0


def test_popularity_cut_keeps_the_largest_decayed_magnitudes() -> None:
    day = DAY_S
    entries = {"old": (8.0, 0.0), "new": (2.0, 3 * day), "neg": (-3.0, 3 * day), "tie": (2.0, 3 * day)}
    # At 3 days with a 1-day half-life "old" decays to 1.0: the smallest magnitude.
    assert popularity_to_cut(entries, 3 * day, day, 3) == ["old"]
    cut = popularity_to_cut(entries, 3 * day, day, 2)
    assert sorted(cut) == ["old", "tie"]  # neg (3) and new (2, before tie by id) stay
    assert popularity_to_cut(entries, 3 * day, day, 4) == []


def test_silent_shoppers_and_items_are_forgotten_and_the_batch_says_so() -> None:
    p = partition(retention_days=30)
    first = p.apply([msg(0, "old", "x", T0), msg(1, "keep", "y", T0 + 20 * DAY_S)])
    assert set(first.users) == {"old", "keep"} and not first.gone_users
    # 31 days after "old"'s only event: old and its item x go, keep and y stay.
    b = p.apply([msg(2, "new", "z", T0 + 31 * DAY_S)])
    assert b.gone_users == {"old"} and b.gone_items == {"x"}
    assert set(p.users()) == {"keep", "new"}
    assert "x" not in p.popularity.entries and "x" not in p.popularity.first_seen
    assert set(p.popularity.first_seen) == {"y", "z"}
    # A forgotten shopper who comes back starts afresh; the item is new again.
    back = p.apply([msg(3, "old", "x", T0 + 32 * DAY_S)])
    assert UserState.from_bytes(back.users["old"]).events == 1
    assert back.first_seen == {"x": T0 + 32 * DAY_S} and not back.gone_users


def test_forgotten_and_back_within_one_batch_still_drops_the_old_popularity_entry() -> None:
    p = partition(retention_days=30)
    p.apply([msg(0, "a", "x", T0)])
    b = p.apply([msg(1, "b", "y", T0 + 40 * DAY_S), msg(2, "a", "x", T0 + 41 * DAY_S, kind="view")])
    # a and x were forgotten at offset 1 and came back at offset 2 (a view: no popularity).
    assert "a" in b.users and "a" not in b.gone_users
    assert b.first_seen["x"] == T0 + 41 * DAY_S and "x" not in b.gone_items
    assert "x" in b.gone_popularity and "x" not in p.popularity.entries


def _stream(n: int, seed: int) -> list[Msg]:
    """n events over ~400 days from 300 shoppers of uneven activity, over 80 items."""
    rng = random.Random(seed)
    out, ts = [], T0
    for k in range(n):
        ts += rng.expovariate(1 / (400 * DAY_S / n))
        user = f"u{int(rng.paretovariate(1.2)) % 300}"
        out.append(msg(k, user, f"i{rng.randrange(80)}", ts, rng.choice(["view", "view", "purchase"])))
    return out


def test_forgetting_does_not_depend_on_batching_or_on_a_restart_in_between() -> None:
    stream = _stream(3000, seed=3)
    one = partition(retention_days=20, items=30)
    whole = one.apply(stream)
    assert whole.gone_users and whole.gone_popularity  # the rules did fire
    many = partition(retention_days=20, items=30)
    cut = 1234
    for k in range(0, cut, 97):
        many.apply(stream[k : min(k + 97, cut)])
    restored = partition(pickle.loads(pickle.dumps(many.snapshot())), retention_days=20, items=30)
    for k in range(cut, len(stream), 211):
        restored.apply(stream[k : k + 211])
    assert restored.snapshot() == one.snapshot()


def test_state_is_bounded_by_the_active_shoppers_and_items() -> None:
    """10,000 shoppers arriving over two years, each active for a few days: the partition
    holds only those active within the retention, and the snapshot shrinks accordingly."""
    events, ts = [], T0
    for k in range(10_000):
        ts += 0.07 * DAY_S  # ~14 new shoppers a day
        for j in range(3):
            events.append(msg(len(events), f"s{k}", f"i{(k + j) % 5000}", ts + j * DAY_S))
    bounded, unbounded = partition(retention_days=30, items=500), partition(retention_days=0)
    for k in range(0, len(events), 2000):
        bounded.apply(events[k : k + 2000])
        unbounded.apply(events[k : k + 2000])
    # Within 30 days + 2 days of activity: at most ~32 / 0.07 = 457 shoppers.
    assert len(bounded.users()) <= 32 / 0.07 + 1
    assert len(unbounded.users()) == 10_000
    assert len(bounded.popularity.entries) <= 500 + 3 * 14  # cut once a day; a day adds ~42
    assert len(bounded.popularity.first_seen) <= 3 * (32 / 0.07 + 1)
    assert len(bounded._live) <= 10_000
    size = len(pickle.dumps(bounded.snapshot()))
    assert size * 10 < len(pickle.dumps(unbounded.snapshot()))


def test_decoded_states_are_a_bounded_cache() -> None:
    p = partition(live=5)
    p.apply([msg(k, f"u{k}", "x", T0 + k) for k in range(20)])
    assert len(p._live) == 5 and len(p.users()) == 20
    assert p.state("u0") is not None and p.state("u0").events == 1  # decoded again from its bytes


def test_a_v3_snapshot_is_read_with_orders_rebuilt() -> None:
    p = partition(retention_days=30)
    p.apply([msg(0, "a", "x", T0), msg(1, "b", "y", T0 + 10 * DAY_S)])
    v4 = p.snapshot()
    v3 = (3, *v4[1:9])
    q = partition(v3, retention_days=30)
    assert list(q.user_recency.last) == ["a", "b"]
    assert q.item_recency.last == {"x": T0 + 10 * DAY_S, "y": T0 + 10 * DAY_S}
    b = q.apply([msg(2, "c", "z", T0 + 35 * DAY_S)])
    assert b.gone_users == {"a"} and not b.gone_items  # items only after a whole retention from the migration
