"""Serving against the real Redis and broker, the real int8 ONNX encoder and FAISS index.

A small slice of the bundled sample catalog keeps each test fast; the base encoder's
export is made once per session and shared (``state_dir/exports`` is a link to it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from freshrec.contracts import CatalogDelete, CatalogItem, Event
from freshrec.infra import free_port
from freshrec.settings import Settings
from serving.app import create_app
from serving.runtime import ServingRuntime
from serving.testing import ServerThread
from tests.integration.helpers import sample_items, seed_catalog

pytestmark = pytest.mark.integration

N_ITEMS = 300
USERS_TOKEN = "users-tok"
USERS_AUTH = {"Authorization": f"Bearer {USERS_TOKEN}"}


@pytest.fixture(scope="session")
def shared_exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One exports folder for the session: each version is exported once (seconds each)."""
    path = tmp_path_factory.getbasetemp() / "serving-shared" / "exports"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _prepare(settings: Settings, shared_exports: Path, sample_dir: Path, n: int = N_ITEMS) -> dict[str, CatalogItem]:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    (settings.state_dir / "exports").symlink_to(shared_exports, target_is_directory=True)
    return seed_catalog(settings, sample_dir, n)


def _runtime(settings: Settings, **kw: Any) -> ServingRuntime:
    runtime = ServingRuntime(settings, **kw)
    return runtime


@pytest.fixture
def served(fresh_settings: Settings, shared_exports: Path, sample_dir: Path) -> Iterator[tuple[str, ServingRuntime, dict]]:
    settings = fresh_settings.model_copy(update={"admin_token": "tok", "users_token": USERS_TOKEN, "popularity_refresh_s": 0.2})
    items = _prepare(settings, shared_exports, sample_dir)
    runtime = _runtime(settings)
    with ServerThread(create_app(runtime), free_port()) as url:
        assert runtime.wait_ready(120), "index did not load"
        yield url, runtime, items


def _write_state(settings: Settings, user: str, events: list[tuple[str, str, float]]) -> None:
    from ranking.user_state import StateRules, UserState, apply_event
    from stores.user_store import connect, read_user_state, write_user_states

    client = connect(settings)
    state = read_user_state(client, settings, user) or UserState(user)
    for n, (item, kind, ts) in enumerate(events):
        apply_event(
            state,
            Event(event_id=f"{user}:{ts}:{n}:{item}", user_id=user, kind=kind, item_id=item, ts=ts),
            StateRules.from_settings(settings),
        )
    write_user_states(client, settings, [state])


def test_recommend_search_similar(served: tuple[str, ServingRuntime, dict]) -> None:
    url, runtime, items = served
    settings = runtime.settings
    ids = list(items)
    with httpx.Client(base_url=url, timeout=10) as c:
        # cold user on a Redis with no applied events: popularity (none), flagged as such
        r = c.get("/recommend", params={"user_id": "nobody", "k": 5})
        body = r.json()
        assert r.status_code == 200 and body["source"] == "popularity" and body["items"] == []
        assert body["degraded"] is True and body["reason"].startswith("state is empty or being rebuilt"), body

        # a shopper with history and repeats
        t = 1_300_000_000.0
        _write_state(settings, "u1", [(ids[0], "purchase", t), (ids[0], "purchase", t + 86400), (ids[1], "purchase", t + 86400)])
        r = c.get("/recommend", params={"user_id": "u1", "k": 10})
        body = r.json()
        assert r.status_code == 200 and body["source"] == "personal", body
        got = [i["item_id"] for i in body["items"]]
        assert got[0] == ids[0]  # bought twice: the repeat signal leads
        assert body["items"][0]["title"] == items[ids[0]].title
        assert body["adapter_version"] == "base" and body["index_version"].startswith("base@")

        # a new purchase changes the answer, and the new item joins the top
        new = ids[200]
        assert new not in got
        _write_state(settings, "u1", [(new, "purchase", t + 2 * 86400), (new, "purchase", t + 2 * 86400 + 60)])
        after = [i["item_id"] for i in c.get("/recommend", params={"user_id": "u1", "k": 10}).json()["items"]]
        assert after != got and new in after[:3]

        # the shopper's latest interactions, newest first, with titles (the demo page shows
        # them): personal data, so only with the users token
        assert c.get("/users/u1").status_code == 401
        assert c.get("/users/u1", headers={"Authorization": "Bearer tok"}).status_code == 403  # admin's is not it
        hist = c.get("/users/u1", params={"n": 2}, headers=USERS_AUTH).json()
        assert [h["item_id"] for h in hist["items"]] == [new, new]
        assert hist["items"][0]["title"] == items[new].title and hist["items"][0]["kind"] == "purchase"
        assert c.get("/users/nobody", headers=USERS_AUTH).status_code == 404

        # search: the title of an item finds it; with a user the answer is personalised
        title = items[ids[5]].title
        r = c.post("/search", json={"query": title, "k": 5})
        assert r.status_code == 200 and ids[5] in [i["item_id"] for i in r.json()["items"]]
        r = c.post("/search", json={"query": title, "k": 5, "user_id": "u1"})
        assert r.status_code == 200 and r.json()["personalised"] is True

        # similar: nearest items, never the item itself; unknown item 404
        r = c.get(f"/similar/{ids[5]}", params={"k": 5})
        assert r.status_code == 200 and len(r.json()["items"]) == 5
        assert ids[5] not in [i["item_id"] for i in r.json()["items"]]
        assert c.get("/similar/NOT-AN-ITEM").status_code == 404

        # every bad request gets its 4xx, never a 500
        bad = [
            c.get("/recommend", params={"k": 3}),
            c.get("/recommend", params={"user_id": "u1", "k": 0}),
            c.get("/recommend", params={"user_id": "u1", "k": 10_000}),
            c.post("/search", json={"query": ""}),
            c.post("/search", json={"query": "x" * 5000}),
            c.post("/search", content=b"{"),
            c.get(f"/similar/{ids[5]}", params={"k": -1}),
        ]
        assert [b.status_code for b in bad] == [422, 422, 422, 422, 413, 422, 422]
        assert all(b.json()["error"] for b in bad)

        # metrics and readiness
        text = c.get("/metrics").text
        assert 'freshrec_request_seconds_count{endpoint="recommend"}' in text
        assert f"freshrec_index_items {float(len(items))}" in text
        assert c.get("/readyz").json()["items"] == len(items)


