"""The one Redis adapter for user state and popularity (serving, learner and eval read here).

Keys, all under ``settings.redis_prefix`` and the hash tag ``{<topic>:<partition>}`` of
the events partition they belong to (with the default topic names
``freshrec:{freshrec.events:3}:...``; ``events`` below stands for the whole topic name), so
that the flow's one atomic write per batch touches keys of one Redis Cluster slot:

* ``{events:P}:user:<user_id>``: one :class:`~ranking.user_state.UserState` in its wire
  format (documented in :mod:`ranking.user_state`). P is the partition the user's events
  are produced to: murmur2 of the user id's UTF-8 bytes, positive, modulo the events
  topic's partition count (``settings.partitions``), the Java client's and kafka-python's
  default partitioner (:func:`user_partition`). A producer must key events by user id
  with that partitioner (librdkafka: ``partitioner=murmur2_random``; its own default,
  crc32, puts users elsewhere) and ``settings.partitions`` must be the topic's partition
  count, or readers look users up in the wrong partition and do not find them. The key is
  deleted when the flow forgets the shopper (``stream_retention_days``, :mod:`streams.retention`),
  in the same write; there is no TTL, since Redis must equal the flow's state at its offset.
* ``{events:P}:popularity``: hash item_id -> orjson ``[count, as_of_ts]``, the decayed
  purchase counts of the events of one Kafka partition; partial counters add exactly
  (:meth:`Popularity.merge`). ``{events:P}:popularity:newest`` maps ``events:P`` to
  the newest event time seen there.
* ``{events:P}:first_seen``: hash item_id -> the earliest event time of the item among
  that partition's events (a float in ``repr``); the item's first-seen time is the
  minimum over partitions (:func:`read_item_first_seen`).
* ``{events:P}:streams:applied:users``: hash ``events:P`` -> the offset of the last
  event whose effects are in Redis. :func:`write_partition_batch` moves it forward in the
  same atomic Lua call that writes the states, and refuses to move it backwards: that is
  the guard that makes the flow's writes idempotent under replay. The same call notices
  a Redis that is *behind* the flow (restarted empty) so the flow rewrites its full state.
* ``{events:P}:streams:epoch``: hash topic -> the Kafka topic id those offsets belong to
  (:mod:`stores.redis_client`); a write for another id is refused.

Readers of everyone's data (applied offsets, popularity, first-seen times) read each
partition's keys, pipelined: one command per partition and so per slot, for partitions
``0 .. settings.partitions - 1``.

**Layout migration.** Before the hash tags these keys had no ``{events:P}`` part
(``freshrec:user:<id>``, ``freshrec:streams:applied:users``, ...). A deployment of the
old layout should run ``freshrec reset`` and replay its events. Nothing mixes silently if
it does not: the new applied-offset hashes start empty, so a flow resuming from a
snapshot finds Redis *behind* it (:data:`Outcome.BEHIND`) and rewrites its whole state
under the new keys, and a flow without one replays the topic; the old keys are never
read again and only take memory until ``freshrec reset`` removes them.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import orjson
import redis
from kafka.partitioner.default import murmur2

from freshrec.settings import Settings
from ranking.user_state import DAY_S, Popularity, UserState, merge_first_seen

from .redis_client import EPOCH_LUA, EPOCHS, Outcome, connect, outcome_of, run_script

__all__ = [
    "connect", "read_user_state", "read_user_states", "write_user_states", "write_partition_batch",
    "read_applied_offsets", "read_popularity", "read_item_first_seen", "read_fresh_popularity",
    "FreshPopularity", "user_key", "user_partition", "partition_key", "scan_user_ids", "read_applied_offset",
    "epoch_slots", "Outcome",
]

APPLIED_USERS = "streams:applied:users"
POPULARITY = "popularity"
POPULARITY_NEWEST = "popularity:newest"
FIRST_SEEN = "first_seen"
USER = "user:"

# KEYS: applied hash, popularity hash, popularity-newest hash, first-seen hash, epoch
#       hash, then one key per written user, then one key per forgotten user.
# ARGV: partition field, offset, newest ts, user count, popularity field count,
#       first-seen field count, previous offset, epoch field, epoch, forgotten-user count,
#       forgotten-popularity count, forgotten-item count, then user values (in KEYS
#       order), then popularity field/value pairs, then first-seen field/value pairs, then
#       the items whose popularity entry goes, then the items whose popularity entry and
#       first-seen time go (streams.retention: what the partition forgot).
# Returns {code, stored epoch}: 1 written; 0 this offset is already in Redis (a replay
# after a crash); 2 Redis is behind the writer's state before this batch (it holds less
# than `previous offset`: restarted empty, or lost its last writes), nothing written;
# -1 Redis holds another epoch of the topic, nothing written.
_GUARDED_WRITE = EPOCH_LUA + """
local ok, stored = epoch_ok(KEYS[5], ARGV[8], ARGV[9], KEYS[1], ARGV[1])
if not ok then return {-1, stored} end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and tonumber(cur) >= tonumber(ARGV[2]) then return {0, ''} end
local prev = tonumber(ARGV[7])
if prev >= 0 and (not cur or tonumber(cur) < prev) then return {2, ''} end
local n_users = tonumber(ARGV[4])
local n_pop = tonumber(ARGV[5])
local n_seen = tonumber(ARGV[6])
local n_gone_users = tonumber(ARGV[10])
local n_gone_pop = tonumber(ARGV[11])
local n_gone_items = tonumber(ARGV[12])
for i = 1, n_users do redis.call('SET', KEYS[5 + i], ARGV[12 + i]) end
for i = 1, n_gone_users do redis.call('DEL', KEYS[5 + n_users + i]) end
local base = 12 + n_users
for j = 0, n_pop - 1 do
  redis.call('HSET', KEYS[2], ARGV[base + 2 * j + 1], ARGV[base + 2 * j + 2])
