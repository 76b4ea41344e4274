"""The ranker on /recommend over HTTP, with real Redis and the real broker: published, announced,
picked up, ordered by it, swapped under load with zero errors, rolled back exactly, a corrupt
version refused while the active one serves, and the blend taking over, flagged, when it fails.

The rankers are linear in one feature (``log_pop_short``), so the order a version must produce
is known in advance: over a catalog whose every item is a candidate (all are in served
popularity), version "up" ranks by short-horizon popularity, "down" by its reverse. The
collaborative state is written in the contract's Redis layout (serving.collab_data), standing
in for the collaborative flow. Serving runs on uvicorn with the toy HashEncoder (the encoder
is not what is under test here; tests/integration/test_hotswap.py covers the real one).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from freshrec.contracts import Event
from freshrec.infra import free_port
from freshrec.settings import Settings
from models.ranker import MLPRanker, RankerFailed
from models.ranker_registry import MODEL_FILE, LoadedRanker, RankerRegistry
from ranking.collab import CollabRules, shopper_vector
from ranking.features import FEATURE_NAMES, FEATURE_SCHEMA, POP_FLOOR
from ranking.user_state import DAY_S, UserState, apply_event
from serving.app import create_app
from serving.collab_data import write_for_tests
from serving.ranker_slot import announcement_bytes
from serving.runtime import ServingRuntime
from serving.testing import CatalogTwin, ServerThread, hash_tools
from tests.integration.helpers import seed_catalog

pytestmark = pytest.mark.integration

TOKEN = "ranker-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N_ITEMS = 60
K = 10
T0 = 1_300_000_000.0
_ids = itertools.count()


def linear(feature: str, sign: float) -> MLPRanker:
    w = np.zeros(len(FEATURE_NAMES), dtype=np.float32)
    w[FEATURE_NAMES.index(feature)] = sign
    return MLPRanker(
        {"mean": np.zeros(len(FEATURE_NAMES)), "std": np.ones(len(FEATURE_NAMES)), "w0": w, "b0": np.zeros(())},
        FEATURE_NAMES, FEATURE_SCHEMA,
    )


def _purchases(user: str, lines: list[tuple[str, float]]) -> UserState:
    state = UserState(user)
    for item, ts in lines:
        apply_event(state, Event(event_id=f"r{next(_ids)}", user_id=user, kind="purchase", ts=ts, item_id=item))
    return state


class World:
    """The state written to Redis and the orders each ranker must produce over it."""

    def __init__(self, settings: Settings, items: list[str]) -> None:
        from stores.user_store import connect, write_partition_batch, write_user_states

        client = connect(settings)
        self.items = items
        self.now = T0 + 10 * DAY_S
        # distinct short-horizon popularity for every item; served popularity for every item
        self.pop_short = {item: float(n + 1) for n, item in enumerate(items)}
        served = {item: float(len(items) - n) for n, item in enumerate(items)}
        self.users = {
            "u1": _purchases("u1", [(items[0], T0), (items[1], T0), (items[0], T0 + DAY_S)]),
            "u2": _purchases("u2", [(items[0], T0), (items[2], T0 + 2 * DAY_S)]),
            "u3": _purchases("u3", [(items[3], T0 + DAY_S)]),
        }
        write_user_states(client, settings, self.users.values())
        write_partition_batch(
            client, settings, settings.topics.events, 0, 7, {}, {i: (v, self.now) for i, v in served.items()}, self.now
        )
        rules = CollabRules.from_settings(settings)
        write_for_tests(
            client, settings,
            rows={items[0]: {items[0]: (2.0, T0), items[1]: (1.0, T0), items[2]: (1.0, T0)}},
            stats={i: (2, 1) for i in items[:5]},
            pop_short={i: (v, self.now) for i, v in self.pop_short.items()},
            pop_long={i: (v, self.now) for i, v in served.items()},
            first_seen={i: T0 - 100 * DAY_S for i in items},
            newest_ts=self.now,
            vectors={u: shopper_vector(s, rules) for u, s in self.users.items()},
        )
        top = max(self.pop_short.values())
        self.expected_score = {i: math.log(v / top + POP_FLOOR) for i, v in self.pop_short.items()}

    def order(self, sign: float) -> list[str]:
        return sorted(self.items, key=lambda i: (-sign * self.expected_score[i], i))[:K]


@pytest.fixture
def served(fresh_settings: Settings, sample_dir: Path) -> Iterator[tuple[httpx.Client, ServingRuntime, World, Settings]]:
    settings = fresh_settings.model_copy(update={
        "admin_token": TOKEN, "serve_version": "base", "auto_activate": False,
        "ranker_poll_s": 60.0,  # long: a pick-up within the test's wait is the announcement's doing
        "popularity_refresh_s": 0.3,
    })
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    items = seed_catalog(settings, sample_dir, N_ITEMS)
    world = World(settings, sorted(items))
    runtime = ServingRuntime(settings, tools=hash_tools(CatalogTwin(items)))
    with ServerThread(create_app(runtime), free_port()) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert runtime.wait_ready(60)
        deadline = time.monotonic() + 20
        while (runtime.shop.view is None or not runtime.shop.view.pop_short or not runtime.shop.view.popularity
               or len(runtime.shoppers) < 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runtime.shop.view is not None and runtime.shop.view.pop_short, runtime.shop.last_error
        assert runtime.shop.view.popularity == runtime.popularity.view.scores and len(runtime.shoppers) == 3
        yield c, runtime, world, settings


def _announce(settings: Settings, version: str) -> None:
    from freshrec.producer import RecordProducer

    with RecordProducer(settings) as producer:
        producer.send(settings.topics.rankers, version, announcement_bytes(version, FEATURE_SCHEMA))
        producer.flush()


def _recommend(c: httpx.Client, user: str = "u1") -> dict[str, Any]:
    r = c.get("/recommend", params={"user_id": user, "k": K})
    assert r.status_code == 200, r.text
    return r.json()


def _wait_version(c: httpx.Client, version: str | None, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = _recommend(c)
        if body["ranker_version"] == version or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def _ids_of(body: dict[str, Any]) -> list[str]:
    return [i["item_id"] for i in body["items"]]


def test_published_ranker_is_picked_up_orders_answers_and_rolls_back_exactly(
    served: tuple[httpx.Client, ServingRuntime, World, Settings],
) -> None:
    c, runtime, world, settings = served
    registry = RankerRegistry(settings.state_dir / "rankers")

    blend = _recommend(c)
    assert blend["ranker_version"] is None and blend["ranker_fallback"] == "no_ranker"
    assert blend["adapter_version"] == "base" and blend["index_version"]

    # published and activated by the learner's gate, announced on the rankers topic
    up = registry.publish(linear("log_pop_short", 1.0), None, {"recall@10": 0.3}).version
    registry.activate(up)
    _announce(settings, up)
    first = _wait_version(c, up)
    assert first["ranker_version"] == up and first["ranker_fallback"] is None, first
    assert _ids_of(first) == world.order(1.0)
    for item in first["items"]:
        assert item["score"] == pytest.approx(world.expected_score[item["item_id"]], abs=1e-5)
    assert all(_recommend(c, u)["ranker_version"] == up for u in ("u2", "u3"))

    listing = c.get("/admin/rankers", headers=AUTH).json()
    assert listing["serving"] == up and listing["active"] == up and listing["versions"][0]["schema_ok"] is True

    # another version through the admin API: the reverse order
    down = registry.publish(linear("log_pop_short", -1.0), up, {"recall@10": 0.31}).version
    r = c.post(f"/admin/rankers/{down}/activate", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"version": down, "previous": up, "state": "live"}, r.text
    second = _recommend(c)
    assert second["ranker_version"] == down and _ids_of(second) == world.order(-1.0)

    # rollback: the very answers served before, scores included
    r = c.post("/admin/rankers/rollback", headers=AUTH)
    assert r.status_code == 200 and r.json()["version"] == up, r.text
    assert registry.active() == up
    rolled = _recommend(c)
    assert rolled["items"] == first["items"] and rolled["ranker_version"] == up

    # a corrupt version: refused by the admin API and when announced, while `up` serves
    bad = registry.publish(linear("log_pop_short", 2.0), up, {}).version
    path = registry.path(bad) / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    r = c.post(f"/admin/rankers/{bad}/activate", headers=AUTH)
    assert r.status_code == 422 and "checksum mismatch" in r.json()["error"] and up in r.json()["error"], r.text
    assert registry.active() == up
    registry._write_history([*registry.history(), bad])  # activated elsewhere, then its file corrupted
    _announce(settings, bad)
    deadline = time.monotonic() + 20
    while runtime.ranker.blocked is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runtime.ranker.blocked is not None and runtime.ranker.blocked.version == bad
    still = _recommend(c)
    assert still["ranker_version"] == up and still["items"] == first["items"]
    status = c.get("/admin/status", headers=AUTH).json()
    assert status["ranker"]["version"] == up and status["ranker"]["blocked"]["version"] == bad

    # names are checked before the file system; unknown is 404; nothing to roll back is 409
    assert 400 <= c.post("/admin/rankers/..%2Fx/activate", headers=AUTH).status_code < 500
    r = c.post("/admin/rankers/base/activate", headers=AUTH)
    assert r.status_code == 422 and "v<6 digits>-<8 lowercase hex>" in r.json()["error"]
    assert c.post("/admin/rankers/v999999-deadbeef/activate", headers=AUTH).status_code == 404
    assert c.post(f"/admin/rankers/{up}/activate").status_code == 401
    metrics = c.get("/metrics").text
    assert 'freshrec_recommend_ranked_total{by="ranker"}' in metrics
    assert f'freshrec_ranker_info{{version="{up}"}} 1.0' in metrics


def test_requests_through_ranker_swaps_have_no_errors_and_match_their_version(
    served: tuple[httpx.Client, ServingRuntime, World, Settings],
) -> None:
    c, runtime, world, settings = served
    registry = RankerRegistry(settings.state_dir / "rankers")
    up = registry.publish(linear("log_pop_short", 1.0), None, {}).version
    down = registry.publish(linear("log_pop_short", -1.0), up, {}).version
    expected = {up: world.order(1.0), down: world.order(-1.0)}
    runtime.ranker.activate(up)

    stop = threading.Event()
    answers: list[tuple[int, dict[str, Any]]] = []

    def load() -> None:
        with httpx.Client(base_url=str(c.base_url), timeout=30) as client:
            while not stop.is_set():
                r = client.get("/recommend", params={"user_id": "u1", "k": K})
                answers.append((r.status_code, r.json()))

    workers = [threading.Thread(target=load) for _ in range(2)]
    for w in workers:
        w.start()
    swaps = 0
    try:
        for n in range(12):
            version = down if n % 2 == 0 else up
            r = c.post(f"/admin/rankers/{version}/activate", headers=AUTH)
            assert r.status_code == 200, r.text
            swaps += 1
            time.sleep(0.08)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert swaps == 12 and len(answers) > 24
    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
    seen = {body["ranker_version"] for _, body in answers}
    assert seen <= {up, down} and seen == {up, down}
    for _, body in answers:
        assert _ids_of(body) == expected[body["ranker_version"]], body  # the version named made the order


class _Broken:
    """A model whose scoring fails as a real one can (non-finite scores)."""

    def score(self, features: np.ndarray, *, schema: str) -> np.ndarray:
        raise RankerFailed("lightgbm ranker produced 300 non-finite scores")


def test_the_blend_answers_and_says_so_when_the_ranker_fails(
    served: tuple[httpx.Client, ServingRuntime, World, Settings],
) -> None:
    c, runtime, world, settings = served
    blend = _recommend(c)
    assert blend["ranker_fallback"] == "no_ranker"
    registry = RankerRegistry(settings.state_dir / "rankers")
    up = registry.publish(linear("log_pop_short", 1.0), None, {}).version
    loaded = runtime.ranker.activate(up)
    assert _recommend(c)["ranker_version"] == up

    runtime.ranker.install(LoadedRanker(loaded.manifest, _Broken()), "test: a failing model")  # type: ignore[arg-type]
    failed = _recommend(c)
    assert failed["ranker_version"] is None and failed["ranker_fallback"] == "ranker_error"
    assert failed["items"] == blend["items"]  # exactly the blend's answer
    assert failed["adapter_version"] == "base"
    metrics = c.get("/metrics").text
    assert 'freshrec_ranker_fallbacks_total{reason="ranker_error"} 1.0' in metrics
    # a shopper without a basket gets the blend, flagged; an unknown one popularity
    assert _recommend(c, "nobody")["ranker_fallback"] == "cold"