def test_popularity_and_degraded_mode(fresh_settings: Settings, shared_exports: Path, sample_dir: Path) -> None:
    """Popularity answers cold users; with Redis unreachable /recommend degrades, never fails."""
    from stores.user_store import connect, write_partition_batch

    settings = fresh_settings.model_copy(update={"popularity_refresh_s": 0.2})
    items = _prepare(settings, shared_exports, sample_dir)
    ids = list(items)
    day = 86_400.0
    write_partition_batch(
        connect(settings), settings, settings.topics.events, 0, 1, {}, {ids[7]: (5.0, 100.0), ids[3]: (2.0, 100.0)}, 100.0,
        {ids[7]: 100.0 - 40 * day, ids[3]: 100.0 - 40 * day, ids[9]: 100.0 - day},
    )
    dead = ServingRuntime(settings, request_redis=_dead_redis())
    with ServerThread(create_app(dead), free_port()) as url:
        assert dead.wait_ready(120) and dead.popularity.loaded.wait(5)
        # first seen within blend_new_days of the newest event: the log blend's new arrivals
        assert dead.popularity.view.new_items == {ids[9]}
        with httpx.Client(base_url=url, timeout=10) as c:
            body = c.get("/recommend", params={"user_id": "anyone", "k": 5}).json()
            assert body["degraded"] is True and "redis" in body["reason"]
            assert [i["item_id"] for i in body["items"]] == [ids[7], ids[3]]
            t0 = time.perf_counter()
            for _ in range(20):
                assert c.get("/recommend", params={"user_id": "anyone"}).status_code == 200
            assert (time.perf_counter() - t0) / 20 < 0.05  # the gate fails fast, no timeout per request


