"""The one Kafka producer wrapper that event producers and every freshrec process use.

Invalid records never reach ``events`` or ``catalog``: they go to ``dead-letter`` with
the reason and the original bytes. Events are keyed by user id, so one shopper's events
land in one partition and stay in order; catalog records are keyed by item id, so the
latest record of an item wins.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError

from .contracts import CatalogRecord, DeadLetter, Event, InvalidRecord, parse_catalog, parse_event
from .settings import Settings


INTERRUPTED_FLUSH_S = 5.0  # how long a producer left by an exception still tries to deliver

log = logging.getLogger(__name__)


@dataclass
class DeliveryReport:
    """Counts for one producer's lifetime; ``confirmed`` is acknowledged by the broker."""

    sent: int = 0
    rejected: int = 0
    confirmed: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def pending(self) -> int:
        return self.sent + self.rejected - self.confirmed - self.failed


class RecordProducer:
    """Validate, key, batch and send records; count what the broker confirmed.

    Example::

        producer = RecordProducer(settings)
        producer.send_event({"event_id": "e1", "user_id": "u1", "item_id": "i1",
                             "kind": "click", "ts": time.time()})
        report = producer.flush()   # report.confirmed == 1
    """

    def __init__(
        self,
        settings: Settings,
        client_id: str = "freshrec-producer",
        clock: Callable[[], float] = time.time,
        linger_ms: int = 5,
    ) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.report = DeliveryReport()
        self._clock = clock
        self._producer = KafkaProducer(
            bootstrap_servers=settings.kafka_servers,
            client_id=client_id,
            acks="all",
            linger_ms=linger_ms,
            batch_size=256 * 1024,
            max_request_size=4 * 1024 * 1024,
            retries=5,
            # One in flight per connection keeps a user's events ordered even across retries.
            max_in_flight_requests_per_connection=1,
        )

    # -- sending -----------------------------------------------------------------------

    def _on_ok(self, _meta: Any) -> None:
        self.report.confirmed += 1

    def _on_error(self, exc: BaseException) -> None:
        self.report.failed += 1
        if len(self.report.errors) < 20:
            self.report.errors.append(repr(exc))

    def send(self, topic: str, key: str | bytes | None, value: bytes) -> None:
        """Send already-valid bytes; delivery is counted in :attr:`report`."""
        kbytes = key.encode() if isinstance(key, str) else key
        fut = self._producer.send(topic, key=kbytes, value=value)
        fut.add_callback(self._on_ok)
        fut.add_errback(self._on_error)

    def dead_letter(self, stage: str, error: InvalidRecord, raw: bytes | str, source_topic: str) -> None:
        self.report.rejected += 1
        self.send(self.topics.dead_letter, None, DeadLetter.of(stage, error, raw, source_topic).to_bytes())

    def send_event(self, raw: bytes | str | dict[str, Any], stamp_sent_at: bool = False) -> Event | None:
        """Validate and send one event; return it, or None if it went to dead-letter."""
        try:
            event = parse_event(raw, now=self._clock())
        except InvalidRecord as err:
            self.dead_letter("producer", err, _as_bytes(raw), self.topics.events)
            return None
        if stamp_sent_at:
            event = event.model_copy(update={"sent_at": self._clock()})
        self.send(self.topics.events, event.user_id, event.to_bytes())
        self.report.sent += 1
        return event

    def send_catalog(self, raw: bytes | str | dict[str, Any]) -> CatalogRecord | None:
        try:
            record = parse_catalog(raw)
        except InvalidRecord as err:
            self.dead_letter("producer", err, _as_bytes(raw), self.topics.catalog)
            return None
        self.send(self.topics.catalog, record.item_id, record.to_bytes())
        self.report.sent += 1
        return record

    def flush(self, timeout: float = 60.0) -> DeliveryReport:
        """Block until every record is acknowledged or failed."""
        self._producer.flush(timeout=timeout)
        return self.report

    def close(self, timeout: float = 10.0) -> None:
        self._producer.close(timeout=timeout)

    def __enter__(self) -> RecordProducer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            try:
                self.flush()
            finally:
                self.close()
            return
        # Leaving on an error or Ctrl-C: the client may hold a record it never finished
        # taking (an interrupt inside send), and flush would wait its whole timeout for it.
        # Try briefly, keep the original exception, and say what was not confirmed (the
        # caller gets no report on this path, so it is logged).
        try:
            self.flush(timeout=INTERRUPTED_FLUSH_S)
        except KafkaError as err:
            self.report.errors.append(f"flush on exit after {exc_type.__name__}: {err}")
        finally:
            self.close(timeout=INTERRUPTED_FLUSH_S)
        if self.report.pending:
            log.warning(
                "producer left by %s: %d of %d records not confirmed within %.0f s",
                exc_type.__name__, self.report.pending, self.report.sent + self.report.rejected, INTERRUPTED_FLUSH_S,
            )


def _as_bytes(raw: bytes | str | dict[str, Any]) -> bytes:
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, str):
        return raw.encode()
    try:
        return orjson.dumps(raw)
    except TypeError:
        return repr(raw).encode()
