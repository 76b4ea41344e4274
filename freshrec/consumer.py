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
from dataclasses import dataclass, field
from typing import Literal

from kafka import KafkaConsumer, TopicPartition

from .kafka_security import kafka_python_options
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
            **kafka_python_options(settings),
            client_id=client_id,
            enable_auto_commit=False,
            group_id=None,
            max_poll_records=2000,
            fetch_max_wait_ms=settings.follower_fetch_wait_ms,
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

    def end_offsets(self, timeout_s: float | None = None) -> dict[int, int]:
        """Log end per partition; raises ``KafkaTimeoutError`` after ``timeout_s`` (the
        client's request timeout, 30 s, when None) if the broker does not answer."""
        timeout_ms = None if timeout_s is None else int(timeout_s * 1000)
        return {tp.partition: off for tp, off in self._consumer.end_offsets(self._tps, timeout_ms).items()}

    def lag(self, timeout_s: float | None = None) -> int:
        ends = self.end_offsets(timeout_s)
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

    ``on_error`` hears of each error, the follower is reopened ``retry_s`` later wherever
    ``open_follower`` says, and ``on_poll`` is called after every poll, also with no
    messages. A follower that must not skip anything (serving's item-vectors and adapters
    followers) uses :func:`follow_resuming` instead: it reopens at the applied positions.
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


@dataclass
class AppliedPositions:
    """Per partition, the offset after the last record that was *applied*, not just read.

    A consumer's own position moves as soon as a poll returns, so after an error it says
    where reading stopped, not where applying did; reopening there (or at the end of the
    topic) silently skips whatever was read but not applied, or arrived meanwhile. This
    is where a follower must resume instead. Pure bookkeeping: no Kafka inside.
    """

    next: dict[int, int] = field(default_factory=dict)

    def seed(self, positions: dict[int, int]) -> None:
        """Where a freshly opened follower stands, for the partitions not known yet (the
        first open decides the start, e.g. the end of the topic; later opens change nothing)."""
        for partition, offset in positions.items():
            self.next.setdefault(partition, offset)

    def applied(self, messages: list[Message]) -> None:
        """Mark ``messages`` as applied: their partitions resume after them."""
        for m in messages:
            if m.offset + 1 > self.next.get(m.partition, -1):
                self.next[m.partition] = m.offset + 1

    def resume(self, default: Start) -> Start:
        """The start for the next open: the applied positions, or ``default`` before any open."""
        return dict(self.next) if self.next else default


@dataclass
class Backoff:
    """Capped exponential pause between retries, and the outage it spans.

    ``failed`` gives the next pause (``first_s``, doubled per consecutive failure, at most
    ``cap_s``: a broker away for minutes is probed every ``cap_s``, not hammered);
    ``succeeded`` ends the outage and says how long it lasted (None when there was none).
    """

    first_s: float = 0.5
    cap_s: float = 15.0
    failures: int = 0
    since: float | None = None

    def failed(self, now: float) -> float:
        if self.since is None:
            self.since = now
        pause = min(self.cap_s, self.first_s * 2 ** min(self.failures, 30))
        self.failures += 1
        return pause

    def succeeded(self, now: float) -> float | None:
        if self.since is None:
            return None
        lasted = now - self.since
        self.since, self.failures = None, 0
        return lasted

    def outage_s(self, now: float) -> float:
        """Seconds since the first failure of the current outage (0 when there is none)."""
        return 0.0 if self.since is None else now - self.since


def follow_resuming(
    stop: threading.Event,
    open_at: Callable[[Start], TopicFollower],
    start: Start,
    on_batch: Callable[[TopicFollower, list[Message]], None],
    on_error: Callable[[Exception, Backoff, float], None],
    on_recovered: Callable[[float, int], None] | None = None,
    poll_s: float = 0.2,
    backoff: Backoff | None = None,
    positions: AppliedPositions | None = None,
) -> None:
    """Follow a topic until ``stop`` is set, never skipping a record, whatever fails.

    ``on_batch`` applies each poll's messages (also an empty poll); a batch counts as
    applied only when it returns. Any exception (the broker gone, a request timing out, the
    apply itself failing) closes the follower, waits the next :class:`Backoff` pause and
    reopens it at the :class:`AppliedPositions`, so the failed batch is read and applied
    again (``on_batch`` must be idempotent) and what arrived meanwhile is read too.
    ``start`` is used only until a follower has opened once. ``on_error(exc, backoff,
    pause_s)`` hears of each failure, ``on_recovered(outage_s, failures)`` of the first
    batch applied after some.
    """
    backoff = backoff or Backoff()
    positions = positions if positions is not None else AppliedPositions()
    follower: TopicFollower | None = None
    try:
        while not stop.is_set():
            try:
                if follower is None:
                    follower = open_at(positions.resume(start))
                    positions.seed(follower.positions())
                batch = follower.poll(poll_s)
                on_batch(follower, batch)
                positions.applied(batch)
                failures = backoff.failures
                lasted = backoff.succeeded(time.monotonic())
                if lasted is not None and on_recovered is not None:
                    on_recovered(lasted, failures)
            except Exception as exc:
                pause = backoff.failed(time.monotonic())
                on_error(exc, backoff, pause)
                if follower is not None:
                    with contextlib.suppress(Exception):
                        follower.close()
                    follower = None
                stop.wait(pause)
    finally:
        if follower is not None:
            with contextlib.suppress(Exception):
                follower.close()


def topic_counts(settings: Settings) -> dict[str, int]:
    """Messages held per freshrec topic (sum of end minus beginning offsets)."""
    consumer = KafkaConsumer(**kafka_python_options(settings), client_id="freshrec-count")
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