def test_empty_state_is_flagged_until_events_are_applied_and_again_when_redis_empties(
    served: tuple[str, ServingRuntime, dict],
) -> None:
    """Issue 13 item 4: a reachable but empty Redis (new, restarted without persistence,
    being rebuilt) must not pass for a real state: responses say so, until the users
    flow's applied offsets and popularity are back."""
    from stores.user_store import connect, write_partition_batch

    url, runtime, items = served
    settings = runtime.settings
    ids = list(items)
    client = connect(settings)

    def answer() -> dict[str, Any]:
        return httpx.get(f"{url}/recommend", params={"user_id": "cold", "k": 3}, timeout=10).json()

    def wait_for(check: Any, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while not check(body := answer()):
            assert time.monotonic() < deadline, f"{what}: {body}"
            time.sleep(0.1)
        return body

    body = answer()
    assert body["degraded"] is True and "no applied events" in body["reason"]
    assert httpx.get(f"{url}/readyz").json()["degraded"] is True  # ready (catalog loaded), state flagged
    write_partition_batch(client, settings, settings.topics.events, 0, 10, {}, {ids[4]: (3.0, 100.0)}, 100.0, {ids[4]: 100.0})
    body = wait_for(lambda b: "degraded" not in b, "still flagged after events were applied")
    assert [i["item_id"] for i in body["items"]] == [ids[4]]
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["ready"] is True and "degraded" not in ready

    # Redis comes back empty (this test's keys only: the server is shared by the session)
    client.delete(*client.scan_iter(match=f"{settings.redis_prefix}*"))
    body = wait_for(lambda b: b.get("degraded") is True, "an emptied Redis was not flagged")
    assert "no applied events" in body["reason"]


def _dead_redis() -> Any:
    """Serving's own request-path client, pointed at a port where nothing listens."""
    from freshrec.settings import Settings
    from serving.runtime import redis_client

    return redis_client(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"), 0.05)


def test_snapshot_then_restore_gives_identical_search_results(served: tuple[str, ServingRuntime, dict], tmp_path: Path) -> None:
    from models.live_index import LiveIndex

    _, runtime, items = served
    pair = runtime.active.pair
    assert pair is not None
    queries = pair.encoder.encode([items[i].title for i in list(items)[:20]])
    before = pair.index.search(queries, 10)
    pair.index.snapshot(tmp_path / "snap")
    restored = LiveIndex.restore(tmp_path / "snap", expected_version=pair.adapter_version)
    assert restored.search(queries, 10) == before


# -- the whole catalog path: catalog topic -> catalog flow -> indexer -> item-vectors -> serving


def _spawn(settings: Settings, args: list[str], log: Path) -> subprocess.Popen[bytes]:

    return subprocess.Popen(
        [sys.executable, "-m", "freshrec", *args],
        env=settings.child_env(os.environ),
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_published_item_is_searchable_within_2s_and_a_deleted_one_never_returns(
    fresh_settings: Settings, shared_exports: Path, sample_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("indexer.cli", reason="needs `freshrec index` (indexer.cli)")
    from freshrec.producer import RecordProducer

    from stores import catalog_store
    from stores.user_store import connect

    settings = fresh_settings.model_copy(update={"indexer_flush_seconds": 0.05})
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    (settings.state_dir / "exports").symlink_to(shared_exports, target_is_directory=True)
    items = sample_items(sample_dir, 100)
    procs = [
        _spawn(settings, ["stream", "catalog", "--no-recovery"], tmp_path / "catalog.log"),
        _spawn(settings, ["index"], tmp_path / "index.log"),
    ]
    # The catalog goes in the way it does in production: through the topic and the flow.
    with RecordProducer(settings) as producer:
        for item in items.values():
            producer.send_catalog(item.to_bytes())
        producer.flush()
    client = connect(settings)
    deadline = time.monotonic() + 60
    while len(catalog_store.all_items(client, settings)) < len(items):
        assert time.monotonic() < deadline, "the catalog flow did not write the catalog to Redis"
        time.sleep(0.2)
    runtime = ServingRuntime(settings)
    try:
        with ServerThread(create_app(runtime), free_port()) as url, httpx.Client(base_url=url, timeout=10) as c:
            assert runtime.wait_ready(120)
            time.sleep(3)  # let the indexer finish its start-up backlog before the clock starts
            for p in procs:
                assert p.poll() is None, f"a pipeline process exited: {p.args}"
            title = "ZEBRA STRIPED VELVET TEAPOT COSY"
            with RecordProducer(settings) as producer:
                producer.send_catalog(CatalogItem(item_id="NEW-1", title=title).to_bytes())
                producer.flush()
            t_sent = time.perf_counter()
            found_after = None
            while time.perf_counter() - t_sent < 30:
                hits = c.post("/search", json={"query": title, "k": 3}).json()["items"]
                if hits and hits[0]["item_id"] == "NEW-1":
                    found_after = time.perf_counter() - t_sent
                    break
                time.sleep(0.05)
            assert found_after is not None, "the new item never became searchable"
            assert found_after < 2.0, f"searchable only after {found_after:.2f} s"
            print(f"new item searchable after {found_after:.2f} s")
            assert c.get("/similar/NEW-1").status_code == 200

            victim = list(items)[10]
            with RecordProducer(settings) as producer:
                producer.send_catalog(CatalogDelete(item_id=victim).to_bytes())
                producer.flush()
            deadline = time.perf_counter() + 10
            while c.get(f"/similar/{victim}").status_code != 404:
                assert time.perf_counter() < deadline, "the deleted item is still in the index"
                time.sleep(0.05)
            victim_title = items[victim].title
            for _ in range(20):  # never comes back, through any endpoint
                assert victim not in [i["item_id"] for i in c.post("/search", json={"query": victim_title, "k": 20}).json()["items"]]
                for other in list(items)[:3]:
                    sims = c.get(f"/similar/{other}", params={"k": 100}).json()["items"]
                    assert victim not in [i["item_id"] for i in sims]
                assert c.get(f"/similar/{victim}").status_code == 404
                time.sleep(0.05)
    finally:
        for p in procs:
            _stop(p)
