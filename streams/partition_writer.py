"""Write a partition's batches to Redis from the stateful step; rebuild Redis when it lost data.

Why the Redis write lives here and not in a sink: when Redis comes back empty (restarted
without persistence, replaced by a new one, AOF's last second lost) the only complete
copy of what it should hold is the partition state in the stateful operator, so the
writer must be able to send all of it, atomically with the partition's offset. A sink
only sees the batches. The Kafka outputs (train pairs, dead letters, changed items) stay
in the sinks (:mod:`streams.sinks`).

A write goes like this (the Lua side is in :mod:`stores.user_store` and
:mod:`stores.catalog_store`):

* ``WRITTEN``: Redis held the partition up to the offset before the batch; it now holds
  the batch. The normal case.
* ``HELD``: Redis already holds this offset: a replay after a crash; skipped.
* ``BEHIND``: Redis holds less than the partition's offset before the batch: it lost
  data. Nothing was written; the writer sends the partition's full state
  (``full_batch()``) with the batch's offset instead, one atomic call.
* another topic epoch in Redis: :class:`~freshrec.epochs.EpochMismatch` stops the flow.

Between batches, :meth:`PartitionWriter.check` (called every ``stream_redis_check_s`` by
:class:`streams.flow_parts.PartitionLogic`) compares Redis's applied offset with the
partition's, so an emptied Redis is rebuilt on an idle stream too. Every Redis call
retries through outages (:mod:`stores.redis_retry`).

A rebuild is one atomic call, so readers never see a half-rebuilt partition; its cost
grows with the partition: 100,000 users of ~1.9 kB took ~6 s on this 2-core machine
(mostly moving the 190 MB), during which Redis answers nothing else. A partition of
millions of users would want a chunked rebuild (states first, the offset last): not
built, since the flows' partitions are far smaller here.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

import redis

from freshrec.settings import Settings
from stores import catalog_store, user_store
from stores.redis_client import Outcome, connect
from stores.redis_retry import with_retry

from .catalog_partition import CatalogBatch
from .user_partition import UserBatch


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class PartitionWriter(Protocol):
    """What :class:`streams.flow_parts.PartitionLogic` needs of a writer."""

    def write(self, batch: Any, prev_offset: int, partition: Any) -> None: ...

    def check(self, partition: Any) -> None: ...


class _Writer:
    stage = ""

    def __init__(self, settings: Settings, epoch: str | None, client: redis.Redis | None = None) -> None:
        self._settings = settings
        self._epoch = epoch
        self._client = client if client is not None else connect(settings)
        self._resumed = False
        self.skipped = 0
        self.rebuilds = 0

    # -- store specifics ----------------------------------------------------------------

    def _store(self, batch: Any, prev_offset: int, full: bool) -> Outcome:
        raise NotImplementedError

    def _applied(self, topic: str, partition: int) -> int | None:
        raise NotImplementedError

    def _describe(self, batch: Any) -> str:
        raise NotImplementedError

    # -- the protocol ---------------------------------------------------------------------

    def _retry(self, call: Any, what: str) -> Any:
        return with_retry(call, f"{self.stage}: {what}", self._settings.stream_redis_backoff_max_s)

    def write(self, batch: Any, prev_offset: int, partition: Any) -> None:
        """Write ``batch`` (``partition`` is already past it; ``prev_offset`` was its offset before)."""
        if batch.last_offset < 0 or not batch.topic:
            return  # no message in it
        field = f"{batch.topic}:{batch.partition}"
        if not self._resumed:
            self._log_resume(batch, field)
        outcome = self._retry(lambda: self._store(batch, prev_offset, False), f"writing partition {field}")
        if outcome is Outcome.HELD:
            self.skipped += 1
        elif outcome is Outcome.BEHIND:
            held = self._retry(lambda: self._applied(batch.topic, batch.partition), f"reading partition {field}")
            self._rebuild(partition, held, prev_offset)

    def check(self, partition: Any) -> None:
        """Rebuild Redis's copy of ``partition`` if it holds less than the partition has applied."""
        if partition.topic is None or partition.partition is None or partition.last_offset < 0:
            return
        field = f"{partition.topic}:{partition.partition}"
        held = self._retry(lambda: self._applied(partition.topic, partition.partition), f"checking partition {field}")
        if held is None or held < partition.last_offset:
            self._rebuild(partition, held, partition.last_offset)

    def _rebuild(self, partition: Any, held: int | None, expected: int) -> None:
        full = partition.full_batch()
        if full is None:
            return
        field = f"{full.topic}:{full.partition}"
        has = "nothing" if held is None else f"offsets up to {held}"
        _log(
            f"{self.stage}: Redis holds {has} of partition {field}, but the flow applied up to {expected}: "
            f"Redis lost data (restarted without persistence, or a new Redis); rewriting the partition's full "
            f"state ({self._describe(full)}) as of offset {full.last_offset}"
        )
        self._retry(lambda: self._store(full, -1, True), f"rebuilding partition {field}")
        self.rebuilds += 1

    def _log_resume(self, batch: Any, field: str) -> None:
        """Say once per run where the flow resumed relative to what Redis holds."""
        self._resumed = True
        held = self._retry(lambda: self._applied(batch.topic, batch.partition), f"reading partition {field}")
        held = -1 if held is None else held
        first = getattr(batch, "first_offset", -1)
        if first < 0:
            return
        overlap = "replaying offsets already in Redis (their writes are skipped)" if first <= held else "no overlap"
        _log(f"{self.stage}: partition {field} starts at offset {first}; Redis holds up to {held}: {overlap}")


