"""The HTTP layer (serving.app, serving.admin) over toy encoders, the real LiveIndex, and
a Redis that is not there (so /recommend must degrade, not fail)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from freshrec.contracts import CatalogItem
from freshrec.infra import free_port
from freshrec.settings import Settings
from serving.app import MAX_BODY_BYTES, create_app
from serving.runtime import ConfigError, ServingRuntime
from serving.shopper_data import PopularityView
from serving.testing import CatalogTwin, hash_tools

TOKEN = "t0ken-for-tests"
USERS_TOKEN = "users-t0ken"
V1, VBAD = "v000001-0000aaaa", "v000002-0000bbbb"  # names in the registry's format
TITLES = ["red ceramic mug", "blue ceramic mug", "white tea cup", "glass lantern", "tea light candle", "cake stand"]


def _settings(tmp_path: Path, **kw) -> Settings:  # type: ignore[no-untyped-def]
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens here
    kw.setdefault("users_token", USERS_TOKEN)
    return Settings(redis_url=dead, state_dir=tmp_path / "state", admin_token=TOKEN, popularity_refresh_s=60, **kw)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    catalog = CatalogTwin({f"i{n}": CatalogItem(item_id=f"i{n}", title=t) for n, t in enumerate(TITLES)})
    tools = hash_tools(catalog, known={V1}, corrupt={VBAD})
    runtime = ServingRuntime(_settings(tmp_path), tools=tools, follow_topics=False)
    with TestClient(create_app(runtime), raise_server_exceptions=False) as c:
        assert runtime.wait_ready(10)
        runtime.popularity.view = PopularityView.of({"i3": 5.0, "i0": 2.0, "gone": 9.0})
        yield c


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_health_ready_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json()["ok"] is True
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["items"] == len(TITLES)
    client.get("/similar/i0")
    text = client.get("/metrics").text
    assert "freshrec_request_seconds_bucket" in text and 'endpoint="similar"' in text
    assert "freshrec_index_items 6.0" in text and 'freshrec_adapter_info{version="base"} 1.0' in text


def test_search_and_similar_shape(client: TestClient) -> None:
    r = client.post("/search", json={"query": "ceramic mug", "k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"items", "adapter_version", "index_version", "server_ms"}
    assert [i["item_id"] for i in body["items"]] == ["i0", "i1"] or {i["item_id"] for i in body["items"]} == {"i0", "i1"}
    assert body["items"][0]["title"] in TITLES and body["adapter_version"] == "base"
    r = client.get("/similar/i0", params={"k": 3})
    assert r.status_code == 200 and "i0" not in [i["item_id"] for i in r.json()["items"]]
    assert len(r.json()["items"]) == 3


def test_recommend_degrades_to_popularity_without_redis(client: TestClient) -> None:
    r = client.get("/recommend", params={"user_id": "u1", "k": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["degraded"] is True and "redis" in body["reason"]
    assert [i["item_id"] for i in body["items"]] == ["i3", "i0"]  # "gone" is not in the index


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "needle"),
    [
        ("get", "/recommend", {"params": {"k": 5}}, 422, "user_id: is required"),
        ("get", "/recommend", {"params": {"user_id": "u", "k": 0}}, 422, "k:"),
        ("get", "/recommend", {"params": {"user_id": "u", "k": 101}}, 422, "k:"),
        ("get", "/recommend", {"params": {"user_id": "u", "k": "ten"}}, 422, "k:"),
        ("get", "/recommend", {"params": {"user_id": "x" * 200}}, 422, "user_id"),
        ("get", "/similar/nope", {}, 404, "unknown item 'nope'"),
        ("get", "/similar/i0", {"params": {"k": 1000}}, 422, "k:"),
        ("post", "/search", {"json": {"query": "   "}}, 422, "query: must not be empty"),
        ("post", "/search", {"json": {"k": 3}}, 422, "query: is required"),
        ("post", "/search", {"json": {"query": "mug", "k": 0}}, 422, "k: must be between 1 and 100"),
        ("post", "/search", {"json": {"query": "mug", "k": True}}, 422, "k: must be an integer"),
        ("post", "/search", {"json": {"query": "q" * 1001}}, 413, "limit is 1,000"),
        ("post", "/search", {"content": b"x" * (MAX_BODY_BYTES + 1)}, 413, "bytes"),
        ("post", "/search", {"content": b"{not json"}, 422, "must be JSON"),
        ("post", "/search", {"json": ["mug"]}, 422, "JSON object"),
        ("post", "/search", {"json": {"query": "mug", "extra": 1}}, 422, "unknown field"),
        ("post", "/search", {"json": {"query": "mug", "user_id": 7}}, 422, "user_id"),
    ],
)
def test_bad_requests_get_clear_4xx(client: TestClient, method: str, path: str, kwargs: dict, status: int, needle: str) -> None:
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_admin_auth(client: TestClient) -> None:
    assert client.get("/admin/status").status_code == 401
    assert client.get("/admin/status", headers={"Authorization": "Basic abc"}).status_code == 401
    assert client.get("/admin/status", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.post("/admin/rollback", headers={"Authorization": "Bearer wrong"}).status_code == 403
    r = client.get("/admin/status", headers=_auth())
    assert r.status_code == 200 and r.json()["active"]["adapter_version"] == "base"


def test_admin_activate_rollback_and_refusals(client: TestClient) -> None:
    r = client.post(f"/admin/adapters/{VBAD}/activate", headers=_auth())
    assert r.status_code == 422 and "checksum" in r.json()["error"] and "still serving base" in r.json()["error"]
    r = client.post("/admin/adapters/v999999-deadbeef/activate", headers=_auth())
    assert r.status_code == 404
    assert client.post("/admin/rollback", headers=_auth()).status_code == 409
    before = client.post("/search", json={"query": "tea", "k": 3}).json()
    r = client.post(f"/admin/adapters/{V1}/activate", params={"wait": "true"}, headers=_auth())
    assert r.status_code == 200 and r.json()["state"] == "live"
    after = client.post("/search", json={"query": "tea", "k": 3}).json()
    assert after["adapter_version"] == V1
    r = client.post("/admin/rollback", params={"wait": "true"}, headers=_auth())
    assert r.status_code == 200
    again = client.post("/search", json={"query": "tea", "k": 3}).json()
    assert again["adapter_version"] == "base" and again["items"] == before["items"]
    status = client.get("/admin/status", headers=_auth()).json()
    assert status["swaps"] == 3 and status["last_swap"]["reason"] == "rollback"


def test_admin_off_without_token(tmp_path: Path) -> None:
    catalog = CatalogTwin({"i0": CatalogItem(item_id="i0", title="mug")})
    s = _settings(tmp_path).model_copy(update={"admin_token": None})
    runtime = ServingRuntime(s, tools=hash_tools(catalog), follow_topics=False)
    app = create_app(runtime, manage_runtime=False)
    with TestClient(app) as c:
        assert c.get("/admin/status").status_code == 404


def test_refuses_to_start_with_admin_enabled_and_no_token(tmp_path: Path) -> None:
    s = _settings(tmp_path).model_copy(update={"admin_token": None, "admin_enabled": True})
    with pytest.raises(ConfigError, match="FRESHREC_ADMIN_TOKEN"):
        ServingRuntime(s, tools=hash_tools(CatalogTwin({})), follow_topics=False)


def test_cli_refuses_admin_without_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from serving.cli import main

    s = _settings(tmp_path).model_copy(update={"admin_token": None, "admin_enabled": True})
    assert main([], s) == 2
    assert "FRESHREC_ADMIN_TOKEN" in capsys.readouterr().err


def test_not_ready_is_503(tmp_path: Path) -> None:
    runtime = ServingRuntime(_settings(tmp_path), tools=hash_tools(CatalogTwin({})), follow_topics=False)
    with TestClient(create_app(runtime, manage_runtime=False)) as c:
        assert c.get("/readyz").status_code == 503
        r = c.get("/similar/x")
        assert r.status_code == 503 and "loading" in r.json()["error"]


def test_redis_gate_opens_only_after_consecutive_failures() -> None:
    """One slow read (e.g. a GIL stall behind an index build) must not degrade a whole second."""
    import redis

    from serving.shopper_data import RedisGate, RedisUnavailable

    now = [0.0]
    gate = RedisGate(retry_after_s=1.0, clock=lambda: now[0], failure_threshold=3)

    def fail() -> None:
        raise redis.TimeoutError("slow")

    for _ in range(2):
        with pytest.raises(RedisUnavailable):
            gate.call(fail)
    assert gate.healthy and gate.call(lambda: "ok") == "ok"  # a success resets the count
    for _ in range(3):
        with pytest.raises(RedisUnavailable):
            gate.call(fail)
    assert not gate.healthy
    with pytest.raises(RedisUnavailable, match="retrying"):
        gate.call(lambda: "never called")
    now[0] = 1.5
    assert gate.call(lambda: "ok") == "ok"


def test_docs_page_loads_swagger_ui_from_this_server_not_a_cdn(client: TestClient) -> None:
    """/docs must work offline: every script and stylesheet it names is served here."""
    import re

    page = client.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert any(u.endswith("swagger-ui-bundle.js") for u in urls) and any(u.endswith(".css") for u in urls)
    assert not [u for u in urls if u.startswith(("http:", "https:", "//"))], urls
    for url in urls:
        got = client.get(url)
        assert got.status_code == 200 and len(got.content) > 100, url
    assert client.get("/openapi.json").status_code == 200
