"""The Redis adapter of the collaborative state: the flow's guarded batch writes and serving's reads.

Keys, all under ``settings.redis_prefix`` and the one Redis Cluster hash tag ``{collab}``
(so ``freshrec:{collab}:cop:<item>``; the names below follow the tag; see ``TAG``)
(docs/ranking_stage_contract.md):

* ``cop:<item>``: string, orjson ``{other: [value, as_of]}``, the item's stored co-purchase
  row including its own basket count; read with :func:`ranking.collab.decayed_row`.
* ``collab:items``: hash item -> orjson ``[baskets, buyers]``.
* ``collab:pop_short`` / ``collab:pop_long``: hash item -> orjson ``[value, as_of]``.
* ``collab:first_seen``: hash item -> ts (``repr`` of a float).
* ``collab:meta``: hash ``newest_ts``, ``epoch`` (the events topic's id), ``offsets``
  (orjson ``{partition: offset}``: the last message of each partition of ``events`` whose
  effects are here).
* ``shopvec``: hash user_id -> float32 little-endian bytes (``collab_shopper_dim``).
* ``collab:order``: list, one orjson ``[offsets before, runs]`` per written batch, the last
  ``collab_order_log``: the order in which the flow applied the partitions' messages, which
  a restarted flow follows (:mod:`streams.collab_partition`; an addition to the contract).

**The guard** (:func:`write_batch`, one Lua call per batch, like
:func:`stores.user_store.write_partition_batch` but over a vector of offsets, since the
one stateful partition reads every source partition): the batch carries the offsets
before it (``prev``) and after it (``new``), both points on the one order the flow applies
messages in; Redis holds ``cur``.

* another epoch in ``collab:meta`` (or offsets without an epoch): refused, :class:`EpochMismatch`;
* ``new <= cur`` in every partition: already held (a replay), :data:`Outcome.HELD`;
* ``prev <= cur <= new`` in every partition: written. Redis is at or inside the batch,
  and the batch's changed rows include everything changed since ``prev``;
* otherwise Redis holds less than ``prev`` somewhere (it lost data) or something off the
  flow's path: nothing written, :data:`Outcome.BEHIND`; the writer sends the whole shop
  with ``full=True``, which deletes the hashes and the order log and writes everything.

All reads are plain: serving caches the whole hashes (items, popularity, first seen) and
reads co-purchase rows and shopper vectors of the shoppers it ranks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import orjson
import redis

from freshrec.epochs import EpochMismatch
from freshrec.settings import Settings
from ranking.user_state import DAY_S, Popularity

from .redis_client import UNKNOWN_EPOCH, Outcome, connect, outcome_of, run_script

__all__ = [
    "connect", "write_batch", "check_epoch", "read_offsets", "read_order", "read_rows", "read_item_stats",
    "read_popularity", "read_first_seen", "read_newest_ts", "read_shopper_vectors", "read_all_shopper_vectors",
    "read_meta_marker", "read_shop_state", "scan_shopper_vectors", "read_rows_and_users", "decode_row", "Outcome", "META", "OWNER",
]

OWNER = "streams.collab"
# Every key of the collaborative state carries the one hash tag {collab} (the flow is one
# stateful partition: each batch is one Lua call over all of them, so on a Redis Cluster
# they must share a slot). The contract's names follow the tag: <prefix>{collab}:cop:<item>.
# A Redis written before the tag holds the untagged names, never read again: the collab
# guard finds collab:meta empty, so a flow resuming from a snapshot is BEHIND and rewrites
# the whole shop under the new names; `freshrec reset` + replay clears the old ones.
TAG = "{collab}:"
META = TAG + "collab:meta"
ITEMS = TAG + "collab:items"
POP = {"short": TAG + "collab:pop_short", "long": TAG + "collab:pop_long"}
FIRST_SEEN = TAG + "collab:first_seen"
SHOPVEC = TAG + "shopvec"
ORDER = TAG + "collab:order"

# KEYS: meta, items, pop_short, pop_long, first_seen, shopvec, order, then one cop:<item> per row.
# ARGV: epoch, prev offsets (orjson), new offsets (orjson), newest_ts, full (0/1), order entry,
#       order cap, n_rows, n_stats, n_short, n_long, n_seen, n_vec, then row values (KEYS
#       order), then field/value pairs of stats, pop_short, pop_long, first_seen, shopvec (an
#       empty value deletes the shopper's vector).
# Returns {code, stored epoch}: 1 written, 0 held, 2 behind, -1 another epoch.
_WRITE = """
local meta = KEYS[1]
local epoch = ARGV[1]
local stored = redis.call('HGET', meta, 'epoch')
if epoch ~= '' then
  if not stored then
    if redis.call('HEXISTS', meta, 'offsets') == 1 then return {-1, '%s'} end
    redis.call('HSET', meta, 'epoch', epoch)
  elseif stored ~= epoch then
    return {-1, stored}
  end
