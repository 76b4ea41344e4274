"""Oversize records are routed, never raised (issue 13, item 2).

A 5 MB line used to end ``freshrec produce`` in a ``MessageSizeTooLargeError`` traceback,
and the good lines after it were never sent. These tests run :class:`RecordProducer`
against a fake Kafka client that behaves like kafka-python (a synchronous size check
against ``max_request_size``) in front of a broker with a message limit of its own.
"""

from __future__ import annotations

import hashlib
import time
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

import freshrec.producer as producer_module
from freshrec.contracts import DEAD_LETTER_RAW_BYTES, MAX_DEAD_LETTER_BYTES, MAX_RECORD_BYTES, DeadLetter
from freshrec.producer import RecordProducer
from freshrec.settings import Settings


class FakeFuture:
    def __init__(self) -> None:
        self.callbacks: list[Any] = []
        self.errbacks: list[Any] = []

    def add_callback(self, f: Any, *args: Any) -> FakeFuture:
        self.callbacks.append(partial(f, *args))
        return self

    def add_errback(self, f: Any, *args: Any) -> FakeFuture:
        self.errbacks.append(partial(f, *args))
        return self


class FakeKafka:
    """kafka-python's client-side size check; a broker refusing values over ``broker_limit``
    on the topic ``limited_topic``."""

    broker_limit: int | None = None
    limited_topic = ""
    instances: list[FakeKafka] = []

    def __init__(self, **config: Any) -> None:
        self.config = config
        self.queued: list[tuple[str, bytes | None, bytes, FakeFuture]] = []
        self.topics: dict[str, list[tuple[bytes | None, bytes]]] = {}
        FakeKafka.instances.append(self)

    def send(self, topic: str, key: bytes | None = None, value: bytes = b"") -> FakeFuture:
        size = len(value) + len(key or b"") + 70  # kafka-python's estimate adds record framing
        if size > self.config["max_request_size"]:
            raise MessageSizeTooLargeError(f"The message is {size} bytes when serialized")
        fut = FakeFuture()
        self.queued.append((topic, key, value, fut))
        return fut

    def flush(self, timeout: float | None = None) -> None:
        while self.queued:
            topic, key, value, fut = self.queued.pop(0)
            if topic == self.limited_topic and self.broker_limit is not None and len(value) > self.broker_limit:
                for errback in fut.errbacks:
                    errback(MessageSizeTooLargeError())
                continue
            self.topics.setdefault(topic, []).append((key, value))
            for callback in fut.callbacks:
                callback(None)

    def close(self, timeout: float | None = None) -> None:
        pass


@pytest.fixture
def fake_kafka(monkeypatch: pytest.MonkeyPatch) -> type[FakeKafka]:
    FakeKafka.instances = []
    FakeKafka.broker_limit = None
    FakeKafka.limited_topic = ""
    monkeypatch.setattr(producer_module, "KafkaProducer", FakeKafka)
    return FakeKafka


SETTINGS = Settings(topic_prefix="t.")


def event_line(i: int, **over: Any) -> bytes:
    event = {"event_id": f"e{i}", "user_id": f"u{i % 3}", "item_id": f"i{i}", "kind": "click", "ts": time.time() - 10}
    event.update(over)
    return orjson.dumps(event)


def letters(client: FakeKafka) -> list[DeadLetter]:
    return [DeadLetter.from_bytes(v) for _k, v in client.topics.get(SETTINGS.topics.dead_letter, [])]


def test_oversize_lines_go_to_dead_letter_and_the_good_ones_after_them_are_sent(fake_kafka: type[FakeKafka]) -> None:
    big = {n: b'{"event_id": "' + b"x" * n + b'"}' for n in (600_000, 1_500_000, 5_000_000)}
    lines = [event_line(0), big[600_000], event_line(1), big[1_500_000], event_line(2), big[5_000_000], event_line(3)]
    with RecordProducer(SETTINGS) as producer:
        for line in lines:
            producer.send_event(line)
        report = producer.flush()
    client = fake_kafka.instances[0]
    assert [orjson.loads(v)["event_id"] for _k, v in client.topics[SETTINGS.topics.events]] == ["e0", "e1", "e2", "e3"]
    assert (report.sent, report.rejected, report.failed, report.pending) == (4, 3, 0, 0)
    dead = letters(client)
    assert sorted(d.raw_size for d in dead) == sorted(len(b) for b in big.values())
    for d in dead:
        original = next(b for b in big.values() if len(b) == d.raw_size)
        assert d.reason.startswith(f"record is {len(original)} bytes, over the {MAX_RECORD_BYTES}-byte limit")
        assert d.field == "record" and d.stage == "producer" and d.source_topic == SETTINGS.topics.events
        assert d.truncated and d.raw == original[:DEAD_LETTER_RAW_BYTES]
        assert d.raw_sha256 == hashlib.sha256(original).hexdigest()
    assert all(len(v) <= MAX_DEAD_LETTER_BYTES for _k, v in client.topics[SETTINGS.topics.dead_letter])


def test_a_broker_limit_below_the_contract_limit_is_the_one_checked(fake_kafka: type[FakeKafka]) -> None:
    with RecordProducer(SETTINGS, max_message_bytes=64 * 1024) as producer:
        assert producer.max_record_bytes == 63 * 1024
        producer.send_catalog(orjson.dumps({"item_id": "1", "title": "x" * 900, "description": "d" * 9_000}))
        producer.send_catalog(b'{"item_id": "2", "title": "' + b"t" * 100_000 + b'"}')
        report = producer.flush()
    (dead,) = letters(fake_kafka.instances[0])
    assert dead.reason.startswith(f"record is {100_000 + 29} bytes, over the {63 * 1024}-byte limit")
    assert dead.source_topic == SETTINGS.topics.catalog
    assert (report.sent, report.rejected, report.confirmed) == (1, 1, 2)


