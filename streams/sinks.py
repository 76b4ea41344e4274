"""Bytewax sinks of the flows: their Kafka outputs (train pairs, changed items, rank examples, shopper vectors, dead letters).

The Redis state is written by the stateful step itself (:mod:`streams.partition_writer`:
it alone holds the full state to rebuild a Redis that lost it). Both sinks are
partitioned like the input topic (sink partition ``p`` gets the batches of Kafka
partition ``p``).

Kafka outputs (train pairs, changed items, dead letters) are produced asynchronously and
flushed in :meth:`snapshot`, which Bytewax calls before it commits an epoch: an epoch
whose outputs were not all acknowledged is never recorded as done, so they are sent at
least once without blocking the worker on a broker round trip for every batch.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from freshrec.contracts import DeadLetter
from freshrec.kafka_security import librdkafka_options
from freshrec.settings import Settings
from ranking.pairs import PairDraft
from stores import catalog_store
from stores.redis_client import connect
from stores.redis_retry import with_retry

from .catalog_partition import CatalogBatch
from .collab_partition import CollabBatch
from .user_partition import UserBatch

# Flush anyway after this long, so outputs move even when no epoch closes (no recovery).
_FLUSH_EVERY_S = 1.0


def topic_partitions(settings: Settings, topic: str, timeout: float = 10.0) -> list[int]:
    """Partition ids of ``topic`` (raises with advice if it does not exist)."""
    admin = AdminClient(librdkafka_options(settings))
    meta = admin.list_topics(topic, timeout=timeout).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise RuntimeError(f"topic {topic!r} does not exist on {settings.kafka_bootstrap}; run `freshrec up` first")
    return sorted(meta.partitions)


class _KafkaOut:
    """An async producer whose delivery errors surface instead of vanishing."""

    def __init__(self, settings: Settings) -> None:
        self._producer = Producer(
            {**librdkafka_options(settings), "linger.ms": 5, "acks": "all", "enable.idempotence": False}
        )
        self._last_flush = time.monotonic()
        self.errors: list[str] = []
        self._dead_letter = settings.topics.dead_letter

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None and len(self.errors) < 20:
            self.errors.append(str(err))

    def send(self, topic: str, key: str | None, value: bytes) -> None:
        # librdkafka raises on a message over message.max.bytes (default 1,000,000), which
        # would crash the flow on every restart; only a train pair with a huge context can be.
        if len(value) > 1_000_000:
            reason = f"output is {len(value)} bytes, over the 1000000-byte message limit; lower stream_pair_context"
            topic, key, value = self._dead_letter, None, DeadLetter("streams.output", "record", reason, value, topic).to_bytes()
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
                break
            except BufferError:  # local queue full: let librdkafka drain a little
                self._producer.poll(0.05)
        self._producer.poll(0)

    def maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush > _FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        remaining = self._producer.flush(30.0)
        self._last_flush = time.monotonic()
        if remaining or self.errors:
            errors, self.errors = self.errors, []
            raise RuntimeError(f"Kafka did not acknowledge {remaining} outputs; errors: {errors[:5]}")


class _ItemTexts:
    """Titles and encoder texts of items for train pairs, cached per sink partition."""

    def __init__(self, client: Any, settings: Settings) -> None:
        self._client = client
        self._settings = settings
        self._cache: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._max = settings.stream_title_cache

    def lookup(self, ids: set[str]) -> tuple[dict[str, str], dict[str, str]]:
        missing = [i for i in ids if i not in self._cache]
        if missing:
            # Unknown items are not cached: the catalog may simply not have reached Redis yet.
            for item_id, item in catalog_store.read_items(self._client, self._settings, missing).items():
                self._cache[item_id] = (item.title, item.text())
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        titles, texts = {}, {}
        for i in ids:
            hit = self._cache.get(i)
            if hit is not None:
                titles[i], texts[i] = hit
        return titles, texts


def _pair_item_ids(pairs: list[PairDraft]) -> set[str]:
    ids: set[str] = set()
    for p in pairs:
        ids.update(p.context_items)
        ids.add(p.target_item)
    return ids


class _FlushingSinkPartition(StatefulSinkPartition[Any, None]):
    """A sink partition whose Kafka output is flushed before each snapshot commits.

    Flushing in ``snapshot`` is what makes the Kafka outputs at-least-once: an epoch's
    snapshot is only taken after everything the epoch produced was acknowledged.
    """

    _kafka: _KafkaOut

    def snapshot(self) -> None:
        self._kafka.flush()
        return None

    def close(self) -> None:
        self._kafka.flush()


class _UserSinkPartition(_FlushingSinkPartition):
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._redis = connect(settings)
        self._kafka = _KafkaOut(settings)
        self._texts = _ItemTexts(self._redis, settings)

    def write_batch(self, values: list[Any]) -> None:
        topics = self._settings.topics
        for value in values:
            if isinstance(value, DeadLetter):
                self._kafka.send(topics.dead_letter, None, value.to_bytes())
                continue
            batch: UserBatch = value
            for dead in batch.dead_letters:
                self._kafka.send(topics.dead_letter, None, dead.to_bytes())
            if batch.pairs:
                ids = _pair_item_ids(batch.pairs)
                titles, texts = with_retry(
                    lambda: self._texts.lookup(ids), "streams.users: reading item titles",
                    self._settings.stream_redis_backoff_max_s,
                )
                for draft in batch.pairs:
                    self._kafka.send(topics.train_pairs, draft.user_id, draft.complete(titles, texts).to_bytes())
        self._kafka.maybe_flush()


class _CatalogSinkPartition(_FlushingSinkPartition):
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._kafka = _KafkaOut(settings)

    def write_batch(self, values: list[Any]) -> None:
        s = self._settings
        for value in values:
            if isinstance(value, DeadLetter):
                self._kafka.send(s.topics.dead_letter, None, value.to_bytes())
                continue
            batch: CatalogBatch = value
            for dead in batch.dead_letters:
                self._kafka.send(s.topics.dead_letter, None, dead.to_bytes())
            for record in batch.changed:
                self._kafka.send(s.topics.changed_items, record.item_id, record.to_bytes())
        self._kafka.maybe_flush()


class _PerPartitionSink(FixedPartitionedSink[Any, None]):
    """One sink partition per partition of the input topic; items keyed by its id."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self._settings = settings
        self._topic = topic

    def list_parts(self) -> list[str]:
        return [str(p) for p in topic_partitions(self._settings, self._topic)]

    def part_fn(self, item_key: str) -> int:
        return int(item_key)