end
local raw = redis.call('HGET', meta, 'offsets')
local cur = {}
if raw then cur = cjson.decode(raw) end
local prev = cjson.decode(ARGV[2])
local new = cjson.decode(ARGV[3])
local held = true
for p, o in pairs(new) do
  if cur[p] == nil or cur[p] < o then held = false end
end
if held then return {0, ''} end
local full = ARGV[5] == '1'
if not full then
  for p, o in pairs(prev) do
    if cur[p] == nil or cur[p] < o then return {2, ''} end
  end
  for p, o in pairs(cur) do
    if new[p] == nil or new[p] < o then return {2, ''} end
  end
else
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
end
local n_rows = tonumber(ARGV[8])
local counts = {tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])}
local n_vec = tonumber(ARGV[13])
local base = 13
for i = 1, n_rows do redis.call('SET', KEYS[7 + i], ARGV[base + i]) end
base = base + n_rows
for h = 1, 4 do
  for j = 0, counts[h] - 1 do
    redis.call('HSET', KEYS[1 + h], ARGV[base + 2 * j + 1], ARGV[base + 2 * j + 2])
  end
  base = base + 2 * counts[h]
end
for j = 0, n_vec - 1 do
  local v = ARGV[base + 2 * j + 2]
  if v == '' then redis.call('HDEL', KEYS[6], ARGV[base + 2 * j + 1])
  else redis.call('HSET', KEYS[6], ARGV[base + 2 * j + 1], v) end
