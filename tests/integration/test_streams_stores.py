"""The Redis adapters of streams/ against the real Redis: round trips, the offset guard."""

from __future__ import annotations

import pytest

from freshrec.contracts import CatalogItem, Event
from freshrec.settings import Settings
from stores import catalog_store, user_store
from ranking.user_state import DAY_S, Popularity, UserState, apply_event

pytestmark = pytest.mark.integration
T0 = 1_300_000_000.0


def _at(settings: Settings, user: str) -> int:
    """The partition whose keys hold ``user`` (the keying rule): the flow writes a user there."""
    return user_store.user_partition(settings, user)


def _state(user: str, *items: str) -> UserState:
    s = UserState(user)
    for i, item in enumerate(items):
        apply_event(s, Event(event_id=f"{user}:{i}", user_id=user, item_id=item, kind="purchase", ts=T0 + i))
    return s


def test_user_states_round_trip(fresh_settings: Settings) -> None:
    client = user_store.connect(fresh_settings)
    states = [_state("u1", "a", "b"), _state("u2", "c")]
    assert user_store.write_user_states(client, fresh_settings, states) == 2
    assert user_store.read_user_state(client, fresh_settings, "u1") == states[0]
    assert user_store.read_user_state(client, fresh_settings, "nobody") is None
    got = user_store.read_user_states(client, fresh_settings, ["u2", "nobody", "u1"])
    assert got == {"u1": states[0], "u2": states[1]}
    assert user_store.read_user_states(client, fresh_settings, []) == {}


def test_partition_write_is_guarded_by_offset(fresh_settings: Settings) -> None:
    client = user_store.connect(fresh_settings)
    ev = fresh_settings.topics.events
    s = _state("u1", "a")
    p1 = _at(fresh_settings, "u1")
    pop = Popularity(fresh_settings.popularity_half_life_days * DAY_S)
    pop.add("a", 1.0, T0)
    ok = user_store.write_partition_batch(
        client, fresh_settings, ev, p1, 10, {"u1": s.to_bytes()}, pop.entries, pop.newest_ts
    )
    assert ok
    older = _state("u1")
    # A replay of an offset already in Redis must not move the state back.
    for offset in (5, 10):
        assert not user_store.write_partition_batch(
            client, fresh_settings, ev, p1, offset, {"u1": older.to_bytes()}, {}, T0
        )
    assert user_store.read_user_state(client, fresh_settings, "u1") == s
    assert user_store.read_applied_offsets(client, fresh_settings) == {f"{ev}:{p1}": 10}
    # Another partition has its own offset.
    other = next(u for u in (f"u{k}" for k in range(2, 99)) if _at(fresh_settings, u) != p1)
    half_life = fresh_settings.popularity_half_life_days * DAY_S
    assert user_store.write_partition_batch(
        client, fresh_settings, ev, _at(fresh_settings, other), 3, {other: _state(other, "a").to_bytes()},
        {"a": (1.0, T0 + half_life)}, T0 + half_life,
    )
    assert user_store.scan_user_ids(client, fresh_settings) == sorted(["u1", other])
    pops = user_store.read_popularity(client, fresh_settings)
    # Partition 0 counted 1 at T0 (half a unit one half-life later), partition 1 counted 1 then.
    assert pops["a"] == pytest.approx(1.5)


def test_first_seen_written_with_the_batch_under_the_same_guard(fresh_settings: Settings) -> None:
    client = user_store.connect(fresh_settings)
    ev = fresh_settings.topics.events
    assert user_store.read_item_first_seen(client, fresh_settings) == {}
    pop = {"a": (1.0, T0 + 5)}
    assert user_store.write_partition_batch(client, fresh_settings, ev, 0, 10, {}, pop, T0 + 5, {"a": T0 + 5, "b": T0})
    # A replayed offset must not write its first-seen times either.
    assert not user_store.write_partition_batch(client, fresh_settings, ev, 0, 10, {}, {}, T0, {"a": T0 - 99, "z": T0})
    # Another partition saw a earlier and c only: the item's time is the minimum over partitions.
    assert user_store.write_partition_batch(client, fresh_settings, ev, 1, 0, {}, {}, T0 + 40 * DAY_S, {"a": T0 + 1, "c": T0 + 9})
    want = {"a": T0 + 1, "b": T0, "c": T0 + 9}
    assert user_store.read_item_first_seen(client, fresh_settings) == want
    fresh = user_store.read_fresh_popularity(client, fresh_settings)
    assert fresh.first_seen == want and fresh.newest_ts == T0 + 40 * DAY_S
    assert fresh.scores == user_store.read_popularity(client, fresh_settings)


