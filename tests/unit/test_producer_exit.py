"""How ``RecordProducer`` leaves a ``with`` block: a full flush normally, a bounded one on an error.

A Ctrl-C inside the Kafka client can leave a record it never finished taking, and a
flush then waits its whole timeout: leaving on an exception must be quick (a stopping
demo has a budget) and must not hide the cause.
"""

from __future__ import annotations

from collections import deque

import pytest
from kafka.errors import KafkaTimeoutError

from freshrec.producer import INTERRUPTED_FLUSH_S, DeliveryReport, RecordProducer


class StuckClient:
    """A client whose flush never completes (it times out), recording the timeouts asked for."""

    def __init__(self) -> None:
        self.flushes: list[float] = []
        self.closes: list[float] = []

    def flush(self, timeout: float) -> None:
        self.flushes.append(timeout)
        raise KafkaTimeoutError(f"flush did not complete within {timeout} s")

    def close(self, timeout: float) -> None:
        self.closes.append(timeout)


def producer_with(client: StuckClient) -> RecordProducer:
    producer = RecordProducer.__new__(RecordProducer)  # no broker: only the exit policy is tested
    producer.report = DeliveryReport(sent=3, confirmed=2)
    producer._refused = deque()
    producer._producer = client  # type: ignore[assignment]
    return producer


def test_leaving_on_an_interrupt_flushes_briefly_closes_and_keeps_the_interrupt(caplog: pytest.LogCaptureFixture) -> None:
    client = StuckClient()
    producer = producer_with(client)
    with pytest.raises(KeyboardInterrupt):
        with producer:
            raise KeyboardInterrupt
    assert client.flushes == [INTERRUPTED_FLUSH_S] and client.closes == [INTERRUPTED_FLUSH_S]
    assert producer.report.pending == 1
    assert "KeyboardInterrupt" in producer.report.errors[0]
    assert "1 of 3 records not confirmed" in caplog.text


def test_a_normal_exit_waits_the_full_flush_raises_its_failure_and_still_closes() -> None:
    client = StuckClient()
    with pytest.raises(KafkaTimeoutError):
        with producer_with(client):
            pass
    assert client.flushes == [60.0] and client.closes == [10.0]