class UserStateWriter(_Writer):
    """Writes :class:`UserBatch` es of a :class:`UserPartition` (:func:`user_store.write_partition_batch`)."""

    stage = "streams.users"
    _misplaced_said = False

    def _store(self, batch: UserBatch, prev_offset: int, full: bool) -> Outcome:
        if not self._misplaced_said and batch.topic == self._settings.topics.events:
            self._say_misplaced(batch)
        return user_store.write_partition_batch(
            self._client, self._settings, batch.topic, batch.partition, batch.last_offset,
            batch.users, batch.popularity, batch.newest_ts, batch.first_seen,
            prev_offset=prev_offset, epoch=self._epoch, full=full,
            gone_users=batch.gone_users, gone_popularity=batch.gone_popularity, gone_items=batch.gone_items,
        )

    def _applied(self, topic: str, partition: int) -> int | None:
        return user_store.read_applied_offset(self._client, self._settings, topic, partition)

    def _say_misplaced(self, batch: UserBatch) -> None:
        """Say once if a user's events came from another partition than the keying rule gives:
        the state is written under the partition it came from, where readers will not look."""
        for user in batch.users:
            expected = user_store.user_partition(self._settings, user)
            if expected != batch.partition:
                self._misplaced_said = True
                _log(
                    f"{self.stage}: user {user!r} arrived in partition {batch.partition} of {batch.topic!r}, but "
                    f"murmur2 of the key modulo FRESHREC_PARTITIONS={self._settings.partitions} gives {expected}: "
                    "readers will not find such users. Key events by user id with the Java-default murmur2 "
                    "partitioner (librdkafka: partitioner=murmur2_random) and set FRESHREC_PARTITIONS to the "
                    "topic's partition count"
                )
                return

    def _describe(self, batch: UserBatch) -> str:
        return f"{len(batch.users)} users, {len(batch.popularity)} popularity entries, {len(batch.first_seen)} first-seen times"


class CatalogWriter(_Writer):
    """Writes :class:`CatalogBatch` es of a :class:`CatalogPartition` (:func:`catalog_store.apply_partition_batch`)."""

    stage = "streams.catalog"

    def _store(self, batch: CatalogBatch, prev_offset: int, full: bool) -> Outcome:
        return catalog_store.apply_partition_batch(
            self._client, self._settings, f"{batch.topic}:{batch.partition}", batch.last_offset,
            batch.upserts, batch.deletes, prev_offset=prev_offset, topic=batch.topic, epoch=self._epoch, full=full,
        )

    def _applied(self, topic: str, partition: int) -> int | None:
        return catalog_store.read_applied_offset(self._client, self._settings, f"{topic}:{partition}")

    def _describe(self, batch: CatalogBatch) -> str:
        return f"{len(batch.upserts)} items, {len(batch.deletes)} deletions"
