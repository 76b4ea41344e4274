"""The collector's HTTP edges with a stand-in sink (no broker): token, limits, content
types, 503 with Retry-After, the refusal to start without a token, and the metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient

from collector.app import ConfigError, create_app
from collector.batch import Checked
from collector.sink import BrokerUnavailable
from freshrec.settings import Settings

TOKEN = "c0llect"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeSink:
    """Confirms everything, unless told the broker is away or which records to drop."""

    def __init__(self) -> None:
        self.batches: list[list[Checked]] = []
        self.unavailable = False
        self.drop: set[int] = set()
        self.connected = True

    def connect(self) -> None:
        if self.unavailable:
            raise BrokerUnavailable("nothing listens")

    def send_batch(self, checked: Sequence[Checked]) -> list[bool]:
        if self.unavailable:
            raise BrokerUnavailable("nothing listens")
        self.batches.append(list(checked))
        return [r.index not in self.drop for r in checked]

    def close(self) -> None:
        pass


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    kw.setdefault("collector_token", TOKEN)
    return Settings(state_dir=tmp_path / "state", **kw)


def _event(n: int) -> dict[str, object]:
    return {"event_id": f"e{n}", "user_id": f"u{n}", "kind": "view", "item_id": "i1", "ts": time.time()}


@pytest.fixture
def sink() -> FakeSink:
    return FakeSink()


@pytest.fixture
def client(tmp_path: Path, sink: FakeSink) -> Iterator[TestClient]:
    app = create_app(_settings(tmp_path, collector_max_body_bytes=64 * 1024, collector_max_records=5), sink=sink)  # type: ignore[arg-type]
    with TestClient(app) as c:
        yield c


def test_without_a_token_it_refuses_to_start_unless_told_insecure(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FRESHREC_COLLECTOR_TOKEN"):
        create_app(_settings(tmp_path, collector_token=None), sink=FakeSink())  # type: ignore[arg-type]
    app = create_app(_settings(tmp_path, collector_token=None), sink=FakeSink(), insecure_no_token=True)  # type: ignore[arg-type]
    with TestClient(app) as c:
        assert c.post("/events", json=[_event(1)]).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}])
def test_a_missing_or_wrong_token_is_401_and_nothing_is_sent(client: TestClient, sink: FakeSink, headers: dict[str, str]) -> None:
    r = client.post("/events", json=[_event(1)], headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert sink.batches == []


def test_a_batch_is_answered_per_record(client: TestClient, sink: FakeSink) -> None:
    r = client.post("/events", json=[_event(1), {"event_id": "e2"}, _event(3)], headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert [x["status"] for x in body["results"]] == ["accepted", "rejected", "accepted"]
    assert body["results"][1]["field"] == "user_id"
    assert [type(c).__name__ for c in sink.batches[0]] == ["Accepted", "Rejected", "Accepted"]


def test_json_lines_are_answered_per_line(client: TestClient) -> None:
    body = b"\n".join([orjson.dumps(_event(1)), b"{broken", b"", orjson.dumps(_event(2))])
    r = client.post("/events", content=body, headers={**AUTH, "Content-Type": "application/x-ndjson"})
    assert r.status_code == 200
    assert [(x["line"], x["status"]) for x in r.json()["results"]] == [(1, "accepted"), (2, "rejected"), (4, "accepted")]


def test_a_body_over_the_limit_is_413_and_nothing_is_sent(client: TestClient, sink: FakeSink) -> None:
    r = client.post("/events", content=b"[" + b" " * 70_000 + b"]", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and "65536-byte limit" in r.json()["error"]
    # a chunked body (no Content-Length) is cut off as it streams in, too
    chunks = iter([b"[", b" " * 40_000, b" " * 40_000, b"]"])
    r = client.post("/events", content=chunks, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert sink.batches == []


def test_too_many_records_is_413(client: TestClient, sink: FakeSink) -> None:
    r = client.post("/events", json=[_event(n) for n in range(6)], headers=AUTH)
    assert r.status_code == 413 and "limit is 5" in r.json()["error"]
    assert sink.batches == []


def test_a_body_that_is_not_a_batch_is_400_and_another_content_type_415(client: TestClient) -> None:
    r = client.post("/events", content=b"[{", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.post("/events", content=b"[]", headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 415


def test_an_unreachable_broker_is_503_with_retry_after_and_nothing_accepted(client: TestClient, sink: FakeSink) -> None:
    sink.unavailable = True
    r = client.post("/events", json=[_event(1), _event(2)], headers=AUTH)
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    body = r.json()
    assert body["accepted"] == 0 and "unreachable" in body["error"]
    assert {x["status"] for x in body["results"]} == {"unconfirmed"}


def test_a_record_the_broker_did_not_confirm_is_503_and_the_rest_accepted(client: TestClient, sink: FakeSink) -> None:
    sink.drop = {1}
    r = client.post("/events", json=[_event(1), _event(2)], headers=AUTH)
    assert r.status_code == 503 and "retry-after" in r.headers
    assert [x["status"] for x in r.json()["results"]] == ["accepted", "unconfirmed"]


def test_metrics_count_accepted_rejected_by_reason_and_batches(client: TestClient) -> None:
    client.post("/events", json=[_event(1), _event(2), {"event_id": "x"}, "s"], headers=AUTH)
    text = client.get("/metrics").text
    assert "freshrec_collector_accepted_total 2.0" in text
    assert 'freshrec_collector_rejected_total{reason="user_id"} 1.0' in text
    assert 'freshrec_collector_rejected_total{reason="not_object"} 1.0' in text
    assert "freshrec_collector_batch_seconds_count 1.0" in text
    assert 'freshrec_collector_requests_total{status="200"} 1.0' in text


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "producer_connected": True}


def test_the_command_refuses_to_start_without_a_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from collector.cli import main

    assert main(["--port", "1"], _settings(tmp_path, collector_token=None)) == 2
    assert "--insecure-no-token" in capsys.readouterr().err


def test_collector_docs_page_is_served_offline(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in page.text and "cdn" not in page.text
    assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
