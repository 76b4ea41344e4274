"""The Redis Cluster key layout and the cluster URL, without a Redis.

Every key one guarded Lua call touches must hash to one slot (Redis Cluster refuses a
script over keys of several slots: CROSSSLOT), and readers must find a user in the
partition the producer put the user's events in.
"""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from freshrec.redis_url import cluster_nodes, is_cluster_url
from freshrec.settings import Settings
from stores import catalog_store, user_store
from stores.redis_client import EPOCHS


def _slot(key: str) -> int:
    return key_slot(key.encode())


def test_user_partition_is_the_java_default_partitioner() -> None:
    # Kafka's own test vectors for Utils.murmur2 (signed in Java), then toPositive % n.
    from kafka.partitioner.default import murmur2

    java = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536, b"abc": 479470107}
    for key, signed in java.items():
        assert murmur2(key) & 0xFFFFFFFF == signed & 0xFFFFFFFF
    s = Settings(partitions=7)
    for key, signed in java.items():
        assert user_store.user_partition(s, key.decode()) == (signed & 0x7FFFFFFF) % 7
    assert user_store.user_partition(s, "shopper-é") == (murmur2("shopper-é".encode()) & 0x7FFFFFFF) % 7


def test_every_key_of_one_partition_write_lies_in_one_slot() -> None:
    s = Settings(partitions=8, redis_prefix="shop1:")
    topic = s.topics.events
    for p in range(s.partitions):
        users = [u for u in (f"user-{k}" for k in range(400)) if user_store.user_partition(s, u) == p]
        assert users
        names = [user_store.APPLIED_USERS, user_store.POPULARITY, user_store.POPULARITY_NEWEST, user_store.FIRST_SEEN, EPOCHS]
        keys = [user_store.partition_key(s, topic, p, n) for n in names]
        keys += [user_store.user_key(s, u) for u in users]  # what readers look up
        assert {_slot(k) for k in keys} == {_slot(keys[0])}, p
        assert all(k.startswith("shop1:{" + f"{topic}:{p}" + "}:") for k in keys)
    # The partitions spread over slots (8 partitions: 8 slots).
    assert len({_slot(user_store.partition_key(s, topic, p, "x")) for p in range(8)}) == 8
    assert [e for e, _ in user_store.epoch_slots(s)] == [user_store.partition_key(s, topic, p, EPOCHS) for p in range(8)]


def test_catalog_keys_share_one_slot() -> None:
    s = Settings(redis_prefix="shop1:")
    (epoch, applied), = catalog_store.epoch_slots(s)
    keys = [epoch, applied, catalog_store.catalog_key(s, catalog_store.CATALOG)]
    assert {_slot(k) for k in keys} == {_slot("{catalog}")}


def test_a_prefix_with_braces_is_refused() -> None:
    with pytest.raises(ValueError, match="braces"):
        user_store.user_key(Settings(redis_prefix="a{b}:"), "u1")


def test_cluster_urls() -> None:
    assert is_cluster_url("redis+cluster://127.0.0.1:7000") and is_cluster_url("rediss+cluster://h:1")
    assert not is_cluster_url("redis://127.0.0.1:6379/0")
    assert cluster_nodes("redis+cluster://u:p@10.0.0.1:7000,10.0.0.2:7001/0") == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    with pytest.raises(ValueError, match="database 0"):
        cluster_nodes("redis+cluster://h:7000/3")
    with pytest.raises(ValueError, match="host:port"):
        cluster_nodes("redis+cluster://h")


def test_collab_keys_share_one_slot() -> None:
    from stores import collab_store as c

    s = Settings(redis_prefix="shop1:")
    names = [c.META, c.ITEMS, *c.POP.values(), c.FIRST_SEEN, c.SHOPVEC, c.ORDER]
    keys = [s.redis_prefix + n for n in names] + [c.cop_key(s, f"item-{k}") for k in range(50)]
    assert {_slot(k) for k in keys} == {_slot("{collab}")}