def test_a_record_the_broker_refuses_for_its_size_becomes_a_dead_letter_not_a_failure(
    fake_kafka: type[FakeKafka],
) -> None:
    fake_kafka.broker_limit = 400  # a topic configured far below the producer's idea of the limit
    fake_kafka.limited_topic = SETTINGS.topics.events
    search = event_line(1, kind="search", item_id=None, query="q" * 900)
    with RecordProducer(SETTINGS) as producer:
        producer.send_event(event_line(0))
        producer.send_event(search)
        producer.send_event(event_line(2))
        report = producer.flush()
    client = fake_kafka.instances[0]
    assert [orjson.loads(v)["event_id"] for _k, v in client.topics[SETTINGS.topics.events]] == ["e0", "e2"]
    (dead,) = letters(client)
    assert "Kafka refused it as too large" in dead.reason and "message.max.bytes" in dead.reason
    assert orjson.loads(dead.raw)["event_id"] == "e1"  # small enough to be kept whole
    assert (report.sent, report.rejected, report.failed, report.pending) == (2, 1, 0, 0)


def test_raw_sends_over_the_message_limit_are_dead_lettered_too(fake_kafka: type[FakeKafka]) -> None:
    with RecordProducer(SETTINGS) as producer:
        producer.send(SETTINGS.topics.events, "u1", b"v" * 2_000_000)  # the producer's own check
        producer.max_message_bytes = 10**9  # let the next one through to the client's check
        producer.send(SETTINGS.topics.events, "k", b"v" * 2_000_000)
        producer.flush()
    dead = letters(fake_kafka.instances[0])
    assert len(dead) == 2 and producer.report.rejected == 2 and producer.report.failed == 0
    assert dead[0].reason.startswith("record is 2000002 bytes, over the")
    assert "Kafka refused it as too large (MessageSizeTooLargeError)" in dead[1].reason


def test_a_dead_letter_over_the_limit_is_a_failure_not_a_loop(fake_kafka: type[FakeKafka]) -> None:
    with RecordProducer(SETTINGS, max_message_bytes=1024 + 300) as producer:
        producer.send_event(b"x" * 1000)  # over 300 bytes; its dead letter (~1.6 kB) is too
        report = producer.flush()
    assert (report.rejected, report.failed, report.pending) == (1, 1, 0)
    assert "dead letter of" in report.errors[0]


def test_replay_sized_dicts_are_checked_after_encoding(fake_kafka: type[FakeKafka]) -> None:
    with RecordProducer(SETTINGS) as producer:
        producer.max_record_bytes = 200
        assert producer.send_event({**orjson.loads(event_line(0)), "item_id": "i" * 128}) is None
        producer.flush()
    (dead,) = letters(fake_kafka.instances[0])
    assert dead.reason.startswith("record is") and "over the 200-byte limit" in dead.reason


def test_produce_cli_sends_the_good_lines_after_a_5_mb_line(
    fake_kafka: type[FakeKafka], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from console import cli

    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join([event_line(0), b"x" * 5_000_000, b"", event_line(1), event_line(2)]) + b"\n")
    code = cli._cmd_produce(cli.build_parser().parse_args(["produce", str(path)]), SETTINGS)
    assert code == 0  # every line is on its topic or in dead-letter
    assert "sent 3, rejected 1 (to dead-letter), confirmed 4, failed 0" in capsys.readouterr().out
    assert len(fake_kafka.instances[0].topics[SETTINGS.topics.events]) == 3


def test_produce_cli_exits_1_when_a_record_may_be_lost(
    fake_kafka: type[FakeKafka], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from console import cli

    def lose(self: FakeKafka, timeout: float | None = None) -> None:
        for _topic, _key, _value, fut in self.queued:
            for errback in fut.errbacks:
                errback(KafkaTimeoutError())
        self.queued.clear()

    monkeypatch.setattr(FakeKafka, "flush", lose)
    path = tmp_path / "events.jsonl"
    path.write_bytes(event_line(0) + b"\n")
    assert cli._cmd_produce(cli.build_parser().parse_args(["produce", str(path)]), SETTINGS) == 1


def test_replay_goes_through_the_same_checks(fake_kafka: type[FakeKafka], tmp_path: Path) -> None:
    """``freshrec replay`` sends dicts through ``send_event``/``send_catalog``: a huge row is
    dead-lettered (bounded) and the rows after it are sent."""
    from console.replay import replay

    (tmp_path / "items.csv").write_text(
        "item_id,title,category,description\n"
        f"a,Mug,kitchen,\nb,Bowl,kitchen,{'d' * 100_000}\nc,Cup,kitchen,\n"
    )
    now = time.time() - 100
    (tmp_path / "events.csv").write_text(
        "user_id,item_id,ts,event_type\n"
        f"u1,a,{now},view\n{'u' * 100_000},a,{now},view\nu1,c,{now + 1},purchase\n"
    )
    report = replay(SETTINGS, tmp_path, progress=False)
    client = fake_kafka.instances[0]
    assert [orjson.loads(v)["item_id"] for _k, v in client.topics[SETTINGS.topics.catalog]] == ["a", "c"]
    assert [orjson.loads(v)["item_id"] for _k, v in client.topics[SETTINGS.topics.events]] == ["a", "c"]
    dead = letters(client)
    assert sorted(d.field for d in dead) == ["description", "user_id"]
    assert all(d.truncated and d.raw_size > 100_000 for d in dead)
    assert (report.delivery.sent, report.delivery.rejected, report.delivery.failed) == (4, 2, 0)