def test_catalog_round_trip_and_guard(fresh_settings: Settings) -> None:
    client = user_store.connect(fresh_settings)
    items = [CatalogItem(item_id="i1", title="Mug", price=3.5), CatalogItem(item_id="i2", title="Lamp")]
    assert catalog_store.write_items(client, fresh_settings, items) == 2
    assert catalog_store.read_items(client, fresh_settings, ["i2", "zz"]) == {"i2": items[1]}
    assert catalog_store.all_items(client, fresh_settings) == {"i1": items[0], "i2": items[1]}
    assert catalog_store.read_titles(client, fresh_settings, ["i1"]) == {"i1": "Mug"}
    assert catalog_store.delete_items(client, fresh_settings, ["i1", "nope"]) == 1
    new = CatalogItem(item_id="i3", title="Cup")
    assert catalog_store.apply_partition_batch(client, fresh_settings, "cat:0", 4, {"i3": new.to_bytes()}, ["i2"])
    assert not catalog_store.apply_partition_batch(client, fresh_settings, "cat:0", 4, {}, ["i3"])
    assert catalog_store.all_items(client, fresh_settings) == {"i3": new}
    assert catalog_store.read_applied_offsets(client, fresh_settings) == {"cat:0": 4}


def test_a_write_past_a_redis_that_lost_data_is_refused_until_the_full_state_comes(fresh_settings: Settings) -> None:
    from stores.redis_client import Outcome

    client = user_store.connect(fresh_settings)
    s = fresh_settings
    ev, p = s.topics.events, _at(s, "u1")
    u2 = next(u for u in (f"u{k}" for k in range(2, 99)) if _at(s, u) == p)  # a second user of that partition
    a, b = _state("u1", "a"), _state(u2, "b")
    assert user_store.write_partition_batch(client, s, ev, p, 4, {"u1": a.to_bytes()}, {"a": (1.0, T0)}, T0,
                                            {"a": T0}, prev_offset=-1, epoch="E1") is Outcome.WRITTEN
    client.delete(user_store.partition_key(s, ev, p, user_store.APPLIED_USERS))  # Redis lost the offset (and more)
    got = user_store.write_partition_batch(client, s, ev, p, 9, {u2: b.to_bytes()}, {}, T0, prev_offset=4, epoch="E1")
    assert got is Outcome.BEHIND and not got and user_store.read_user_state(client, s, u2) is None
    # The full state replaces the partition's popularity and first-seen hashes (stale "zz" goes).
    popularity = user_store.partition_key(s, ev, p, user_store.POPULARITY)
    client.hset(popularity, "zz", b"[9.0, 0.0]")
    full = user_store.write_partition_batch(
        client, s, ev, p, 9, {"u1": a.to_bytes(), u2: b.to_bytes()}, {"a": (1.0, T0), "b": (1.0, T0)}, T0,
        {"a": T0, "b": T0}, epoch="E1", full=True,
    )
    assert full is Outcome.WRITTEN
    assert user_store.read_user_states(client, s, ["u1", u2]) == {"u1": a, u2: b}
    assert set(client.hkeys(popularity)) == {b"a", b"b"}
    assert user_store.read_applied_offset(client, s, ev, p) == 9
    # A full write of an offset Redis already holds is refused like any replay.
    assert user_store.write_partition_batch(client, s, ev, p, 9, {}, {}, T0, epoch="E1", full=True) is Outcome.HELD


def test_writes_of_another_epoch_or_over_unvouched_offsets_are_refused(fresh_settings: Settings) -> None:
    from freshrec.epochs import EpochMismatch

    client = user_store.connect(fresh_settings)
    s = fresh_settings
    assert user_store.write_partition_batch(client, s, "ev", 0, 1, {}, {}, T0, epoch="E1")
    with pytest.raises(EpochMismatch, match="recreated") as err:
        user_store.write_partition_batch(client, s, "ev", 0, 2, {}, {}, T0, epoch="E2")
    assert err.value.stored == "E1" and err.value.current == "E2"
    assert user_store.read_applied_offsets(client, s, "ev") == {"ev:0": 1}
    # Offsets written without an epoch (before epochs existed) cannot be vouched for.
    assert user_store.write_partition_batch(client, s, "old", 0, 7, {}, {}, T0)
    with pytest.raises(EpochMismatch, match="unknown"):
        user_store.write_partition_batch(client, s, "old", 0, 8, {}, {}, T0, epoch="E3")
    assert catalog_store.apply_partition_batch(client, s, "cat:0", 1, {}, [], epoch="C1")
    with pytest.raises(EpochMismatch):
        catalog_store.apply_partition_batch(client, s, "cat:0", 2, {}, [], epoch="C2")


def test_catalog_full_write_restores_items_and_removes_deleted_ones(fresh_settings: Settings) -> None:
    from stores.redis_client import Outcome

    client = user_store.connect(fresh_settings)
    s = fresh_settings
    mug, lamp = CatalogItem(item_id="i1", title="Mug"), CatalogItem(item_id="i2", title="Lamp")
    catalog_store.write_items(client, s, [mug, lamp])  # i2 survived in Redis, though the flow deleted it
    assert catalog_store.apply_partition_batch(client, s, "cat:0", 5, {}, [], prev_offset=3) is Outcome.BEHIND
    assert catalog_store.apply_partition_batch(
        client, s, "cat:0", 5, {"i1": mug.to_bytes()}, ["i2"], prev_offset=-1, full=True
    ) is Outcome.WRITTEN
    assert catalog_store.all_items(client, s) == {"i1": mug}
    assert catalog_store.read_applied_offset(client, s, "cat:0") == 5
