"""The one Redis adapter for catalog records (the catalog flow writes, everyone reads).

Keys, under ``settings.redis_prefix`` and the one hash tag ``{catalog}`` (every
partition's writes update the one catalog hash, so the catalog's keys share a Redis
Cluster slot and each batch stays one atomic call; the catalog is one hash of at most a
few hundred MB even at a million items, which one Redis node holds):

* ``{catalog}:catalog``: hash item_id -> the item's current :class:`CatalogItem` JSON
  (its wire form). A deleted item is absent.
* ``{catalog}:streams:applied:catalog``: hash ``<topic>:<partition>`` -> offset of the
  last catalog record reflected in ``catalog``; :func:`apply_partition_batch` moves it
  forward in the same atomic call and never backwards, so a replay after a crash writes
  nothing twice, and notices a Redis behind the flow (restarted empty) so the flow
  rewrites its items.
* ``{catalog}:streams:epoch``: hash topic -> the Kafka topic id those offsets belong to
  (:mod:`stores.redis_client`).

The keys had no ``{catalog}`` part before; see :mod:`stores.user_store` on moving a
deployment of that layout (``freshrec reset`` and a replay).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import hashlib

import redis

from freshrec.contracts import CatalogItem
from freshrec.settings import Settings

from .redis_client import EPOCH_LUA, EPOCHS, Outcome, outcome_of, run_script

CATALOG = "catalog"
APPLIED_CATALOG = "streams:applied:catalog"
TAG = "{catalog}:"

# KEYS: applied hash, catalog hash, epoch hash. ARGV: partition field, offset, upsert
# count, previous offset, epoch field, epoch, then upsert id/value pairs, then ids to
# delete. Returns {code, stored epoch} with the codes of stores.user_store's write: 1
# written, 0 offset already held, 2 Redis behind `previous offset`, -1 another epoch.
_GUARDED_APPLY = EPOCH_LUA + """
local ok, stored = epoch_ok(KEYS[3], ARGV[5], ARGV[6], KEYS[1], ARGV[1])
if not ok then return {-1, stored} end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and tonumber(cur) >= tonumber(ARGV[2]) then return {0, ''} end
local prev = tonumber(ARGV[4])
if prev >= 0 and (not cur or tonumber(cur) < prev) then return {2, ''} end
local n_up = tonumber(ARGV[3])
for j = 0, n_up - 1 do redis.call('HSET', KEYS[2], ARGV[7 + 2 * j], ARGV[8 + 2 * j]) end
for k = 7 + 2 * n_up, #ARGV do redis.call('HDEL', KEYS[2], ARGV[k]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {1, ''}
"""
_GUARDED_APPLY_SHA = hashlib.sha1(_GUARDED_APPLY.encode()).hexdigest()
# The partition's whole catalog (every current item, every item it deleted) without the
# "behind" check: the catalog hash is shared by partitions, so it cannot be cleared.
_FULL_APPLY = _GUARDED_APPLY.replace(
    "if prev >= 0 and (not cur or tonumber(cur) < prev) then return {2, ''} end\n", ""
)
assert _FULL_APPLY != _GUARDED_APPLY
_FULL_APPLY_SHA = hashlib.sha1(_FULL_APPLY.encode()).hexdigest()


def _catalog_key(settings: Settings) -> str:
    return catalog_key(settings, CATALOG)


def catalog_key(settings: Settings, name: str) -> str:
    """The catalog key ``name``: ``<prefix>{catalog}:<name>`` (one Redis Cluster slot for all of them)."""
    return settings.redis_prefix + TAG + name


def epoch_slots(settings: Settings) -> list[tuple[str, str]]:
    """``(epoch hash, applied-offsets hash)`` of the catalog flow (one pair: one slot)."""
    return [(catalog_key(settings, EPOCHS), catalog_key(settings, APPLIED_CATALOG))]


def read_items(client: redis.Redis, settings: Settings, ids: Iterable[str]) -> dict[str, CatalogItem]:
    """Current records of the given items; unknown or deleted ids are left out."""
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        return {}
    raws = client.hmget(_catalog_key(settings), wanted)
    return {i: CatalogItem.model_validate_json(raw) for i, raw in zip(wanted, raws, strict=True) if raw is not None}


def read_titles(client: redis.Redis, settings: Settings, ids: Iterable[str]) -> dict[str, str]:
    """Only the titles (cheaper than :func:`read_items` when that is all one needs)."""
    return {i: item.title for i, item in read_items(client, settings, ids).items()}


def all_items(client: redis.Redis, settings: Settings) -> dict[str, CatalogItem]:
    """Every current item (HSCAN, so a large catalog does not block Redis)."""
    out: dict[str, CatalogItem] = {}
    for item_id, raw in client.hscan_iter(_catalog_key(settings), count=1000):
        out[item_id.decode()] = CatalogItem.model_validate_json(raw)
    return out


def write_items(client: redis.Redis, settings: Settings, items: Iterable[CatalogItem], batch: int = 1000) -> int:
    """Upsert whole item records, pipelined; return how many. Unguarded (tools, tests)."""
    key = _catalog_key(settings)
    pipe = client.pipeline(transaction=False)
    n = 0
    for item in items:
        pipe.hset(key, item.item_id, item.to_bytes())
        n += 1
        if n % batch == 0:
            pipe.execute()
    pipe.execute()
    return n


def delete_items(client: redis.Redis, settings: Settings, ids: Iterable[str]) -> int:
    """Remove items; return how many existed."""
    wanted = list(ids)
    return int(client.hdel(_catalog_key(settings), *wanted)) if wanted else 0


def apply_partition_batch(
    client: redis.Redis,
    settings: Settings,
    field: str,
    offset: int,
    upserts: Mapping[str, bytes],
    deletes: Iterable[str],
    *,
    prev_offset: int = -1,
    topic: str | None = None,
    epoch: str | None = None,
    full: bool = False,
) -> Outcome:
    """Apply one catalog partition's changes up to ``offset`` atomically, unless Redis
    already holds that partition at ``offset`` or later (then :data:`Outcome.HELD`, false).

    ``prev_offset``, ``epoch`` and ``full`` work as in
    :func:`stores.user_store.write_partition_batch`: Redis behind ``prev_offset`` answers
    :data:`Outcome.BEHIND` and wants a ``full=True`` write (all the partition's items as
    upserts, all the items it deleted as deletes); another epoch of ``topic`` (default:
    ``field`` up to its last ``:``) raises :class:`~freshrec.epochs.EpochMismatch`.
    """
    topic = topic if topic is not None else field.rsplit(":", 1)[0]
    args: list[str | bytes | int] = [field, offset, len(upserts), prev_offset, topic, epoch or ""]
    for item_id, raw in upserts.items():
        args.append(item_id)
        args.append(raw)
    args.extend(deletes)
    keys = [catalog_key(settings, APPLIED_CATALOG), _catalog_key(settings), catalog_key(settings, EPOCHS)]
    script, sha = (_FULL_APPLY, _FULL_APPLY_SHA) if full else (_GUARDED_APPLY, _GUARDED_APPLY_SHA)
    reply = run_script(client, script, sha, keys, args)
    return outcome_of(reply, "streams.catalog", settings, topic, epoch, keys[2])


def read_applied_offsets(client: redis.Redis, settings: Settings) -> dict[str, int]:
    raw = client.hgetall(catalog_key(settings, APPLIED_CATALOG))
    return {k.decode(): int(v) for k, v in raw.items()}


def read_applied_offset(client: redis.Redis, settings: Settings, field: str) -> int | None:
    """The offset of the partition's last record reflected in ``catalog``; None if Redis has none."""
    raw = client.hget(catalog_key(settings, APPLIED_CATALOG), field)
    return None if raw is None else int(raw)
