"""Redis connection, server-side scripts and the write outcomes shared by the two stores of this package.

Every guarded write of the flows is one Lua script that, atomically:

1. checks the topic epoch (:mod:`freshrec.epochs`): ``streams:epoch`` maps a topic to
   the Kafka topic id whose offsets Redis holds. A Redis without one takes the writer's;
   one holding another refuses the write (:data:`EPOCH_MISMATCH`), since its offsets
   belong to another incarnation of the topic and comparing them would skip events;
2. compares the partition's applied offset with the batch: already held (:data:`Outcome.HELD`),
   or *behind* the writer's state before the batch (:data:`Outcome.BEHIND`: Redis lost
   data, so the writer must send its full state instead), or written.
"""

from __future__ import annotations

import enum
from typing import Any

import redis
from redis.exceptions import NoScriptError

from freshrec.epochs import EpochMismatch
from freshrec.redis_url import open_client
from freshrec.reset import safe_url
from freshrec.settings import Settings

# hash: topic -> Kafka topic id whose offsets the streams:applied:* hashes hold. One
# such hash per hash tag (per events partition, one for the catalog), so that it lies in
# the slot of the keys each guarded write touches (Redis Cluster runs a script only over
# keys of one slot).
EPOCHS = "streams:epoch"
EPOCH_MISMATCH = -1

# What Redis "holds" as the epoch of offsets written before epochs were recorded: they
# cannot be vouched for, so they count as another epoch (reset once, then never again).
UNKNOWN_EPOCH = "unknown (offsets stored before topic ids were recorded)"

# Lua prelude of every guarded write: `epoch_ok(key, field, epoch, applied, partition)`
# is false (plus the stored id) when Redis holds another epoch, or holds the partition's
# offset without any epoch; an empty epoch (a broker without topic ids) checks nothing.
EPOCH_LUA = """
local function epoch_ok(key, field, epoch, applied, partition)
  if epoch == '' then return true, '' end
  local stored = redis.call('HGET', key, field)
  if not stored then
    if redis.call('HEXISTS', applied, partition) == 1 then return false, '%s' end
    redis.call('HSET', key, field, epoch)
    return true, ''
  end
  return stored == epoch, stored
end
""" % UNKNOWN_EPOCH


class Outcome(enum.Enum):
    """What a guarded write did; true only for WRITTEN (so ``if write(...)`` still reads right)."""

    HELD = 0  # Redis already holds this offset (a replay after a crash): nothing written
    WRITTEN = 1
    BEHIND = 2  # Redis holds less than the writer's state before this batch: nothing written

    def __bool__(self) -> bool:
        return self is Outcome.WRITTEN


def connect(settings: Settings, **options: Any) -> redis.Redis:
    """A client for ``settings.redis_url`` (bytes in, bytes out): a :class:`redis.Redis`, or
    for a ``redis+cluster://`` URL a :class:`redis.cluster.RedisCluster` whose ``mget`` and
    pipelined ``mget`` work across slots (:mod:`freshrec.redis_url`). ``options`` go to
    the client (timeouts, ``retry``)."""
    return open_client(settings.redis_url, **options)  # type: ignore[no-any-return]


def run_script(client: redis.Redis, script: str, sha: str, keys: list[str], args: list[Any]) -> Any:
    """EVALSHA, loading the script on first use (saves resending it with every batch)."""
    try:
        return client.evalsha(sha, len(keys), *keys, *args)
    except NoScriptError:
        return client.eval(script, len(keys), *keys, *args)


def outcome_of(
    reply: Any, owner: str, settings: Settings, topic: str, epoch: str | None, epoch_key: str | None = None
) -> Outcome:
    """A guarded script's ``{code, stored_epoch}`` reply as an :class:`Outcome`; raises
    :class:`EpochMismatch` when Redis holds another epoch of ``topic`` (in the hash ``epoch_key``)."""
    code = int(reply[0])
    if code == EPOCH_MISMATCH:
        stored = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        where = f"Redis {safe_url(settings.redis_url)}, hash {epoch_key or settings.redis_prefix + EPOCHS}"
        raise EpochMismatch(owner, topic, stored, epoch, where)
    return Outcome(code)
