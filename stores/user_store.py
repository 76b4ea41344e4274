"""The one Redis adapter for user state and popularity (serving, learner and eval read here).

Keys, all under ``settings.redis_prefix``:

* ``user:<user_id>``: one :class:`~ranking.user_state.UserState` in its wire format
  (documented in :mod:`ranking.user_state`).
* ``popularity:<topic>:<partition>``: hash item_id -> orjson ``[count, as_of_ts]``, the
  decayed purchase counts of the events of one Kafka partition; partial counters add
  exactly (:meth:`Popularity.merge`). ``popularity:newest`` maps the same
  ``<topic>:<partition>`` to the newest event time seen there.
* ``first_seen:<topic>:<partition>``: hash item_id -> the earliest event time of the
  item among that partition's events (a float in ``repr``); the item's first-seen time
  is the minimum over partitions (:func:`read_item_first_seen`).
* ``streams:applied:users``: hash ``<topic>:<partition>`` -> the offset of the last
  event whose effects are in Redis. :func:`write_partition_batch` moves it forward in the
  same atomic Lua call that writes the states, and refuses to move it backwards: that is
  the guard that makes the flow's writes idempotent under replay. The same call notices
  a Redis that is *behind* the flow (restarted empty) so the flow rewrites its full state.
* ``streams:epoch``: hash topic -> the Kafka topic id those offsets belong to
  (:mod:`stores.redis_client`); a write for another id is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import orjson
import redis

from freshrec.settings import Settings
from ranking.user_state import DAY_S, Popularity, UserState, merge_first_seen

from .redis_client import EPOCH_LUA, EPOCHS, Outcome, connect, outcome_of, run_script

__all__ = [
    "connect", "read_user_state", "read_user_states", "write_user_states", "write_partition_batch",
    "read_applied_offsets", "read_popularity", "read_item_first_seen", "read_fresh_popularity",
    "FreshPopularity", "user_key", "read_applied_offset", "Outcome",
]

APPLIED_USERS = "streams:applied:users"
POPULARITY_NEWEST = "popularity:newest"

# KEYS: applied hash, popularity hash, popularity-newest hash, first-seen hash, epoch
#       hash, then one key per user.
# ARGV: partition field, offset, newest ts, user count, popularity field count,
#       first-seen field count, previous offset, epoch field, epoch, then user values (in
#       KEYS order), then popularity field/value pairs, then first-seen field/value pairs.
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
for i = 1, n_users do redis.call('SET', KEYS[5 + i], ARGV[9 + i]) end
local base = 9 + n_users
for j = 0, n_pop - 1 do
  redis.call('HSET', KEYS[2], ARGV[base + 2 * j + 1], ARGV[base + 2 * j + 2])
end
base = base + 2 * n_pop
for j = 0, n_seen - 1 do
  redis.call('HSET', KEYS[4], ARGV[base + 2 * j + 1], ARGV[base + 2 * j + 2])
end
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


def user_key(settings: Settings, user_id: str) -> str:
    return f"{settings.redis_prefix}user:{user_id}"


def partition_field(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


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
    """
    seen = first_seen or {}
    field = partition_field(topic, partition)
    prefix = settings.redis_prefix
    keys = [
        prefix + APPLIED_USERS, f"{prefix}popularity:{field}", prefix + POPULARITY_NEWEST,
        f"{prefix}first_seen:{field}", prefix + EPOCHS,
    ]
    keys.extend(user_key(settings, u) for u in users)
    args: list[bytes | str | int | float] = [
        field, offset, repr(newest_ts), len(users), len(popularity), len(seen), prev_offset, topic, epoch or "",
    ]
    args.extend(users.values())
    for item, entry in popularity.items():
        args.append(item)
        args.append(orjson.dumps(entry))
    for item, ts in seen.items():
        args.append(item)
        args.append(repr(float(ts)))
    script, sha = (_FULL_WRITE, _FULL_WRITE_SHA) if full else (_GUARDED_WRITE, _GUARDED_WRITE_SHA)
    return outcome_of(run_script(client, script, sha, keys, args), "streams.users", settings, topic, epoch)


def read_applied_offsets(client: redis.Redis, settings: Settings) -> dict[str, int]:
    """``<topic>:<partition>`` -> offset of the last event reflected in Redis."""
    raw = client.hgetall(settings.redis_prefix + APPLIED_USERS)
    return {k.decode(): int(v) for k, v in raw.items()}


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
    prefix = settings.redis_prefix
    newest = client.hgetall(prefix + POPULARITY_NEWEST)
    if not newest:
        return FreshPopularity({}, {}, 0.0)
    # A fixed merge order makes the float sums, and so the result, identical whatever the
    # order Redis returns the partitions in.
    fields = sorted(newest)
    pipe = client.pipeline(transaction=False)
    if with_scores:
        for field in fields:
            pipe.hgetall(f"{prefix}popularity:".encode() + field)
    if with_first_seen:
        for field in fields:
            pipe.hgetall(f"{prefix}first_seen:".encode() + field)
    replies = pipe.execute()
    now = max(float(v) for v in newest.values())
    scores: dict[str, float] = {}
    if with_scores:
        parts = [
            {item.decode(): tuple(orjson.loads(v)) for item, v in part.items()} for part in replies[: len(fields)]
        ]
        merged = Popularity.merge(parts, settings.popularity_half_life_days * DAY_S, newest_ts=now)  # type: ignore[arg-type]
        scores = merged.scores()
    first_seen: dict[str, float] = {}
    if with_first_seen:
        seen_parts = replies[len(fields) :] if with_scores else replies
        first_seen = merge_first_seen({item.decode(): float(v) for item, v in part.items()} for part in seen_parts)
    return FreshPopularity(scores, first_seen, now)


def read_applied_offset(client: redis.Redis, settings: Settings, topic: str, partition: int) -> int | None:
    """The offset of the partition's last event reflected in Redis; None if Redis has none."""
    raw = client.hget(settings.redis_prefix + APPLIED_USERS, partition_field(topic, partition))
    return None if raw is None else int(raw)
