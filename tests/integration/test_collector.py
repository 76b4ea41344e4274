"""The HTTP collector against the real broker: per-record answers, the events topic keyed by
user and written once, rejects in the dead letter, JSON lines, the token, and a broker
that is unreachable or goes away (503 with Retry-After, nothing accepted)."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient

from collector.app import create_app
from freshrec.consumer import Message, TopicFollower
from freshrec.contracts import MAX_RECORD_BYTES, DeadLetter, Event
from freshrec.infra import Stack, create_topics, free_port, port_open, tansu_binary
from freshrec.settings import Settings
from tests.integration.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

TOKEN = "c0llect-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _event(n: int, user: str) -> dict[str, Any]:
    return {"event_id": f"web-{n:04d}", "user_id": user, "kind": "click", "item_id": f"i{n}", "ts": time.time()}


def _read(settings: Settings, topic: str, expected: int, timeout: float = 30.0) -> list[Message]:
    """Messages on ``topic`` until ``expected`` arrived, then a moment more to catch extras."""
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    with TopicFollower(settings, topic) as follower:
        while len(out) < expected and time.monotonic() < deadline:
            out.extend(follower.poll(0.2))
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            out.extend(follower.poll(0.1))
    return out


def _client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings.model_copy(update={"collector_token": TOKEN})))


def _assert_on_topics(settings: Settings, valid: list[dict[str, Any]], rejects: list[tuple[str, str]]) -> None:
    """``valid`` once each on events keyed by user; one dead letter per reject, as (field, part of the reason)."""
    events = _read(settings, settings.topics.events, len(valid))
    got = sorted((m.key, Event.model_validate_json(m.value).event_id) for m in events)
    assert got == sorted((e["user_id"].encode(), e["event_id"]) for e in valid)
    letters = [DeadLetter.from_bytes(m.value) for m in _read(settings, settings.topics.dead_letter, len(rejects))]
    assert len(letters) == len(rejects)
    assert {letter.stage for letter in letters} == {"collector"}
    assert {letter.source_topic for letter in letters} == {settings.topics.events}
    for field, part in rejects:
        match = next((x for x in letters if x.field == field and part in x.reason), None)
        assert match is not None, (field, part, [(x.field, x.reason[:80]) for x in letters])
        letters.remove(match)


def test_a_mixed_json_lines_batch_is_answered_per_record(fresh_settings: Settings) -> None:
    settings = fresh_settings
    good = [_event(1, "u1"), _event(2, "u2"), _event(3, "u1")]
    huge = orjson.dumps({**_event(9, "u9"), "kind": "search", "item_id": None, "query": "q" * MAX_RECORD_BYTES})
    lines = [
        orjson.dumps(good[0]),
        b'{"event_id": "web-bad", "user_id": ',                     # not JSON
        orjson.dumps({**_event(4, "u4"), "ts": "yesterday"}),        # a wrong type
        b"",                                                          # blank: not a record
        huge,                                                         # over the record limit
        orjson.dumps(good[1]),
        orjson.dumps({k: v for k, v in _event(5, "x").items() if k != "user_id"}),  # no user
        orjson.dumps(good[2]),
    ]
    with _client(settings) as client:
        r = client.post("/events", content=b"\n".join(lines), headers={**AUTH, "Content-Type": "application/x-ndjson"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["accepted"], body["rejected"], body["unconfirmed"]) == (3, 4, 0)
    answers = [(x["line"], x["status"], x.get("event_id") or x.get("field")) for x in body["results"]]
    assert answers == [
        (1, "accepted", "web-0001"), (2, "rejected", "record"), (3, "rejected", "ts"), (5, "rejected", "record"),
        (6, "accepted", "web-0002"), (7, "rejected", "user_id"), (8, "accepted", "web-0003"),
    ]
    assert all(x["dead_lettered"] for x in body["results"] if x["status"] == "rejected")
    events = _read(settings, settings.topics.events, 3)
    got = sorted((m.key, Event.model_validate_json(m.value).event_id) for m in events)
    assert got == [(b"u1", "web-0001"), (b"u1", "web-0003"), (b"u2", "web-0002")]
    letters = [DeadLetter.from_bytes(m.value) for m in _read(settings, settings.topics.dead_letter, 4)]
    assert sorted(letter.field for letter in letters) == ["record", "record", "ts", "user_id"]
    assert {letter.stage for letter in letters} == {"collector"}
    oversize = next(letter for letter in letters if letter.raw_size == len(huge))
    assert oversize.truncated and "-byte limit" in oversize.reason  # bounded as every dead letter is
    assert any(letter.raw == lines[1] and "not valid JSON" in letter.reason for letter in letters)


def test_a_mixed_json_array_lands_once_keyed_by_user(fresh_settings: Settings) -> None:
    settings = fresh_settings
    good = [_event(n, f"u{n % 2}") for n in range(10)]
    batch: list[Any] = [*good[:5], {**_event(20, "u0"), "user_id": 17}, "a string", *good[5:],
                        {**_event(21, "u1"), "kind": "search", "item_id": None, "query": "q" * MAX_RECORD_BYTES}]
    with _client(settings) as client:
        r = client.post("/events", json=batch, headers=AUTH)
        assert r.status_code == 200, r.text
        assert [x["status"] for x in r.json()["results"]] == ["accepted"] * 5 + ["rejected"] * 2 + ["accepted"] * 5 + ["rejected"]
        assert "freshrec_collector_accepted_total 10.0" in client.get("/metrics").text
    _assert_on_topics(settings, good, [("user_id", "string"), ("record", "JSON object"), ("record", "-byte limit")])


def test_a_wrong_token_is_401_and_sends_nothing(fresh_settings: Settings) -> None:
    with _client(fresh_settings) as client:
        r = client.post("/events", json=[_event(1, "u1")], headers={"Authorization": "Bearer not-it"})
        assert r.status_code == 401
        assert client.post("/events", json=[_event(1, "u1")]).status_code == 401
    assert _read(fresh_settings, fresh_settings.topics.events, 0) == []


def test_an_unreachable_broker_is_503_with_retry_after_and_nothing_accepted(tmp_path: Path) -> None:
    settings = Settings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",  # nothing listens here
        state_dir=tmp_path / "state", collector_connect_timeout_s=1.0, collector_send_timeout_s=2.0,
    )
    t0 = time.monotonic()
    with _client(settings) as client:
        assert client.get("/healthz").json()["producer_connected"] is False
        r = client.post("/events", json=[_event(1, "u1"), {"event_id": "bad"}], headers=AUTH)
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    body = r.json()
    assert body["accepted"] == 0 and "unreachable" in body["error"]
    assert [x["status"] for x in body["results"]] == ["unconfirmed", "rejected"]
    assert body["results"][1]["dead_lettered"] is False
    assert time.monotonic() - t0 < 15  # bounded by the connect timeout, not the client's minute


@pytest.fixture
def proxied(stack: Stack, tmp_path: Path) -> Iterator[tuple[TcpProxy, Settings]]:
    """A dedicated Tansu broker reachable only through a cuttable proxy (as in test_followers_resume)."""
    broker_port = free_port()
    proxy = TcpProxy("127.0.0.1", broker_port)
    log = open(tmp_path / "tansu.log", "wb")
    broker = subprocess.Popen(
        [tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{broker_port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{proxy.port}", "--storage-engine", "memory://tansu/"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", broker_port):
            assert broker.poll() is None and time.monotonic() < deadline, "the Tansu broker did not start"
            time.sleep(0.05)
        tag = uuid.uuid4().hex[:8]
        settings = Settings(
            kafka_bootstrap=f"127.0.0.1:{proxy.port}", redis_url=stack.redis_url, topic_prefix=f"c{tag}.",
            state_dir=tmp_path / "state", partitions=4,
            collector_connect_timeout_s=1.0, collector_send_timeout_s=2.0,
        )
        create_topics(settings.kafka_bootstrap, settings.topics.all(), settings.partitions)
        yield proxy, settings
    finally:
        proxy.close()
        broker.terminate()
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()
        log.close()


def test_a_broker_gone_mid_run_is_503_nothing_accepted_and_back_after(proxied: tuple[TcpProxy, Settings]) -> None:
    proxy, settings = proxied
    with _client(settings) as client:
        assert client.post("/events", json=[_event(1, "u1")], headers=AUTH).status_code == 200
        with proxy.outage(clients=("freshrec-collector",)):
            t0 = time.monotonic()
            r = client.post("/events", json=[_event(2, "u2"), _event(3, "u3")], headers=AUTH)
            waited = time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5" and r.json()["accepted"] == 0
        assert waited < 10  # collector_send_timeout_s bounds it
        # the client resends what was unconfirmed once the broker is back
        deadline = time.monotonic() + 30
        while True:
            r = client.post("/events", json=[_event(2, "u2"), _event(3, "u3")], headers=AUTH)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 2
    # Accepted ones are there; an unconfirmed send may also have landed late (the resend's
    # event_id lets the flows count it once), so only "at least" holds for those.
    ids = [Event.model_validate_json(m.value).event_id for m in _read(settings, settings.topics.events, 3)]
    assert ids.count("web-0001") == 1 and {"web-0002", "web-0003"} <= set(ids)
