"""The collector's one Kafka adapter: send a checked batch and say, per record, what the broker confirmed.

It holds a kafka-python producer configured as :class:`freshrec.producer.RecordProducer`
configures its own (``acks=all``, one request in flight per connection so a shopper's
events stay in order across retries), and not that class itself, because an HTTP answer
is per record: :class:`~freshrec.producer.RecordProducer` counts confirmations for its
whole lifetime, while here each request waits on the futures of its own records only,
so concurrent requests share one producer (and its batches) without waiting on each
other's records. Validation and keying are :mod:`collector.batch`'s; the dead letters
are :class:`~freshrec.contracts.DeadLetter`, bounded as every other stage's.

Every wait is bounded by the settings, because a producer behind HTTP must answer: the
client's bootstrap (``collector_connect_timeout_s``) and each batch's delivery
(``collector_send_timeout_s``, which also caps how long ``send`` may block on metadata
or a full buffer). A broker that cannot be reached at all is :class:`BrokerUnavailable`
(the app's 503 with nothing accepted); one that goes away mid-batch leaves those records
unconfirmed, never guessed as delivered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from freshrec.contracts import DeadLetter
from freshrec.kafka_security import kafka_python_options
from freshrec.settings import Settings

from .batch import Accepted, Checked

STAGE = "collector"  # the dead letters' stage
_LINGER_MS = 5

log = logging.getLogger(__name__)


class BrokerUnavailable(RuntimeError):
    """No producer could be connected: nothing of the request was sent."""


class EventSink:
    """Send checked records (events keyed by user, rejects as dead letters) and await them.

    Thread-safe: the app calls :meth:`send_batch` from worker threads, one per request.
    The producer is connected on first use and again after a failed connect, by one
    caller at a time; the others are told :class:`BrokerUnavailable` meanwhile rather
    than queueing behind a bootstrap that may take ``collector_connect_timeout_s``.
    """

    def __init__(
        self,
        settings: Settings,
        client_id: str = "freshrec-collector",
        producer_factory: Callable[..., Any] = KafkaProducer,
    ) -> None:
        self.settings = settings
        self.topics = settings.topics
        self._client_id = client_id
        self._factory = producer_factory
        self._producer: Any = None
        self._connecting = threading.Lock()
        self.send_timeout_s = settings.collector_send_timeout_s

    @property
    def connected(self) -> bool:
        """A producer is up (it may still find the broker gone on the next send)."""
        return self._producer is not None

    def connect(self) -> None:
        """Build the producer now; raise :class:`BrokerUnavailable` if the broker cannot be reached."""
        self._ensure_producer()

    def _ensure_producer(self) -> Any:
        producer = self._producer
        if producer is not None:
            return producer
        if not self._connecting.acquire(blocking=False):
            raise BrokerUnavailable("the collector is connecting to the broker")
        try:
            if self._producer is None:
                self._producer = self._build()
            return self._producer
        finally:
            self._connecting.release()

    def _build(self) -> Any:
        send_ms = int(self.send_timeout_s * 1000)
        try:
            return self._factory(
                **kafka_python_options(self.settings),
                client_id=self._client_id,
                acks="all",
                linger_ms=_LINGER_MS,
                batch_size=256 * 1024,
                retries=5,
                max_in_flight_requests_per_connection=1,
                bootstrap_timeout_ms=int(self.settings.collector_connect_timeout_s * 1000),
                max_block_ms=send_ms,
                request_timeout_ms=max(int(send_ms * 0.8), 100),
                delivery_timeout_ms=send_ms + _LINGER_MS,
            )
        except (KafkaError, OSError) as exc:  # refused, timed out, a name that does not resolve
            raise BrokerUnavailable(f"cannot reach the broker at {self.settings.kafka_bootstrap}: {exc}") from exc

    def send_batch(self, checked: Sequence[Checked]) -> list[bool]:
        """Send each record and wait for the broker; ``result[i]``: record i confirmed.

        An :class:`~collector.batch.Accepted` goes to the events topic keyed by its user;
        a :class:`~collector.batch.Rejected` goes to the dead letter. Raises
        :class:`BrokerUnavailable`, sending nothing, when no producer can be connected.
        """
        producer = self._ensure_producer()
        futures: list[Any] = []
        for record in checked:
            try:
                if isinstance(record, Accepted):
                    fut = producer.send(self.topics.events, key=record.key, value=record.value)
                else:
                    letter = DeadLetter.of(STAGE, record.error, record.raw, self.topics.events)
                    fut = producer.send(self.topics.dead_letter, key=None, value=letter.to_bytes())
            except KafkaError as exc:
                # send blocked max_block_ms (no metadata, full buffer): the broker is away, and
                # each further send would block as long again. The rest stay unsent.
                log.warning("collector: send failed after %d of %d records: %r", len(futures), len(checked), exc)
                break
            futures.append(fut)
        return self._await(futures, len(checked))

    def _await(self, futures: list[Any], total: int) -> list[bool]:
        deadline = time.monotonic() + self.send_timeout_s + 1.0
        confirmed: list[bool] = []
        for fut in futures:
            try:
                fut.get(timeout=max(deadline - time.monotonic(), 0.0))
                confirmed.append(True)
            except Exception as exc:  # noqa: BLE001 - any failure (timeout, broker error) is "not confirmed"
                if all(confirmed):  # log the first failure of a batch only
                    log.warning("collector: a record was not confirmed: %r", exc)
                confirmed.append(False)
        return confirmed + [False] * (total - len(futures))

    def close(self, timeout: float = 5.0) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.close(timeout=timeout)
