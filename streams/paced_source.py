"""Bytewax's Kafka source, polled less often while a partition is idle.

Bytewax's ``KafkaSource`` asks librdkafka for messages with a 1 ms timeout and, after an
empty batch, tries again 1 ms later: an idle flow wakes ~500 times a second per
partition, which bench/idle.py measured as 3.7-4.8 % of a core per flow with nothing to
do (issue 15 item 6). Here a partition that has returned nothing for ``IDLE_AFTER_S`` sleeps,
through Bytewax's ``next_awake`` (never ``time.sleep``, which would stall the worker's other
partitions and steps), for a pause that doubles from :data:`FIRST_PAUSE_S` up to
``idle_max_s`` and drops to zero with the first message. The cost is latency after a quiet
stretch only: the first event after it waits at most ``idle_max_s`` longer
(``stream_idle_poll_ms``).

Why only after a quiet stretch: under traffic librdkafka hands over messages in bursts, one
per fetch response, and polls between two bursts come back empty. Pausing after every
empty poll added 20-90 ms to the freshness p99 at 1,000-5,000 events/s (bench.freshness,
2026-12-04); a partition that has had no message for ``IDLE_AFTER_S`` is idle, not between
bursts.

Only the polling changes: messages, offsets, snapshots and errors are the inner
partition's, so the exactly-once argument of :mod:`streams.user_partition` is untouched.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

from bytewax.connectors.kafka import KafkaSource
from bytewax.inputs import StatefulSourcePartition

FIRST_PAUSE_S = 0.002
IDLE_AFTER_S = 0.5


class IdlePacing:
    """The pause after each batch: 0 until ``idle_after_s`` has passed without a message, then
    doubling from ``first_s`` up to ``max_s``; back to 0 with the next message."""

    def __init__(self, max_s: float, first_s: float = FIRST_PAUSE_S, idle_after_s: float = IDLE_AFTER_S) -> None:
        self.max_s = max_s
        self.first_s = min(first_s, max_s)
        self.idle_after_s = idle_after_s
        self.pause_s = 0.0
        self.last_message: float | None = None

    def after(self, batch_size: int, now: float) -> float:
        if self.last_message is None or batch_size:
            self.last_message = now
        if batch_size or self.max_s <= 0 or now - self.last_message < self.idle_after_s:
            self.pause_s = 0.0
        else:
            self.pause_s = min(self.max_s, max(self.first_s, 2 * self.pause_s))
        return self.pause_s


class PacedPartition(StatefulSourcePartition[Any, Any]):
    """A source partition that wraps another and adds :class:`IdlePacing` through ``next_awake``."""

    def __init__(self, inner: StatefulSourcePartition[Any, Any], idle_max_s: float) -> None:
        self.inner = inner
        self.pacing = IdlePacing(idle_max_s)
        self._awake: datetime | None = None

    def next_batch(self) -> list[Any]:
        batch = self.inner.next_batch()
        pause = self.pacing.after(len(batch), time.monotonic())
        self._awake = datetime.now(timezone.utc) + timedelta(seconds=pause) if pause > 0 else None
        return batch

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self) -> Any:
        return self.inner.snapshot()

    def close(self) -> None:
        self.inner.close()


class PacedKafkaSource(KafkaSource):
    """``KafkaSource`` whose partitions are :class:`PacedPartition` s (``idle_max_s`` 0: Bytewax's own pacing)."""

    def __init__(self, *args: Any, idle_max_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_max_s = idle_max_s

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> PacedPartition:  # type: ignore[override]
        return PacedPartition(super().build_part(step_id, for_part, resume_state), self.idle_max_s)
