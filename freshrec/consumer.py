"""The one kafka-python consumer wrapper for processes that follow a topic outside Bytewax.

It assigns every partition explicitly instead of joining a consumer group: the caller
owns its offsets (the learner checkpoints them with its training state; serving starts
where it wants), and Tansu's group join would wait out a rebalance timeout anyway.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from kafka import KafkaConsumer, TopicPartition

from .settings import Settings


@dataclass(frozen=True, slots=True)
class Message:
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int


Start = Literal["beginning", "end"] | dict[int, int]


class TopicFollower:
    """Follow one topic from given offsets; :meth:`positions` is what to checkpoint."""

    def __init__(self, settings: Settings, topic: str, start: Start = "beginning", client_id: str = "freshrec") -> None:
        self.topic = topic
        self._consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka_servers,
            client_id=client_id,
            enable_auto_commit=False,
            group_id=None,
            max_poll_records=2000,
            fetch_max_wait_ms=50,
        )
        parts = self._partitions(topic)
        self._tps = [TopicPartition(topic, p) for p in parts]
        self._consumer.assign(self._tps)
        if start == "beginning":
            self._consumer.seek_to_beginning(*self._tps)
        elif start == "end":
            self._consumer.seek_to_end(*self._tps)
        else:
            begin = self._consumer.beginning_offsets(self._tps)
            for tp in self._tps:
                self._consumer.seek(tp, max(start.get(tp.partition, 0), begin[tp]))

    def _partitions(self, topic: str, timeout: float = 10.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            parts = self._consumer.partitions_for_topic(topic)
            if parts:
                return sorted(parts)
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topic!r} does not exist on the broker; run `freshrec up` first")
            time.sleep(0.1)

    def poll(self, timeout_s: float = 0.2) -> list[Message]:
        out: list[Message] = []
        for tp, records in self._consumer.poll(timeout_ms=int(timeout_s * 1000)).items():
            for r in records:
                out.append(Message(tp.partition, r.offset, r.key, r.value, r.timestamp))
        return out

    def positions(self) -> dict[int, int]:
        """Next offset to read, per partition."""
        return {tp.partition: self._consumer.position(tp) for tp in self._tps}

    def end_offsets(self) -> dict[int, int]:
        return {tp.partition: off for tp, off in self._consumer.end_offsets(self._tps).items()}

    def lag(self) -> int:
        ends = self.end_offsets()
        pos = self.positions()
        return sum(max(ends[p] - pos[p], 0) for p in ends)

    def drain(self, idle_s: float = 1.0, timeout_s: float = 60.0) -> Iterator[Message]:
        """Yield messages until the end offsets are reached and nothing new came for idle_s."""
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while time.monotonic() < deadline:
            batch = self.poll(0.2)
            if batch:
                last = time.monotonic()
                yield from batch
            elif time.monotonic() - last > idle_s and self.lag() == 0:
                return

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> TopicFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def follow_until(
    stop: threading.Event,
    open_follower: Callable[[], TopicFollower],
    on_poll: Callable[[TopicFollower, list[Message]], None],
    on_error: Callable[[Exception], None],
    poll_s: float = 0.2,
    retry_s: float = 1.0,
) -> None:
    """Poll a follower until ``stop`` is set; after any error, close it and open a new one.

    Long-running background consumers (serving's item-vectors and adapters followers)
    must outlive a broker restart or a bad poll: ``on_error`` hears of it, the follower
    is reopened ``retry_s`` later (``open_follower`` decides where it starts), and
    ``on_poll`` is called after every poll, also with no messages.
    """
    follower: TopicFollower | None = None
    try:
        while not stop.is_set():
            try:
                if follower is None:
                    follower = open_follower()
                on_poll(follower, follower.poll(poll_s))
            except Exception as exc:
                on_error(exc)
                if follower is not None:
                    with contextlib.suppress(Exception):
                        follower.close()
                    follower = None
                stop.wait(retry_s)
    finally:
        if follower is not None:
            with contextlib.suppress(Exception):
                follower.close()


def topic_counts(settings: Settings) -> dict[str, int]:
    """Messages held per freshrec topic (sum of end minus beginning offsets)."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_servers, client_id="freshrec-count")
    try:
        out = {}
        for topic in settings.topics.all():
            parts = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in parts]
            if not tps:
                out[topic] = 0
                continue
            ends = consumer.end_offsets(tps)
            begins = consumer.beginning_offsets(tps)
            out[topic] = sum(ends[tp] - begins[tp] for tp in tps)
        return out
    finally:
        consumer.close()