end
base = base + 2 * n_pop
for j = 0, n_seen - 1 do
  redis.call('HSET', KEYS[4], ARGV[base + 2 * j + 1], ARGV[base + 2 * j + 2])
end
base = base + 2 * n_seen
for j = 1, n_gone_pop do redis.call('HDEL', KEYS[2], ARGV[base + j]) end
base = base + n_gone_pop
for j = 1, n_gone_items do redis.call('HDEL', KEYS[2], ARGV[base + j]); redis.call('HDEL', KEYS[4], ARGV[base + j]) end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {1, ''}
"""
_GUARDED_WRITE_SHA = hashlib.sha1(_GUARDED_WRITE.encode()).hexdigest()

# The partition's whole state replacing whatever Redis holds of it (same KEYS and ARGV
# as above, previous offset unused): popularity and first-seen hashes are rebuilt from
# scratch, every user of the partition is overwritten. Still refuses an offset Redis
# already holds, and another epoch.
_FULL_WRITE = _GUARDED_WRITE.replace(
    "local prev = tonumber(ARGV[7])\nif prev >= 0 and (not cur or tonumber(cur) < prev) then return {2, ''} end\n",
    "redis.call('DEL', KEYS[2], KEYS[4])\n",
)
assert _FULL_WRITE != _GUARDED_WRITE
_FULL_WRITE_SHA = hashlib.sha1(_FULL_WRITE.encode()).hexdigest()


def user_partition(settings: Settings, user_id: str) -> int:
    """The events partition a user's events are produced to, so the one whose keys hold
    the user: murmur2 of the id's UTF-8 bytes, made positive, modulo ``settings.partitions``
    (the Java client's default partitioner, which kafka-python's producer follows)."""
    return _murmur2_partition(user_id, settings.partitions)


@functools.lru_cache(maxsize=1 << 16)
def _murmur2_partition(user_id: str, partitions: int) -> int:
    # kafka-python's murmur2 is pure Python (~2.5 us); a ranked /recommend asks it for ~50
    # neighbours, mostly the same popular shoppers again: a bounded memo of a pure function.
    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


def partition_key(settings: Settings, topic: str, partition: int, name: str) -> str:
    """The key ``name`` of one events partition: ``<prefix>{<topic>:<partition>}:<name>``.

    The braces are Redis Cluster's hash tag: every key of a partition lies in one slot.
    """
    if "{" in settings.redis_prefix or "}" in settings.redis_prefix:
        raise ValueError(
            f"redis_prefix {settings.redis_prefix!r} must not contain braces: they would become the Redis Cluster "
            "hash tag and put every key in one slot"
        )
    return f"{settings.redis_prefix}{{{topic}:{partition}}}:{name}"


def user_key(settings: Settings, user_id: str) -> str:
    """The key of a user's state, in the partition :func:`user_partition` names."""
    return partition_key(settings, settings.topics.events, user_partition(settings, user_id), USER + user_id)