end
redis.call('RPUSH', KEYS[7], ARGV[6])
redis.call('LTRIM', KEYS[7], -tonumber(ARGV[7]), -1)
redis.call('HSET', meta, 'newest_ts', ARGV[4], 'offsets', ARGV[3])
return {1, ''}
""" % UNKNOWN_EPOCH
_WRITE_SHA = hashlib.sha1(_WRITE.encode()).hexdigest()


def cop_key(settings: Settings, item: str) -> str:
    return f"{settings.redis_prefix}{TAG}cop:{item}"


def _offsets_json(offsets: Mapping[str, int]) -> bytes:
    # An empty Lua table encodes as {} either way; orjson keeps {} for an empty dict.
    return orjson.dumps(dict(sorted(offsets.items())))


def write_batch(
    client: redis.Redis,
    settings: Settings,
    *,
    topic: str,
    prev_offsets: Mapping[str, int],
    offsets: Mapping[str, int],
    runs: Sequence[tuple[int, int]],
    rows: Mapping[str, bytes],
    stats: Mapping[str, tuple[int, int]],
    pop_short: Mapping[str, tuple[float, float]],
    pop_long: Mapping[str, tuple[float, float]],
    first_seen: Mapping[str, float],
    vectors: Mapping[str, bytes | None],
    newest_ts: float,
    epoch: str | None = None,
    full: bool = False,
) -> Outcome:
    """One batch of the collaborative flow as of ``offsets``, atomically, with the guard above.

    ``full=True`` replaces everything the flow keeps here (the hashes, the order log) by
    the given state; it still refuses offsets Redis already holds and another epoch.
    """
    p = settings.redis_prefix
    keys = [p + META, p + ITEMS, p + POP["short"], p + POP["long"], p + FIRST_SEEN, p + SHOPVEC, p + ORDER]
    keys.extend(cop_key(settings, i) for i in rows)
    entry = orjson.dumps([dict(prev_offsets), [list(r) for r in runs]])
    args: list[Any] = [
        epoch or "", _offsets_json(prev_offsets), _offsets_json(offsets), repr(float(newest_ts)), "1" if full else "0",
        entry, settings.collab_order_log, len(rows), len(stats), len(pop_short), len(pop_long), len(first_seen), len(vectors),
    ]
    args.extend(rows.values())
    for item, (baskets, buyers) in stats.items():
        args += [item, orjson.dumps([baskets, buyers])]
    for part in (pop_short, pop_long):
        for item, entry_ in part.items():
            args += [item, orjson.dumps(list(entry_))]
    for item, ts in first_seen.items():
        args += [item, repr(float(ts))]
    for user, vec in vectors.items():
        args += [user, b"" if vec is None else vec]
    return outcome_of(run_script(client, _WRITE, _WRITE_SHA, keys, args), OWNER, settings, topic, epoch)


def check_epoch(client: redis.Redis, settings: Settings, topic: str, epoch: str | None) -> None:
    """Record ``epoch`` in a Redis without one; raise :class:`EpochMismatch` if it holds another, or
    holds offsets without any (written before epochs: nothing says which topic they were read from)."""
    if epoch is None:
        return
    key = settings.redis_prefix + META
    stored, offsets = client.hmget(key, ["epoch", "offsets"])
    if stored is None:
        if offsets is not None:
            raise EpochMismatch(OWNER, topic, UNKNOWN_EPOCH, epoch, f"Redis {settings.redis_url}, hash {key}")
        client.hsetnx(key, "epoch", epoch)
        stored = client.hget(key, "epoch")
    if stored is not None and stored.decode() != epoch:
        raise EpochMismatch(OWNER, topic, stored.decode(), epoch, f"Redis {settings.redis_url}, hash {key}")


def read_offsets(client: redis.Redis, settings: Settings) -> dict[str, int]:
    """``{partition: offset}``: the last message of each source partition reflected here ({} for none)."""
    raw = client.hget(settings.redis_prefix + META, "offsets")
    return {} if raw is None else {str(k): int(v) for k, v in orjson.loads(raw).items()}


def read_order(client: redis.Redis, settings: Settings) -> list[tuple[dict[str, int], list[tuple[int, int]]]]:
    """The order log, oldest first: per written batch (offsets before it, its runs ``(partition, last offset)``)."""
    raws = client.lrange(settings.redis_prefix + ORDER, 0, -1)
    out = []
    for raw in raws:
        prev, runs = orjson.loads(raw)
        out.append(({str(k): int(v) for k, v in prev.items()}, [(int(a), int(b)) for a, b in runs]))
    return out


def read_rows(client: redis.Redis, settings: Settings, items: Iterable[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """Stored co-purchase rows of ``items`` (one MGET); items without a row are left out."""
    ids = list(dict.fromkeys(items))
    if not ids:
        return {}
    raws = client.mget([cop_key(settings, i) for i in ids])
    return {i: decode_row(raw) for i, raw in zip(ids, raws, strict=True) if raw is not None}


def decode_row(raw: bytes) -> dict[str, tuple[float, float]]:
    """One stored ``cop:<item>`` value: ``{other: (value, as_of)}`` (the item's own count included)."""
    return {o: (float(v[0]), float(v[1])) for o, v in orjson.loads(raw).items()}


def read_rows_and_users(
    client: redis.Redis, settings: Settings, items: Sequence[str], user_ids: Sequence[str]
) -> tuple[list[bytes | None], list[bytes | None]]:
    """The stored rows of ``items`` and the user states of ``user_ids`` (the users flow's keys,
    :func:`stores.user_store.user_key`), raw and in the given orders, in one round trip.

    Serving's per-request read: the caller decodes (:func:`decode_row`,
    ``UserState.from_bytes``), caching by the bytes.
    """
    from .user_store import user_key

    if not items and not user_ids:
        return [], []
    pipe = client.pipeline(transaction=False)
    if items:
        pipe.mget([cop_key(settings, i) for i in items])
    if user_ids:
        pipe.mget([user_key(settings, u) for u in user_ids])
    replies = pipe.execute()
    rows = replies[0] if items else []
    users = replies[-1] if user_ids else []
    return list(rows), list(users)


def read_meta_marker(client: redis.Redis, settings: Settings) -> tuple[Any, ...]:
    """``collab:meta``'s (newest_ts, epoch, offsets), raw: changes whenever the flow writes."""
    return tuple(client.hmget(settings.redis_prefix + META, ["newest_ts", "epoch", "offsets"]))


def read_shop_state(
    client: redis.Redis, settings: Settings
) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[float, float]], dict[str, tuple[float, float]], dict[str, float]]:
    """The shop-wide hashes in one round trip: (item stats, pop_short entries, pop_long entries, first seen).

    Entries are ``(value, as_of)`` as :class:`Popularity` holds them (half-lives
    ``collab_pop_<horizon>_days``); stats ``(baskets, buyers)``.
    """
    p = settings.redis_prefix
    pipe = client.pipeline(transaction=False)
    for name in (ITEMS, POP["short"], POP["long"], FIRST_SEEN):
        pipe.hgetall(p + name)
    items, short, long_, first = pipe.execute()
    stats = {k.decode(): (int(b), int(u)) for k, (b, u) in ((k, orjson.loads(v)) for k, v in items.items())}
    return stats, _entries(short), _entries(long_), {k.decode(): float(v) for k, v in first.items()}


