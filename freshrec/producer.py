"""The one Kafka producer wrapper that event producers and every freshrec process use.

Invalid records never reach ``events`` or ``catalog``: they go to ``dead-letter`` with
the reason and the original bytes (a bounded prefix, with the whole record's size and
hash: :class:`~freshrec.contracts.DeadLetter`). Events are keyed by user id, so one
shopper's events land in one partition and stay in order; catalog records are keyed by
item id, so the latest record of an item wins.

A record too large to send is rejected like any invalid one, never raised: the size is
checked before sending (the contract's limit, and the broker's message limit), and a
broker that still refuses a record for its size gets a dead letter in its place. One
oversize line in a file must not stop the good lines after it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError

from .contracts import (
    MAX_RECORD_BYTES,
    CatalogRecord,
    DeadLetter,
    Event,
    InvalidRecord,
    oversize,
    parse_catalog,
    parse_event,
)
from .kafka_security import kafka_python_options
from .settings import Settings


INTERRUPTED_FLUSH_S = 5.0  # how long a producer left by an exception still tries to deliver
# Apache Kafka's default broker limit (message.max.bytes, 1 MB plus a 12-byte header);
# a broker configured lower than this refuses records on send, which is handled too.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
# Room for the key, headers and record-batch framing within the broker's message limit.
_FRAMING_BYTES = 1024
# Broker (and client) errors that mean "this record is too large": the record is
# dead-lettered instead of counted as a delivery failure.
_SIZE_ERRORS = (MessageSizeTooLargeError, RecordListTooLargeError)

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
        max_message_bytes: int = KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        """``max_message_bytes`` is the broker's message limit (``message.max.bytes``).

        A validated record is sent only if it is at most :attr:`max_record_bytes`: the
        contract's limit, or less when the broker's limit is lower.
        """
        self.settings = settings
        self.topics = settings.topics
        self.report = DeliveryReport()
        self.max_message_bytes = max_message_bytes
        self.max_record_bytes = min(MAX_RECORD_BYTES, max_message_bytes - _FRAMING_BYTES)
        self._clock = clock
        # Records the broker refused for their size, appended by the client's I/O thread
        # and dead-lettered by the caller's thread (sending from a callback can deadlock
        # on a full buffer that only the I/O thread drains).
        self._refused: deque[tuple[str, bytes, bool, BaseException]] = deque()
        self._producer = KafkaProducer(
            **kafka_python_options(settings),
            client_id=client_id,
            acks="all",
            linger_ms=linger_ms,
            batch_size=256 * 1024,
            max_request_size=max_message_bytes,
            retries=5,
            # One in flight per connection keeps a user's events ordered even across retries.
            max_in_flight_requests_per_connection=1,
        )

    # -- sending -----------------------------------------------------------------------

    def _on_ok(self, _meta: Any) -> None:
        self.report.confirmed += 1

    def _on_error(self, topic: str, value: bytes, counted: bool, exc: BaseException) -> None:
        if isinstance(exc, _SIZE_ERRORS) and topic != self.topics.dead_letter:
            self._refused.append((topic, value, counted, exc))
            return
        self.report.failed += 1
        if len(self.report.errors) < 20:
            self.report.errors.append(repr(exc))

    def send(self, topic: str, key: str | bytes | None, value: bytes) -> None:
        """Send bytes as they are (no validation); delivery is counted in :attr:`report`.

        A value over the broker's message limit, or one the broker refuses for its size,
        goes to dead-letter (counted as rejected) instead of raising or failing.
        """
        self._dead_letter_refused()
        self._send(topic, key, value, counted=False)

    def _send(self, topic: str, key: str | bytes | None, value: bytes, counted: bool) -> None:
        """``counted``: the record is one of :attr:`DeliveryReport.sent` (a validated record)."""
        kbytes = key.encode() if isinstance(key, str) else key
        size = len(value) + len(kbytes or b"")
        limit = self.max_message_bytes - _FRAMING_BYTES
        if size > limit:
            if topic == self.topics.dead_letter:  # cannot happen at Kafka's limits; never recurse
                self._on_error(topic, value, counted, ValueError(f"dead letter of {size} bytes over the {limit}-byte limit"))
            else:
                self.dead_letter("producer", oversize(size, limit), value, topic)
            return
        try:
            fut = self._producer.send(topic, key=kbytes, value=value)
        except _SIZE_ERRORS as exc:  # the client's own estimate, framing included
            if topic == self.topics.dead_letter:
                self._on_error(topic, value, counted, exc)
            else:
                self._reject_too_large(topic, value, exc)
            return
        fut.add_callback(self._on_ok)
        fut.add_errback(self._on_error, topic, value, counted)
        if counted:
            self.report.sent += 1

    def _reject_too_large(self, topic: str, value: bytes, exc: BaseException) -> None:
        err = InvalidRecord(
            "record",
            f"record is {len(value)} bytes and Kafka refused it as too large ({type(exc).__name__}); "
            f"raise the broker's message.max.bytes or shorten the record",
        )
        self.dead_letter("producer", err, value, topic)

    def _dead_letter_refused(self) -> None:
        """Turn records the broker refused for their size into dead letters (caller's thread)."""
        while self._refused:
            topic, value, counted, exc = self._refused.popleft()
            if counted:
                self.report.sent -= 1  # it never reached its topic: a rejection, not a send
            self._reject_too_large(topic, value, exc)

    def dead_letter(self, stage: str, error: InvalidRecord, raw: bytes | str, source_topic: str) -> None:
        """Send a dead letter for ``raw`` (cut to a bounded prefix), counted as rejected."""
        self.report.rejected += 1
        self._send(self.topics.dead_letter, None, DeadLetter.of(stage, error, raw, source_topic).to_bytes(), False)

    def _checked(self, raw: bytes | str | dict[str, Any], source_topic: str) -> bool:
        """False (and a dead letter) when raw bytes are over :attr:`max_record_bytes`.

        Checked before parsing: a 5 MB line is not worth decoding to reject it.
        """
        if isinstance(raw, dict):
            return True
        size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
        if size <= self.max_record_bytes:
            return True
        self.dead_letter("producer", oversize(size, self.max_record_bytes), _as_bytes(raw), source_topic)
        return False

    def _send_valid(self, topic: str, key: str, value: bytes, raw: bytes | str | dict[str, Any]) -> bool:
        """Send a validated record's bytes unless they are over :attr:`max_record_bytes`
        (possible only for a dict input, whose raw size was not checked)."""
        if len(value) > self.max_record_bytes:
            self.dead_letter("producer", oversize(len(value), self.max_record_bytes), _as_bytes(raw), topic)
            return False
        self._send(topic, key, value, counted=True)
        return True

    def send_event(self, raw: bytes | str | dict[str, Any], stamp_sent_at: bool = False) -> Event | None:
        """Validate and send one event; return it, or None if it went to dead-letter."""
        self._dead_letter_refused()
        topic = self.topics.events
        if not self._checked(raw, topic):
            return None
        try:
            event = parse_event(raw, now=self._clock())
        except InvalidRecord as err:
            self.dead_letter("producer", err, _as_bytes(raw), topic)
            return None
        if stamp_sent_at:
            event = event.model_copy(update={"sent_at": self._clock()})
        return event if self._send_valid(topic, event.user_id, event.to_bytes(), raw) else None

    def send_catalog(self, raw: bytes | str | dict[str, Any]) -> CatalogRecord | None:
        """Validate and send one catalog record; return it, or None if it went to dead-letter."""
        self._dead_letter_refused()
        topic = self.topics.catalog
        if not self._checked(raw, topic):
            return None
        try:
            record = parse_catalog(raw)
        except InvalidRecord as err:
            self.dead_letter("producer", err, _as_bytes(raw), topic)
            return None
        return record if self._send_valid(topic, record.item_id, record.to_bytes(), raw) else None

    def flush(self, timeout: float = 60.0) -> DeliveryReport:
        """Block until every record is acknowledged, failed, or dead-lettered for its size."""
        deadline = time.monotonic() + timeout
        self._producer.flush(timeout=timeout)
        # Dead letters of records refused during that flush are sent and awaited too; they
        # are bounded in size, so this loop ends after one more round.
        while self._refused:
            self._dead_letter_refused()
            self._producer.flush(timeout=max(deadline - time.monotonic(), 1.0))
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
        return raw.encode("utf-8", "surrogatepass")
    try:
        return orjson.dumps(raw)
    except TypeError:
        return repr(raw).encode()
