"""Write the collaborative partition's batches to Redis from the stateful step; rebuild it when it lost data.

As :mod:`streams.partition_writer` for user state, and for the same reason (only the
stateful step holds the whole shop when Redis turns out to have lost it), with offsets
per source partition (:mod:`stores.collab_store`): ``WRITTEN``, ``HELD`` (a replay:
skipped), ``BEHIND`` (Redis lost data or holds something off the flow's order: the whole
shop is rewritten in one call), another epoch (:class:`~freshrec.epochs.EpochMismatch`
stops the flow). Every call retries through Redis outages (:mod:`stores.redis_retry`).

It also hands the restarted partition the order it must follow (:meth:`CollabWriter.resume`).
"""

from __future__ import annotations

import sys

import redis

from freshrec.settings import Settings
from stores import collab_store
from stores.redis_client import Outcome, connect
from stores.redis_retry import with_retry

from .collab_partition import STAGE, CollabBatch, CollabPartition


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class CollabWriter:
    """Writes :class:`CollabBatch` es of a :class:`CollabPartition` (:func:`collab_store.write_batch`)."""

    def __init__(self, settings: Settings, epoch: str | None, client: redis.Redis | None = None) -> None:
        self._settings = settings
        self._epoch = epoch
        self._client = client if client is not None else connect(settings)
        self.written = 0
        self.skipped = 0
        self.rebuilds = 0

    def _retry(self, call, what: str):  # type: ignore[no-untyped-def]
        return with_retry(call, f"{STAGE}: {what}", self._settings.stream_redis_backoff_max_s)

    def resume(self, partition: CollabPartition) -> None:
        """Have a (restored) partition follow the order Redis recorded beyond its offsets."""
        held = self._retry(lambda: collab_store.read_offsets(self._client, self._settings), "reading offsets")
        ahead = {p: o for p, o in held.items() if o > partition.offsets.get(p, -1)}
        if not ahead:
            _log(f"{STAGE}: starting at offsets {partition.offsets}; Redis holds {held}: nothing to replay")
            return
        log = self._retry(lambda: collab_store.read_order(self._client, self._settings), "reading the order log")
        if partition.follow(log):
            _log(f"{STAGE}: resuming at offsets {partition.offsets}; Redis holds {held}: replaying offsets already in "
                 f"Redis in their recorded order ({len(partition.plan)} runs)")
        else:
            _log(f"{STAGE}: resuming at offsets {partition.offsets}; Redis holds {held} but its order log does not reach "
                 "back that far: the replay may apply another order, and Redis will be rewritten from the flow's state")

    def _store(self, batch: CollabBatch, full: bool) -> Outcome:
        return collab_store.write_batch(
            self._client, self._settings, topic=batch.topic, prev_offsets=batch.prev_offsets, offsets=batch.offsets,
            runs=batch.runs, rows=batch.rows, stats=batch.stats, pop_short=batch.pop_short, pop_long=batch.pop_long,
            first_seen=batch.first_seen, vectors=batch.vectors, newest_ts=batch.newest_ts, epoch=self._epoch, full=full,
        )

    def write(self, batch: CollabBatch, partition: CollabPartition) -> None:
        """Write ``batch`` (``partition`` is already past it)."""
        if batch.empty:
            return
        outcome = self._retry(lambda: self._store(batch, False), "writing a batch")
        if outcome is Outcome.HELD:
            self.skipped += 1
        elif outcome is Outcome.BEHIND:
            self._rebuild(partition)
        else:
            self.written += 1

    def check(self, partition: CollabPartition) -> None:
        """Rebuild Redis's copy of the shop if it holds less than the partition has applied."""
        if not partition.offsets:
            return
        held = self._retry(lambda: collab_store.read_offsets(self._client, self._settings), "checking offsets")
        if any(held.get(p, -1) < o for p, o in partition.offsets.items()) and not partition.plan:
            self._rebuild(partition)

    def _rebuild(self, partition: CollabPartition) -> None:
        full = partition.full_batch()
        if full is None:
            return
        _log(
            f"{STAGE}: Redis does not hold the flow's state before this batch (it lost data, or holds another order); "
            f"rewriting the whole shop ({len(full.rows)} co-purchase rows, {len(full.vectors)} shopper vectors) "
            f"as of offsets {full.offsets}"
        )
        self._retry(lambda: self._store(full, True), "rewriting the whole shop")
        self.rebuilds += 1