def _entries(raw: Mapping[bytes, bytes]) -> dict[str, tuple[float, float]]:
    return {k.decode(): (float(a), float(b)) for k, (a, b) in ((k, orjson.loads(v)) for k, v in raw.items())}


def read_item_stats(client: redis.Redis, settings: Settings) -> dict[str, tuple[int, int]]:
    """Every item's ``(baskets, buyers)``."""
    raw = client.hgetall(settings.redis_prefix + ITEMS)
    return {k.decode(): tuple(orjson.loads(v)) for k, v in raw.items()}  # type: ignore[misc]


def read_newest_ts(client: redis.Redis, settings: Settings) -> float:
    """The newest event time of the collaborative state (0.0 when empty): its "now"."""
    raw = client.hget(settings.redis_prefix + META, "newest_ts")
    return 0.0 if raw is None else float(raw)


def read_popularity(client: redis.Redis, settings: Settings, horizon: str) -> Popularity:
    """Popularity at ``horizon`` (``"short"`` or ``"long"``) as a :class:`Popularity` whose
    ``scores(ts)`` decays like the flow's (half-life ``collab_pop_<horizon>_days``); first-seen
    times are read apart (:func:`read_first_seen`)."""
    if horizon not in POP:
        raise ValueError(f"horizon is 'short' or 'long', not {horizon!r}")
    days = settings.collab_pop_short_days if horizon == "short" else settings.collab_pop_long_days
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(settings.redis_prefix + POP[horizon])
    pipe.hget(settings.redis_prefix + META, "newest_ts")
    raw, newest = pipe.execute()
    entries = {k.decode(): (float(a), float(b)) for k, (a, b) in ((k, orjson.loads(v)) for k, v in raw.items())}
    return Popularity(days * DAY_S, entries, 0.0 if newest is None else float(newest), {})


def read_first_seen(client: redis.Redis, settings: Settings) -> dict[str, float]:
    """Every item's first event time in the collaborative state."""
    raw = client.hgetall(settings.redis_prefix + FIRST_SEEN)
    return {k.decode(): float(v) for k, v in raw.items()}


def shopvec_key(settings: Settings) -> str:
    return settings.redis_prefix + SHOPVEC


def _vector(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def read_shopper_vectors(client: redis.Redis, settings: Settings, user_ids: Iterable[str]) -> dict[str, np.ndarray]:
    """The given shoppers' vectors (one HMGET); shoppers without one are left out."""
    ids = list(dict.fromkeys(user_ids))
    if not ids:
        return {}
    raws = client.hmget(settings.redis_prefix + SHOPVEC, ids)
    return {u: _vector(raw) for u, raw in zip(ids, raws, strict=True) if raw is not None}


def scan_shopper_vectors(client: redis.Redis, settings: Settings, batch: int = 2000) -> Iterable[tuple[str, bytes]]:
    """Every stored shopper vector as (user_id, raw bytes), HSCAN in batches (gentler than one HGETALL)."""
    for user, raw in client.hscan_iter(shopvec_key(settings), count=batch):
        yield user.decode(), raw


def read_all_shopper_vectors(client: redis.Redis, settings: Settings) -> dict[str, np.ndarray]:
    """Every shopper vector (to build a nearest-shopper index)."""
    raw = client.hgetall(settings.redis_prefix + SHOPVEC)
    return {k.decode(): _vector(v) for k, v in raw.items()}