class UserStateSink(_PerPartitionSink):
    """Writes the pairs and dead letters of :class:`UserBatch` es to Kafka."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, settings.topics.events)

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _UserSinkPartition:
        return _UserSinkPartition(self._settings)


class CatalogSink(_PerPartitionSink):
    """Writes the changed items and dead letters of :class:`CatalogBatch` es to Kafka."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, settings.topics.catalog)

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _CatalogSinkPartition:
        return _CatalogSinkPartition(self._settings)


class _CollabSinkPartition(_FlushingSinkPartition):
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._kafka = _KafkaOut(settings)

    def write_batch(self, values: list[Any]) -> None:
        topics = self._settings.topics
        for value in values:
            if isinstance(value, DeadLetter):
                self._kafka.send(topics.dead_letter, None, value.to_bytes())
                continue
            batch: CollabBatch = value
            for dead in batch.dead_letters:
                self._kafka.send(topics.dead_letter, None, dead.to_bytes())
            for user_id, record in batch.examples:
                self._kafka.send(topics.rank_examples, user_id, record)
            for user_id, vector in batch.vectors.items():
                # An empty value removes the shopper from serving's index (serving.shoppers): one
                # forgotten by retention, or whose vector is gone; Redis loses it in the same batch.
                self._kafka.send(topics.shopper_vectors, user_id, b"" if vector is None else vector)
        self._kafka.maybe_flush()


class CollabSink(FixedPartitionedSink[Any, None]):
    """Rank examples, shopper vectors and dead letters of the collaborative flow's batches, to Kafka.

    One sink partition: the flow's state is one partition too (:mod:`streams.collab_partition`),
    and its records are few next to the events (one example per basket).
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def list_parts(self) -> list[str]:
        return ["shop"]

    def part_fn(self, item_key: str) -> int:
        return 0

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _CollabSinkPartition:
        return _CollabSinkPartition(self._settings)
