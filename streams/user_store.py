"""The one Redis adapter for user state and popularity (serving, learner and eval read here).

Keys, all under ``settings.redis_prefix``:

* ``user:<user_id>``: one :class:`~streams.user_state.UserState` in its wire format
  (documented in :mod:`streams.user_state`).
* ``popularity:<topic>:<partition>``: hash item_id -> orjson ``[count, as_of_ts]``, the
  decayed purchase counts of the events of one Kafka partition; partial counters add
  exactly (:meth:`Popularity.merge`). ``popularity:newest`` maps the same
  ``<topic>:<partition>`` to the newest event time seen there.
* ``streams:applied:users``: hash ``<topic>:<partition>`` -> the offset of the last
  event whose effects are in Redis. :func:`write_partition_batch` moves it forward in the
  same atomic Lua call that writes the states, and refuses to move it backwards: that is
  the guard that makes the flow's writes idempotent under replay.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import orjson
import hashlib

import redis

from freshrec.settings import Settings

from .redis_client import connect, run_script
from .user_state import DAY_S, Popularity, UserState

__all__ = [
    "connect", "read_user_state", "read_user_states", "write_user_states", "write_partition_batch",
    "read_applied_offsets", "read_popularity", "user_key",
]

APPLIED_USERS = "streams:applied:users"
POPULARITY_NEWEST = "popularity:newest"

# KEYS: applied hash, popularity hash, popularity-newest hash, then one key per user.
# ARGV: partition field, offset, newest ts, user count, popularity field count,
#       then user values (in KEYS order), then popularity field/value pairs.
# Returns 1 if written, 0 if this offset is already in Redis (a replay after a crash).
_GUARDED_WRITE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and tonumber(cur) >= tonumber(ARGV[2]) then return 0 end
local n_users = tonumber(ARGV[4])
local n_pop = tonumber(ARGV[5])
for i = 1, n_users do redis.call('SET', KEYS[3 + i], ARGV[5 + i]) end
local base = 5 + n_users
for j = 0, n_pop - 1 do
  redis.call('HSET', KEYS[2], ARGV[base + 2 * j + 1], ARGV[base + 2 * j + 2])
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
_GUARDED_WRITE_SHA = hashlib.sha1(_GUARDED_WRITE.encode()).hexdigest()


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
) -> bool:
    """Write one partition's changed users and popularity as of ``offset``, atomically.

    Skipped (returns False) if Redis already holds this partition at ``offset`` or later:
    after a crash the flow recomputes the same states from its snapshot and replays the
    same events, so those writes would only move Redis back in time.
    """
    field = partition_field(topic, partition)
    prefix = settings.redis_prefix
    keys = [prefix + APPLIED_USERS, f"{prefix}popularity:{field}", prefix + POPULARITY_NEWEST]
    keys.extend(user_key(settings, u) for u in users)
    args: list[bytes | str | int | float] = [field, offset, repr(newest_ts), len(users), len(popularity)]
    args.extend(users.values())
    for item, entry in popularity.items():
        args.append(item)
        args.append(orjson.dumps(entry))
    return bool(run_script(client, _GUARDED_WRITE, _GUARDED_WRITE_SHA, keys, args))


def read_applied_offsets(client: redis.Redis, settings: Settings) -> dict[str, int]:
    """``<topic>:<partition>`` -> offset of the last event reflected in Redis."""
    raw = client.hgetall(settings.redis_prefix + APPLIED_USERS)
    return {k.decode(): int(v) for k, v in raw.items()}


def read_popularity(client: redis.Redis, settings: Settings) -> dict[str, float]:
    """Everyone's purchase counts per item, decayed (half-life ``popularity_half_life_days``)
    to the newest event time the flow has seen."""
    prefix = settings.redis_prefix
    newest = client.hgetall(prefix + POPULARITY_NEWEST)
    if not newest:
        return {}
    # A fixed merge order makes the float sums, and so the result, identical whatever the
    # order Redis returns the partitions in.
    fields = sorted(newest)
    pipe = client.pipeline(transaction=False)
    for field in fields:
        pipe.hgetall(f"{prefix}popularity:".encode() + field)
    parts = [
        {item.decode(): tuple(orjson.loads(v)) for item, v in part.items()} for part in pipe.execute()
    ]
    now = max(float(v) for v in newest.values())
    merged = Popularity.merge(parts, settings.popularity_half_life_days * DAY_S, newest_ts=now)  # type: ignore[arg-type]
    return merged.scores()