def partition_field(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def scan_user_ids(client: redis.Redis, settings: Settings, count: int = 2000) -> list[str]:
    """Every user with a state in Redis (SCAN, on a cluster node by node). For tools and tests."""
    marker = f"}}:{USER}"
    pattern = _glob_escape(settings.redis_prefix) + "{*}:" + USER + "*"
    return sorted({k.decode().split(marker, 1)[1] for k in client.scan_iter(match=pattern, count=count)})


def epoch_slots(settings: Settings, topic: str | None = None) -> list[tuple[str, str]]:
    """``(epoch hash, applied-offsets hash)`` of each partition of the events topic (or ``topic``)."""
    topic = topic or settings.topics.events
    return [
        (partition_key(settings, topic, p, EPOCHS), partition_key(settings, topic, p, APPLIED_USERS))
        for p in range(settings.partitions)
    ]


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def read_user_state(client: redis.Redis, settings: Settings, user_id: str) -> UserState | None:
    """The user's current state, or None for a user the flow has not seen."""
    raw = client.get(user_key(settings, user_id))
    return None if raw is None else UserState.from_bytes(raw)


def read_user_states(client: redis.Redis, settings: Settings, user_ids: Iterable[str]) -> dict[str, UserState]:
    """States of the given users in one round trip; unknown users are left out."""
    ids = list(dict.fromkeys(user_ids))
    if not ids:
        return {}
    raws = client.mget([user_key(settings, u) for u in ids])
    return {u: UserState.from_bytes(raw) for u, raw in zip(ids, raws, strict=True) if raw is not None}


def write_user_states(client: redis.Redis, settings: Settings, states: Iterable[UserState], batch: int = 1000) -> int:
    """Overwrite the given users' states, pipelined; return how many were written.

    Unguarded: for tools and tests. The flow writes through :func:`write_partition_batch`.
    """
    n = 0
    pipe = client.pipeline(transaction=False)
    for state in states:
        pipe.set(user_key(settings, state.user_id), state.to_bytes())
        n += 1
        if n % batch == 0:
            pipe.execute()
    pipe.execute()
    return n


def write_partition_batch(
    client: redis.Redis,
    settings: Settings,
    topic: str,
    partition: int,
    offset: int,
    users: Mapping[str, bytes],
    popularity: Mapping[str, tuple[float, float]],
    newest_ts: float,
    first_seen: Mapping[str, float] | None = None,
    *,
    prev_offset: int = -1,
    epoch: str | None = None,
    full: bool = False,
    gone_users: Iterable[str] = (),
    gone_popularity: Iterable[str] = (),
    gone_items: Iterable[str] = (),
) -> Outcome:
    """Write one partition's changed users, popularity and first-seen times as of ``offset``, atomically.

    ``first_seen`` holds the items whose first-seen time in this partition changed
    (``UserBatch.first_seen``). Skipped (:data:`Outcome.HELD`, false) if Redis already
    holds this partition at ``offset`` or later: after a crash the flow recomputes the same
    states from its snapshot and replays the same events, so those writes would only move
    Redis back in time.

    ``prev_offset`` is the writer's offset before this batch: if Redis holds less (lost
    data), nothing is written and :data:`Outcome.BEHIND` asks for a ``full=True`` write of
    the partition's whole state, which replaces its popularity and first-seen hashes and
    overwrites every given user. ``epoch`` is the topic's id (:mod:`freshrec.epochs`): a
    Redis holding another one raises :class:`~freshrec.epochs.EpochMismatch`; a Redis
    without one records it.

    ``gone_users``, ``gone_popularity`` and ``gone_items`` are what the partition forgot
    (:mod:`streams.retention`): the users' keys, the items' popularity entries, and the
    items' popularity entries with their first-seen times are deleted in the same call,
    so Redis forgets exactly what the flow forgot at this offset. None may also be among
    the written ones (the partition keeps them disjoint).
    """
    gone_users, gone_popularity, gone_items = list(gone_users), list(gone_popularity), list(gone_items)
    seen = first_seen or {}
    field = partition_field(topic, partition)
    keys = [
        partition_key(settings, topic, partition, name)
        for name in (APPLIED_USERS, POPULARITY, POPULARITY_NEWEST, FIRST_SEEN, EPOCHS)
    ]
    # The users of this partition, under its tag: the partition the events came from is
    # the one readers compute (user_partition) when producers follow the keying rule.
    keys.extend(partition_key(settings, topic, partition, USER + u) for u in users)
    keys.extend(partition_key(settings, topic, partition, USER + u) for u in gone_users)
    args: list[bytes | str | int | float] = [
        field, offset, repr(newest_ts), len(users), len(popularity), len(seen), prev_offset, topic, epoch or "",
        len(gone_users), len(gone_popularity), len(gone_items),
    ]
    args.extend(users.values())
    for item, entry in popularity.items():
        args.append(item)
        args.append(orjson.dumps(entry))
    for item, ts in seen.items():
        args.append(item)
        args.append(repr(float(ts)))
    args.extend(gone_popularity)
    args.extend(gone_items)
    script, sha = (_FULL_WRITE, _FULL_WRITE_SHA) if full else (_GUARDED_WRITE, _GUARDED_WRITE_SHA)
    reply = run_script(client, script, sha, keys, args)
    return outcome_of(reply, "streams.users", settings, topic, epoch, keys[4])


def read_applied_offsets(client: redis.Redis, settings: Settings, topic: str | None = None) -> dict[str, int]:
    """``<topic>:<partition>`` -> offset of the last event reflected in Redis, for each
    partition of the events topic (or ``topic``) that has one; one pipelined HGET per partition."""
    topic = topic or settings.topics.events
    fields = [partition_field(topic, p) for p in range(settings.partitions)]
    pipe = client.pipeline(transaction=False)
    for p, field in enumerate(fields):
        pipe.hget(partition_key(settings, topic, p, APPLIED_USERS), field)
    return {field: int(raw) for field, raw in zip(fields, pipe.execute(), strict=True) if raw is not None}


@dataclass(frozen=True, slots=True)
class FreshPopularity:
    """Fresh popularity and first-seen times, read together (what serving's cache holds).

    ``scores`` are decayed to ``newest_ts``, the newest event time any partition has
    seen: the "now" in event time against which serving also judges what is new.
    """

    scores: dict[str, float]
    first_seen: dict[str, float]
    newest_ts: float


def read_popularity(client: redis.Redis, settings: Settings) -> dict[str, float]:
    """Everyone's purchase counts per item, decayed (half-life ``popularity_half_life_days``)
    to the newest event time the flow has seen."""
    return _read_popularity(client, settings, with_first_seen=False).scores


def read_item_first_seen(client: redis.Redis, settings: Settings) -> dict[str, float]:
    """Per item, the event time of its first event the flow has applied (any kind)."""
    return _read_popularity(client, settings, with_first_seen=True, with_scores=False).first_seen


def read_fresh_popularity(client: redis.Redis, settings: Settings) -> FreshPopularity:
    """:func:`read_popularity` and :func:`read_item_first_seen` in one round trip, with the "now" they share."""
    return _read_popularity(client, settings, with_first_seen=True)


def _read_popularity(
    client: redis.Redis, settings: Settings, with_first_seen: bool, with_scores: bool = True
) -> FreshPopularity:
    topic = settings.topics.events
    hashes = ([POPULARITY] if with_scores else []) + ([FIRST_SEEN] if with_first_seen else [])
    # One round trip: per partition its newest time and the wanted hashes (commands of
    # one slot each); a partition without a newest time has seen nothing yet.
    pipe = client.pipeline(transaction=False)
    for p in range(settings.partitions):
        pipe.hget(partition_key(settings, topic, p, POPULARITY_NEWEST), partition_field(topic, p))
        for name in hashes:
            pipe.hgetall(partition_key(settings, topic, p, name))
    replies = pipe.execute()
    width = 1 + len(hashes)
    # A fixed merge order (by field, like the sorted hash fields of the old layout) makes
    # the float sums, and so the result, identical whatever the order of the replies.
    parts = sorted(
        (partition_field(topic, p), replies[width * p : width * (p + 1)])
        for p in range(settings.partitions)
        if replies[width * p] is not None
    )
    if not parts:
        return FreshPopularity({}, {}, 0.0)
    now = max(float(row[0]) for _, row in parts)
    scores: dict[str, float] = {}
    if with_scores:
        counts = [{item.decode(): tuple(orjson.loads(v)) for item, v in row[1].items()} for _, row in parts]
        merged = Popularity.merge(counts, settings.popularity_half_life_days * DAY_S, newest_ts=now)  # type: ignore[arg-type]
        scores = merged.scores()
    first_seen: dict[str, float] = {}
    if with_first_seen:
        first_seen = merge_first_seen({item.decode(): float(v) for item, v in row[-1].items()} for _, row in parts)
    return FreshPopularity(scores, first_seen, now)


def read_applied_offset(client: redis.Redis, settings: Settings, topic: str, partition: int) -> int | None:
    """The offset of the partition's last event reflected in Redis; None if Redis has none."""
    raw = client.hget(partition_key(settings, topic, partition, APPLIED_USERS), partition_field(topic, partition))
    return None if raw is None else int(raw)
