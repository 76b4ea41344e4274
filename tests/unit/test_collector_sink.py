"""The collector's Kafka adapter with a stand-in client: where each record goes, and that
only a confirmed future counts (a failed send, a failed or late future, no broker)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka.errors import KafkaConnectionError, KafkaTimeoutError

from collector.batch import RawRecord, check_batch
from collector.sink import BrokerUnavailable, EventSink
from freshrec.contracts import DeadLetter
from freshrec.settings import Settings


class Future:
    def __init__(self, ok: bool | None) -> None:
        self.ok = ok  # None: never completes

    def get(self, timeout: float) -> None:
        if self.ok is None:
            time.sleep(timeout)
            raise KafkaTimeoutError("no answer")
        if not self.ok:
            raise KafkaTimeoutError("expired")


class Producer:
    def __init__(self, fail_from: int | None = None, outcomes: dict[int, bool | None] | None = None, **config: Any) -> None:
        self.config = config
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.fail_from = fail_from
        self.outcomes = outcomes or {}

    def send(self, topic: str, key: bytes | None, value: bytes) -> Future:
        n = len(self.sent)
        if self.fail_from is not None and n >= self.fail_from:
            raise KafkaTimeoutError("metadata not available after max_block_ms")
        self.sent.append((topic, key, value))
        return Future(self.outcomes.get(n, True))

    def close(self, timeout: float) -> None:
        pass


def _settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path, topic_prefix="t.", collector_send_timeout_s=0.2)


def _checked() -> list[Any]:
    good = {"event_id": "e1", "user_id": "u1", "kind": "view", "item_id": "i1", "ts": time.time()}
    return check_batch([RawRecord(0, orjson.dumps(good)), RawRecord(1, b"{nope"), RawRecord(2, orjson.dumps({**good, "event_id": "e2"}))],
                       time.time())


def test_events_go_to_the_events_topic_keyed_by_user_and_rejects_to_the_dead_letter(tmp_path: Path) -> None:
    producer = Producer()
    sink = EventSink(_settings(tmp_path), producer_factory=lambda **kw: producer)
    assert sink.send_batch(_checked()) == [True, True, True]
    assert [(t, k) for t, k, _ in producer.sent] == [("t.events", b"u1"), ("t.dead-letter", None), ("t.events", b"u1")]
    letter = DeadLetter.from_bytes(producer.sent[1][2])
    assert (letter.stage, letter.field, letter.raw, letter.source_topic) == ("collector", "record", b"{nope", "t.events")


def test_the_producer_waits_for_all_replicas_and_every_wait_is_bounded(tmp_path: Path) -> None:
    made: list[dict[str, Any]] = []
    sink = EventSink(_settings(tmp_path), producer_factory=lambda **kw: made.append(kw) or Producer())
    sink.connect()
    cfg = made[0]
    assert cfg["acks"] == "all" and cfg["max_in_flight_requests_per_connection"] == 1
    assert cfg["max_block_ms"] == 200 and cfg["delivery_timeout_ms"] >= cfg["linger_ms"] + cfg["request_timeout_ms"]
    assert cfg["bootstrap_timeout_ms"] == 5000


def test_a_failed_or_unanswered_future_is_not_confirmed(tmp_path: Path) -> None:
    producer = Producer(outcomes={0: False, 2: None})
    sink = EventSink(_settings(tmp_path), producer_factory=lambda **kw: producer)
    t0 = time.monotonic()
    assert sink.send_batch(_checked()) == [False, True, False]
    assert time.monotonic() - t0 < 3  # bounded by collector_send_timeout_s (+1 s)


def test_a_send_that_blocks_out_stops_the_batch_and_leaves_the_rest_unconfirmed(tmp_path: Path) -> None:
    producer = Producer(fail_from=1)
    sink = EventSink(_settings(tmp_path), producer_factory=lambda **kw: producer)
    assert sink.send_batch(_checked()) == [True, False, False]
    assert len(producer.sent) == 1  # no second send blocking max_block_ms again


def test_no_broker_is_broker_unavailable_and_the_next_call_tries_again(tmp_path: Path) -> None:
    calls: list[int] = []

    def factory(**kw: Any) -> Producer:
        calls.append(1)
        if len(calls) == 1:
            raise KafkaConnectionError("connection refused")
        return Producer()

    sink = EventSink(_settings(tmp_path), producer_factory=factory)
    with pytest.raises(BrokerUnavailable, match="cannot reach the broker"):
        sink.send_batch(_checked())
    assert not sink.connected
    assert sink.send_batch(_checked()) == [True, True, True] and sink.connected


def test_while_one_caller_connects_the_others_are_told_unavailable_at_once(tmp_path: Path) -> None:
    release = threading.Event()

    def slow_factory(**kw: Any) -> Producer:
        release.wait(5)
        return Producer()

    sink = EventSink(_settings(tmp_path), producer_factory=slow_factory)
    first = threading.Thread(target=sink.connect)
    first.start()
    time.sleep(0.1)
    with pytest.raises(BrokerUnavailable, match="connecting"):
        sink.send_batch(_checked())
    release.set()
    first.join(5)
    assert sink.connected
