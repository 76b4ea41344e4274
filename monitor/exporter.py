"""The monitor's reads (Kafka end offsets and timestamps, the flows' applied offsets in
Redis) and the Prometheus collector that makes them figures at each scrape.

Reading at scrape time, not on a timer, keeps the figures as fresh as Prometheus asks and
costs nothing between scrapes: one ListOffsets round trip for every topic, one pipelined
read per flow from Redis, and one single-record fetch per lagging partition for its age.
A source that does not answer shows ``freshrec_monitor_up{source=...} 0`` and leaves the
figures that depend on it out of that scrape (a gap in the graph, not a false 0).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from freshrec.kafka_security import kafka_python_options
from freshrec.settings import Settings
from stores import catalog_store, collab_store, user_store
from stores.redis_client import connect

from .progress import FlowProgress, flow_progress, partition_of, partition_progress

log = logging.getLogger(__name__)

# flow -> (its input topic, its applied offsets in Redis as {partition: last applied offset})
FlowReader = tuple[Callable[[Settings], str], Callable[[Any, Settings], dict[int, int]]]
FLOWS: dict[str, FlowReader] = {
    "users": (
        lambda s: s.topics.events,
        lambda c, s: {partition_of(f): o for f, o in user_store.read_applied_offsets(c, s).items()},
    ),
    "collab": (lambda s: s.topics.events, lambda c, s: {int(p): o for p, o in collab_store.read_offsets(c, s).items()}),
    "catalog": (
        lambda s: s.topics.catalog,
        lambda c, s: {partition_of(f): o for f, o in catalog_store.read_applied_offsets(c, s).items()},
    ),
}


class TopicOffsets:
    """Read-only Kafka access of the monitor: partitions, first and end offsets, and the
    timestamp of the record at an offset. One consumer, no group, nothing committed."""

    def __init__(self, settings: Settings, timeout_s: float = 3.0) -> None:
        self._timeout_ms = int(timeout_s * 1000)
        # A scrape must answer within Prometheus's scrape timeout (10 s) when the broker is
        # gone, not wait out kafka-python's 30 s bootstrap (its option since 2.1; older ones refuse it).
        bounded = {"bootstrap_timeout_ms": self._timeout_ms} if "bootstrap_timeout_ms" in KafkaConsumer.DEFAULT_CONFIG else {}
        self._consumer = KafkaConsumer(
            **kafka_python_options(settings), client_id="freshrec-monitor", group_id=None, enable_auto_commit=False,
            request_timeout_ms=6000, **bounded,
        )

    def partitions(self, topic: str) -> list[TopicPartition]:
        return [TopicPartition(topic, p) for p in sorted(self._consumer.partitions_for_topic(topic) or ())]

    def ends(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict(self._consumer.end_offsets(tps, self._timeout_ms)) if tps else {}

    def begins(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict(self._consumer.beginning_offsets(tps, self._timeout_ms)) if tps else {}

    def timestamp_ms(self, tp: TopicPartition, offset: int) -> int | None:
        """The timestamp of the record at ``offset`` (or the next one held); None if none came in time."""
        self._consumer.assign([tp])
        self._consumer.seek(tp, offset)
        for records in self._consumer.poll(timeout_ms=min(self._timeout_ms, 1000), max_records=1).values():
            for r in records:
                return int(r.timestamp)
        return None

    def close(self) -> None:
        self._consumer.close()


class FlowMonitor(Collector):
    """A Prometheus collector over the flows' progress (see the module docstring)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()  # the HTTP server answers scrapes on threads
        self._kafka: TopicOffsets | None = None
        self._redis: Any = None
        self._errors = {"kafka": 0, "redis": 0}

    def collect(self) -> Iterator[Any]:
        with self._lock:
            yield from self._collect()

    def _collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("freshrec_monitor_up", "1 when the monitor's last read of the source worked", labels=["source"])
        ends, begins = self._read_kafka()
        up.add_metric(["kafka"], 1.0 if ends is not None else 0.0)
        applied = self._read_redis()
        up.add_metric(["redis"], 1.0 if applied is not None else 0.0)
        yield up
        errors = CounterMetricFamily("freshrec_monitor_read_errors", "Failed reads of a source", labels=["source"])
        for source, n in self._errors.items():
            errors.add_metric([source], n)
        yield errors
        if ends is None:
            return
        messages = GaugeMetricFamily(
            "freshrec_topic_messages", "Sum of the topic's end offsets: its rate is messages written per second",
            labels=["topic"],
        )
        for topic in self.settings.topics.all():
            messages.add_metric([topic], float(sum(o for tp, o in ends.items() if tp.topic == topic)))
        yield messages
        if applied is None:
            return
        position = GaugeMetricFamily(
            "freshrec_flow_position", "Sum over input partitions of the next offset the flow applies (rate: messages/s)",
            labels=["flow"],
        )
        lag = GaugeMetricFamily("freshrec_flow_lag_messages", "Input messages the flow has not applied yet", labels=["flow"])
        age = GaugeMetricFamily(
            "freshrec_flow_lag_seconds", "Age of the oldest input message the flow has not applied (0: caught up)",
            labels=["flow"],
        )
        stamps: dict[tuple[str, int, int], int | None] = {}  # users and collab often wait on the same record
        for flow, (topic_of, _) in FLOWS.items():
            progress = self._progress(topic_of(self.settings), ends, begins, applied[flow], stamps)
            if progress is None:
                continue
            position.add_metric([flow], float(progress.position))
            lag.add_metric([flow], float(progress.lag))
            age.add_metric([flow], progress.lag_seconds)
        yield position
        yield lag
        yield age

    def _read_kafka(self) -> tuple[dict[TopicPartition, int] | None, dict[TopicPartition, int]]:
        try:
            if self._kafka is None:
                self._kafka = TopicOffsets(self.settings)
            tps = [tp for t in self.settings.topics.all() for tp in self._kafka.partitions(t)]
            flow_topics = {self.settings.topics.events, self.settings.topics.catalog}
            return self._kafka.ends(tps), self._kafka.begins([tp for tp in tps if tp.topic in flow_topics])
        except Exception as exc:  # noqa: BLE001 - a scrape reports the outage, it does not fail
            self._errors["kafka"] += 1
            log.warning("reading Kafka at %s: %s", self.settings.kafka_bootstrap, exc)
            self._close_kafka()
            return None, {}

    def _read_redis(self) -> dict[str, dict[int, int]] | None:
        try:
            if self._redis is None:
                self._redis = connect(self.settings)
            return {flow: read(self._redis, self.settings) for flow, (_, read) in FLOWS.items()}
        except Exception as exc:  # noqa: BLE001
            self._errors["redis"] += 1
            log.warning("reading the flows' offsets from Redis: %s", exc)
            self._redis = None
            return None

    def _progress(
        self, topic: str, ends: dict[TopicPartition, int], begins: dict[TopicPartition, int], applied: dict[int, int],
        stamps: dict[tuple[str, int, int], int | None],
    ) -> FlowProgress | None:
        end = {tp.partition: o for tp, o in ends.items() if tp.topic == topic}
        if not end:
            return None
        begin = {tp.partition: o for tp, o in begins.items() if tp.topic == topic}
        parts = partition_progress(begin, end, applied)
        oldest: dict[int, int] = {}
        for p in parts:
            if p.lag > 0 and self._kafka is not None:
                key = (topic, p.partition, p.position)
                if key not in stamps:
                    try:
                        stamps[key] = self._kafka.timestamp_ms(TopicPartition(topic, p.partition), p.position)
                    except Exception as exc:  # noqa: BLE001 - the age is left out, the counts stay
                        log.warning("reading the oldest waiting record of %s[%d]: %s", topic, p.partition, exc)
                        stamps[key] = None
                ts = stamps[key]
                if ts is not None:
                    oldest[p.partition] = ts
        return flow_progress(parts, oldest, self._clock())

    def _close_kafka(self) -> None:
        if self._kafka is not None:
            try:
                self._kafka.close()
            except Exception:  # noqa: BLE001
                pass
            self._kafka = None

    def close(self) -> None:
        with self._lock:
            self._close_kafka()


def monitor_registry(settings: Settings) -> tuple[CollectorRegistry, FlowMonitor]:
    """A registry holding a :class:`FlowMonitor` over ``settings`` (close the monitor when done)."""
    registry = CollectorRegistry()
    monitor = FlowMonitor(settings)
    registry.register(monitor)
    return registry, monitor
