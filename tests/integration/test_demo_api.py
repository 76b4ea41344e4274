"""The demo's write path (serving.demo_api) against the real broker and Redis, and the
``reasons`` of /recommend's items: off by default, an act is a validated event on the
events topic, keyed and stamped in the shopper's event time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from freshrec.contracts import Event
from freshrec.infra import free_port
from freshrec.settings import Settings
from serving.app import create_app
from serving.runtime import ServingRuntime
from serving.testing import ServerThread
from tests.integration.helpers import read_topic, seed_catalog

pytestmark = pytest.mark.integration


def _serve(settings: Settings, sample_dir: Path, n: int = 200) -> Iterator[tuple[str, ServingRuntime, list[str]]]:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    ids = list(seed_catalog(settings, sample_dir, n))
    runtime = ServingRuntime(settings)
    with ServerThread(create_app(runtime), free_port()) as url:
        assert runtime.wait_ready(120), "index did not load"
        yield url, runtime, ids


@pytest.fixture
def demo_served(fresh_settings: Settings, sample_dir: Path) -> Iterator[tuple[str, ServingRuntime, list[str]]]:
    yield from _serve(fresh_settings.model_copy(update={"demo_actions": True, "popularity_refresh_s": 0.2}), sample_dir)


def test_demo_routes_are_off_by_default(fresh_settings: Settings, sample_dir: Path) -> None:
    assert Settings().demo_actions is False
    for url, _, ids in _serve(fresh_settings, sample_dir, n=20):
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.get("/demo/stats").status_code == 404
            r = c.post("/demo/act", json={"user_id": "u1", "item_id": ids[0], "kind": "click"})
            assert r.status_code in (404, 405), r.text  # the static page's mount answers; nothing is sent
            assert "/demo/act" not in c.get("/openapi.json").json()["paths"]
    assert read_topic(fresh_settings, fresh_settings.topics.events, expected=1, timeout=2) == []


def test_act_sends_a_validated_event_and_reasons_explain_the_answer(
    demo_served: tuple[str, ServingRuntime, list[str]],
) -> None:
    from ranking.user_state import StateRules, UserState, apply_event
    from stores.user_store import connect, write_user_states

    url, runtime, ids = demo_served
    settings = runtime.settings
    t = 1_300_000_000.0
    state = UserState("u1")
    for n, (item, ts) in enumerate([(ids[0], t), (ids[0], t + 86400), (ids[1], t + 86400)]):
        apply_event(state, Event(event_id=f"e{n}", user_id="u1", kind="purchase", item_id=item, ts=ts),
                    StateRules.from_settings(settings))
    write_user_states(connect(settings), settings, [state])

    with httpx.Client(base_url=url, timeout=10) as c:
        body = c.get("/recommend", params={"user_id": "u1", "k": 10}).json()
        first = body["items"][0]
        assert first["item_id"] == ids[0] and "bought before" in first["reasons"], body
        assert all(item["reasons"] for item in body["items"]), body
        cold = c.get("/recommend", params={"user_id": "nobody", "k": 5}).json()
        assert cold["source"] == "popularity" and cold["ranker_fallback"] == "cold"
        assert all(item["reasons"] == ["popular now"] for item in cold["items"])

        r = c.post("/demo/act", json={"user_id": "u1", "item_id": ids[5], "kind": "purchase"})
        assert r.status_code == 200, r.text
        acted = r.json()
        assert acted["event_id"].startswith("demo-") and acted["ts"] == t + 86400  # the shopper's event time
        r = c.post("/demo/act", json={"user_id": "newcomer", "item_id": ids[6]})  # kind defaults to click
        assert r.status_code == 200, r.text

        # refused before anything is sent
        assert c.post("/demo/act", json={"user_id": "u1", "item_id": "NOT-AN-ITEM"}).status_code == 404
        assert c.post("/demo/act", json={"user_id": "u1", "item_id": ids[5], "kind": "view"}).status_code == 422
        assert c.post("/demo/act", json={"user_id": "", "item_id": ids[5]}).status_code == 422

        # the event is not applied (no users flow runs here), and stats read what there is
        assert c.get("/demo/applied", params={"user_id": "u1", "event_id": acted["event_id"]}).json()["applied"] is False
        stats = c.get("/demo/stats").json()
        assert stats["recommend_ms"]["n"] >= 2 and stats["recommend_ms"]["p99"] >= stats["recommend_ms"]["p50"] > 0
        assert stats["adapter_version"] == "base" and stats["applied_events"] == 0

    events = [orjson.loads(v) for v in read_topic(settings, settings.topics.events, expected=2)]
    assert [(e["user_id"], e["item_id"], e["kind"]) for e in events if e["user_id"] == "u1"] == [("u1", ids[5], "purchase")]
    assert [(e["user_id"], e["kind"]) for e in events if e["user_id"] == "newcomer"] == [("newcomer", "click")]
    assert len(events) == 2
