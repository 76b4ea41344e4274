"""Poison records are routed, never fatal (issue 13, item 2), on both paths in.

(a) Through the validating producer (``freshrec produce``): lines of 600 kB, 1.5 MB and
    5 MB among valid lines go to dead-letter and the valid lines after them are sent.
    An empty line is not a record: JSON lines allows blank lines, so ``produce`` skips it
    (it is neither sent nor rejected); a 0-byte *message* on a topic is a record, and (b)
    sends one.
(b) Straight to the topic with a plain Kafka client, bypassing validation: records of
    0 B, 600 kB, 1.5 MB, 5 MB, invalid bytes and wrong types. The flow dead-letters each
    with its reason, applies the valid records after them, stays alive, and a restart
    that re-reads them does not die either (the 800 kB record used to wedge the users
    flow: its base64 dead letter was over librdkafka's 1 MB message limit).

The embedded broker (Tansu, memory storage) has no message size limit of its own that
matters here: it accepted and served back records of 600 kB to 60 MB when probed
(2026-12-03), so the 1.5 MB and 5 MB records reach the flows; the test client raises its
own ``max_request_size`` to send them. Apache Kafka's default broker limit is 1 MB.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from kafka import KafkaProducer

from freshrec.contracts import MAX_DEAD_LETTER_BYTES, MAX_RECORD_BYTES, DeadLetter
from freshrec.settings import Settings
from stores import catalog_store
from streams.flow_process import FlowProcess, wait_applied
from stores.redis_client import connect
from stores.user_store import read_user_state
from tests.integration.helpers import read_topic

pytestmark = pytest.mark.integration

SIZES = (600_000, 1_500_000, 5_000_000)


def _event(i: int, user: str, kind: str = "click") -> dict[str, object]:
    return {"event_id": f"ok{i}", "user_id": user, "item_id": f"item{i}", "kind": kind, "ts": time.time() - 60 + i}


def _item(i: int) -> dict[str, object]:
    return {"item_id": f"item{i}", "title": f"Mug number {i}", "category": "kitchen"}


def _padded(record: dict[str, object], size: int, pad_field: str) -> bytes:
    """``record`` with ``pad_field`` grown until the JSON is exactly ``size`` bytes."""
    base = len(orjson.dumps({**record, pad_field: ""}))
    return orjson.dumps({**record, pad_field: "x" * (size - base)})


def _check_letter(wire: bytes, original: bytes, stage: str, topic: str) -> DeadLetter:
    letter = DeadLetter.from_bytes(wire)
    assert len(wire) <= MAX_DEAD_LETTER_BYTES
    assert letter.stage == stage and letter.source_topic == topic and letter.reason and letter.field
    assert letter.raw_size == len(original)
    assert letter.raw_sha256 == hashlib.sha256(original).hexdigest()
    assert original.startswith(letter.raw) and letter.truncated == (len(letter.raw) < len(original))
    return letter


# ---------------------------------------------------------------------------------------
# (a) through `freshrec produce`


@pytest.mark.parametrize("topic", ["events", "catalog"])
def test_produce_routes_oversize_lines_and_sends_the_valid_lines_after_them(
    fresh_settings: Settings, tmp_path: Path, topic: str
) -> None:
    s = fresh_settings
    if topic == "events":
        valid = [orjson.dumps(_event(i, f"p{i % 2}")) for i in range(8)]
        big = [_padded({**_event(100, "p0", "search"), "item_id": None}, n, "query") for n in SIZES]
        topic_name, id_field = s.topics.events, "event_id"
    else:
        valid = [orjson.dumps(_item(i)) for i in range(8)]
        big = [_padded(_item(100), n, "description") for n in SIZES]
        topic_name, id_field = s.topics.catalog, "item_id"
    # valid, blank, 600 kB, valid, 1.5 MB, valid, 5 MB, the rest valid
    lines = [*valid[:3], b"", big[0], valid[3], big[1], valid[4], big[2], *valid[5:]]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    out = subprocess.run(
        [sys.executable, "-m", "freshrec", "produce", "--topic", topic, str(path)],
        env=s.child_env(os.environ), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr  # everything is on its topic or in dead-letter
    assert "Traceback" not in out.stderr
    assert "sent 8, rejected 3 (to dead-letter), confirmed 11, failed 0" in out.stdout, out.stdout + out.stderr

    sent = [orjson.loads(v)[id_field] for v in read_topic(s, topic_name, len(valid))]
    assert sorted(sent) == sorted(orjson.loads(v)[id_field] for v in valid)
    letters = read_topic(s, s.topics.dead_letter, len(big))
    assert len(letters) == len(big)
    for wire in letters:
        size = DeadLetter.from_bytes(wire).raw_size
        original = next(b for b in big if len(b) == size)
        letter = _check_letter(wire, original, "producer", topic_name)
        assert letter.field == "record"
        assert letter.reason.startswith(f"record is {size} bytes, over the {MAX_RECORD_BYTES}-byte limit")


# ---------------------------------------------------------------------------------------
# (b) straight to the topic, past the producer's validation


@dataclass(frozen=True)
class Poison:
    """A record written straight to the topic, and the field its dead letter must name."""

    name: str
    value: bytes
    field: str


def _poison(flow: str) -> list[Poison]:
    if flow == "users":
        record, pad, wrong = {**_event(200, "v1", "search"), "item_id": None}, "query", {**_event(201, "v1"), "ts": True}
        wrong_id = ("user_id", {**_event(202, "v1"), "user_id": 17})
    else:
        record, pad, wrong = _item(200), "description", {**_item(201), "price": True}
        wrong_id = ("item_id", {**_item(202), "item_id": ["item202"]})
    field_of_wrong = "ts" if flow == "users" else "price"
    return [
        Poison("0 B", b"", "record"),
        *(Poison(f"{n} B", _padded(record, n, pad), "record") for n in SIZES),
        Poison("invalid UTF-8 and NUL", b"\xff\xfe\x00\x80 not json \x00", "record"),
        Poison("deeply nested", b"[" * 5000 + b"]" * 5000, "record"),
        Poison("JSON array", orjson.dumps([record]), "record"),
        Poison("boolean number", orjson.dumps(wrong), field_of_wrong),
        Poison("wrong id type", orjson.dumps(wrong_id[1]), wrong_id[0]),
    ]


def _plain_producer(settings: Settings) -> KafkaProducer:
    # No validation, and room for the 5 MB record (the client's default limit is 1 MB).
    return KafkaProducer(
        bootstrap_servers=settings.kafka_servers, acks="all", max_request_size=16 * 1024 * 1024,
        max_in_flight_requests_per_connection=1,
    )


@pytest.mark.parametrize("flow", ["users", "catalog"])
def test_flow_dead_letters_poison_records_applies_what_follows_and_survives_a_restart(
    fresh_settings: Settings, flow: str
) -> None:
    # Epochs far longer than the test: the restart resumes from before the poison records
    # and must read them all again.
    s = fresh_settings.model_copy(update={"stream_snapshot_seconds": 600.0})
    poison = _poison(flow)
    if flow == "users":
        topic, stage, key = s.topics.events, "streams.users", b"v1"
        before = [(b"v1", _event(i, "v1")) for i in range(3)]
        after = [(b"v1", _event(i, "v1")) for i in range(3, 6)] + [(b"v2", _event(i, "v2")) for i in range(6, 8)]
    else:
        topic, stage, key = s.topics.catalog, "streams.catalog", b"item200"
        before = [(f"item{i}".encode(), _item(i)) for i in range(3)]
        after = [(f"item{i}".encode(), _item(i)) for i in range(3, 8)]

    producer = _plain_producer(s)
    for k, record in before:
        producer.send(topic, key=k, value=orjson.dumps(record))
    for p in poison:
        producer.send(topic, key=key, value=p.value)
    for k, record in after:
        producer.send(topic, key=k, value=orjson.dumps(record))
    producer.flush(60)
    producer.close()
    total = len(before) + len(poison) + len(after)

    flow_proc = FlowProcess(s, flow).start()
    try:
        wait_applied(s, flow, total, timeout=120, procs=[flow_proc])
        letters = read_topic(s, s.topics.dead_letter, len(poison), timeout=60)
        assert len(letters) == len(poison), [DeadLetter.from_bytes(w).reason for w in letters]
        by_hash = {DeadLetter.from_bytes(w).raw_sha256: w for w in letters}
        for p in poison:
            letter = _check_letter(by_hash[hashlib.sha256(p.value).hexdigest()], p.value, stage, topic)
            assert letter.field == p.field, (p.name, letter.field, letter.reason)
        big = DeadLetter.from_bytes(by_hash[hashlib.sha256(poison[3].value).hexdigest()])
        assert big.reason.startswith(f"record is 5000000 bytes, over the {MAX_RECORD_BYTES}-byte limit")

        client = connect(s)
        if flow == "users":
            v1, v2 = read_user_state(client, s, "v1"), read_user_state(client, s, "v2")
            assert v1 is not None and v2 is not None
            assert v1.events == 6 and v2.events == 2  # the valid events after the poison were applied
            assert {i.item_id for i in v1.history} == {f"item{i}" for i in range(6)}
        else:
            items = catalog_store.read_items(client, s, [f"item{i}" for i in range(8)])
            assert sorted(items) == [f"item{i}" for i in range(8)]
        flow_proc.check_alive()

        # A restart re-reads the poison (no snapshot was taken) and must not die on it.
        flow_proc.kill()
        flow_proc = FlowProcess(s, flow).start()
        again = read_topic(s, s.topics.dead_letter, 2 * len(poison), timeout=90)
        assert len(again) == 2 * len(poison)  # every poison record read and routed again
        time.sleep(1.0)
        flow_proc.check_alive()
        wait_applied(s, flow, total, timeout=30, procs=[flow_proc])
    finally:
        flow_proc.stop()


def test_a_flow_output_over_the_message_limit_becomes_a_dead_letter_not_a_crash(fresh_settings: Settings) -> None:
    """Only a train pair with a very large ``stream_pair_context`` (~80 items of 1,000
    escaped-character titles) can exceed librdkafka's 1,000,000-byte default; it used to
    raise inside the sink and crash the flow on every restart."""
    from streams.sinks import _KafkaOut

    s = fresh_settings
    out = _KafkaOut(s)
    big = b'{"pair_id": "' + b"x" * 1_200_000 + b'"}'
    out.send(s.topics.train_pairs, "u1", big)
    out.send(s.topics.train_pairs, "u1", b'{"pair_id": "small"}')
    out.flush()  # raises if anything was not acknowledged
    assert read_topic(s, s.topics.train_pairs, 1) == [b'{"pair_id": "small"}']
    (wire,) = read_topic(s, s.topics.dead_letter, 1)
    letter = _check_letter(wire, big, "streams.output", s.topics.train_pairs)
    assert letter.reason.startswith("output is 1200015 bytes, over the 1000000-byte message limit")
