"""The API's edges (issue 13, item 9 and the serving parts of 4 and 8): the OpenAPI schema
and /docs, the /users token, admin version names checked before any file is touched,
no filesystem path in an answer, and an empty Redis state flagged instead of served as
if it were real."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from freshrec.contracts import CatalogItem
from freshrec.infra import _terminate, free_port, start_redis
from freshrec.settings import Settings
from serving.app import create_app, public_body, public_message
from serving.runtime import ServingRuntime
from serving.shopper_data import EMPTY_STATE, PopularityView, state_gap
from serving.testing import CatalogTwin, hash_tools

ADMIN = "admin-t0ken"
USERS = "users-t0ken"
TITLES = ["red ceramic mug", "blue ceramic mug", "white tea cup", "glass lantern"]


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    kw.setdefault("users_token", USERS)
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens here
    return Settings(redis_url=dead, state_dir=tmp_path / "state", admin_token=ADMIN, popularity_refresh_s=60, **kw)


def _catalog(n: int = len(TITLES)) -> CatalogTwin:
    return CatalogTwin({f"i{k}": CatalogItem(item_id=f"i{k}", title=t) for k, t in enumerate(TITLES[:n])})


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    runtime = ServingRuntime(_settings(tmp_path), tools=hash_tools(_catalog(), known=set()), follow_topics=False)
    with TestClient(create_app(runtime), raise_server_exceptions=False) as c:
        assert runtime.wait_ready(10)
        yield c


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- /openapi.json and /docs -------------------------------------------------------------------


def test_openapi_and_docs_are_served(client: TestClient) -> None:
    r = client.get("/openapi.json")
    assert r.status_code == 200, r.text  # was 500: PydanticUserError ... ForwardRef('JSON')
    spec = r.json()
    paths = spec["paths"]
    assert {"/recommend", "/search", "/similar/{item_id}", "/users/{user_id}", "/readyz", "/admin/status"} <= set(paths)
    ok = paths["/recommend"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/Ranked"}
    body = paths["/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["query"] and body["properties"]["k"]["maximum"] == 100
    assert paths["/users/{user_id}"]["get"]["security"] == [{"UsersToken": []}]
    assert paths["/admin/status"]["get"]["security"] == [{"AdminToken": []}]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# -- /users needs a token ------------------------------------------------------------------------


def test_users_needs_its_token(client: TestClient) -> None:
    r = client.get("/users/u1")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in r.json()["error"] and "users_token" in r.json()["error"]
    assert client.get("/users/u1", headers={"Authorization": f"Basic {USERS}"}).status_code == 401
    assert client.get("/users/u1", headers={"Authorization": USERS}).status_code == 401  # no scheme
    assert client.get("/users/u1", headers=_bearer("wrong")).status_code == 403
    assert client.get("/users/u1", headers=_bearer(ADMIN)).status_code == 403  # the admin token is not it
    # with the token the request reaches Redis (not there here: 503, not an auth error)
    r = client.get("/users/u1", headers=_bearer(USERS))
    assert r.status_code == 503 and "user state is unavailable" in r.json()["error"]
    # the token is checked before anything else: a bad parameter without it is still 401
    assert client.get("/users/u1", params={"n": 0}).status_code == 401


def test_users_is_off_without_a_token(tmp_path: Path) -> None:
    runtime = ServingRuntime(_settings(tmp_path, users_token=None), tools=hash_tools(_catalog()), follow_topics=False)
    with TestClient(create_app(runtime, manage_runtime=False)) as c:
        for headers in ({}, _bearer("anything"), _bearer(ADMIN)):
            r = c.get("/users/u1", headers=headers)
            assert r.status_code == 404 and "FRESHREC_USERS_TOKEN" in r.json()["error"], r.text


# -- admin version names -----------------------------------------------------------------------

BAD_NAMES = [
    "x" * 10_000,  # was 500: OSError: File name too long
    "%2E%2E",  # ".." once the path is decoded
    "..%00",
    "v000001-0000aaaa%00",
    "v000001-0000aaaa%0A",  # "$" alone would let the trailing newline through
    "V000001-0000AAAA",
    "v%D9%A0%D9%A0%D9%A0%D9%A0%D9%A0%D9%A1-0000aaaa",  # Arabic-Indic digits match \d
    "base2",
    "%20",
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: n[:24])
def test_admin_refuses_malformed_version_names_before_touching_files(client: TestClient, name: str) -> None:
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    seen: list[str] = []
    load = runtime.tools.load_adapter
    runtime.tools.load_adapter = lambda v: (seen.append(v), load(v))[1]
    r = client.post(f"/admin/adapters/{name}/activate", headers=_bearer(ADMIN))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error.startswith("version: ") and "v<6 digits>-<8 lowercase hex>" in error and len(error) < 300
    assert seen == []  # refused on the string alone


def test_admin_names_with_a_slash_never_reach_the_route(client: TestClient) -> None:
    for name in ("..%2Fetc", "a%2Fb", "%2Fetc%2Fpasswd"):
        r = client.post(f"/admin/adapters/{name}/activate", headers=_bearer(ADMIN))
        assert 400 <= r.status_code < 500, (name, r.status_code)


def test_admin_well_formed_unknown_version_is_404(client: TestClient) -> None:
    r = client.post("/admin/adapters/v000009-0123abcd/activate", headers=_bearer(ADMIN))
    assert r.status_code == 404 and "no such version" in r.json()["error"]
    assert client.post("/admin/adapters/base/activate", headers=_bearer(ADMIN)).status_code == 200  # already live


# -- no filesystem path in an answer -------------------------------------------------------------


def test_public_message_strips_paths_but_keeps_routes_and_urls(tmp_path: Path) -> None:
    state = tmp_path / "state"
    msg = f"adapter 'v000001-0000aaaa' rejected: missing manifest.json in {state}/adapters/v000001-0000aaaa"
    assert public_message(msg, state) == (
        "adapter 'v000001-0000aaaa' rejected: missing manifest.json in <state_dir>/adapters/v000001-0000aaaa"
    )
    out = public_message("no model at /opt/venv/lib/python3.11/site-packages/gt_model/model.onnx.", state)
    assert out == "no model at .../model.onnx." and "/opt" not in out
    assert public_message("'/etc/passwd' unreadable (errno 2)") == "'.../passwd' unreadable (errno 2)"
    assert public_message("no such version in .freshrec/adapters", ".freshrec") == "no such version in <state_dir>/adapters"
    # not paths: an API route, a URL, a ratio, a relative path outside the state dir
    kept = "see GET /admin/adapters; redis://127.0.0.1:6379/0 at 40 events/s; ./dev up"
    assert public_message(kept, state) == kept
    assert public_body({"a": [f"in {state}/x"], "n": 3}, state) == {"a": ["in <state_dir>/x"], "n": 3}


# -- empty state is flagged ----------------------------------------------------------------------


@pytest.fixture
def empty_redis(tmp_path: Path) -> Iterator[str]:
    """A real Redis that answers and holds nothing (new, restarted without persistence, flushed)."""
    port = free_port()
    svc = start_redis("127.0.0.1", port, tmp_path / "redis-state", reuse_existing=False, persist=False)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _terminate(svc.pid)


def _empty_runtime(tmp_path: Path, catalog: CatalogTwin, redis_url: str) -> ServingRuntime:
    return ServingRuntime(
        _settings(tmp_path).model_copy(update={"redis_url": redis_url}), tools=hash_tools(catalog), follow_topics=False,
    )


def test_recommend_from_an_empty_redis_says_so(tmp_path: Path, empty_redis: str) -> None:
    runtime = _empty_runtime(tmp_path, _catalog(), empty_redis)
    with TestClient(create_app(runtime), raise_server_exceptions=False) as c:
        assert runtime.wait_ready(10) and runtime.popularity.loaded.wait(5)
        assert runtime.popularity.view.applied_partitions == 0
        body = c.get("/recommend", params={"user_id": "u1"}).json()
        assert body["items"] == [] and body["source"] == "popularity"
        assert body["degraded"] is True and body["reason"].startswith(EMPTY_STATE) and "no applied events" in body["reason"]
        # ready (a new system has no events yet), but the empty user state shows
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["ready"] is True and r.json()["degraded"] is True
        assert 'freshrec_degraded_responses_total{endpoint="recommend"} 1.0' in c.get("/metrics").text


def test_an_empty_catalog_is_not_ready(tmp_path: Path, empty_redis: str) -> None:
    runtime = _empty_runtime(tmp_path, CatalogTwin({}), empty_redis)
    with TestClient(create_app(runtime), raise_server_exceptions=False) as c:
        assert runtime.wait_ready(10)  # the pair is live, with 0 items
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False and r.json()["items"] == 0
        assert r.json()["worker"] == os.getpid()  # which worker answered: each loads its own pair
        assert "catalog is empty" in r.json()["reason"]
        body = c.get("/recommend", params={"user_id": "u1"}).json()
        assert body["degraded"] is True and "catalog is empty" in body["reason"]
        body = c.post("/search", json={"query": "mug"}).json()
        assert body["degraded"] is True and "catalog is empty" in body["reason"]


def test_state_gap() -> None:
    full = PopularityView.of({"a": 1.0}, applied_partitions=4)
    assert state_gap(full, 10, cold=True) is None
    assert "catalog is empty" in (state_gap(full, 0, cold=False) or "")
    assert "no applied events" in (state_gap(PopularityView.of({}, applied_partitions=0), 10, cold=False) or "")
    no_purchases = PopularityView.of({}, applied_partitions=2)
    assert state_gap(no_purchases, 10, cold=False) is None  # a personal answer does not need popularity
    assert "no popularity" in (state_gap(no_purchases, 10, cold=True) or "")
    assert state_gap(PopularityView.of({}), 10, cold=True) is None  # not read: unknown, not empty


def test_a_failed_build_reports_its_error_without_paths(tmp_path: Path) -> None:
    """Export and load failures reach /admin as the build job's error: the reason stays, the path goes."""
    import dataclasses

    settings = _settings(tmp_path)
    version = "v000003-0000cccc"
    exports = settings.state_dir.resolve() / "exports" / version

    def make_encoder(v: str, path: Any) -> Any:
        from serving.testing import HashEncoder

        if v == version:
            raise OSError(28, "No space left on device", f"{exports}/model.int8.onnx")
        return HashEncoder(v, 32)

    tools = dataclasses.replace(hash_tools(_catalog(), known={version}), make_encoder=make_encoder)
    runtime = ServingRuntime(settings, tools=tools, follow_topics=False)
    with TestClient(create_app(runtime), raise_server_exceptions=False) as c:
        assert runtime.wait_ready(10)
        r = c.post(f"/admin/adapters/{version}/activate", params={"wait": "true"}, headers=_bearer(ADMIN))
        assert r.status_code == 422, r.text
        assert "No space left on device" in r.json()["error"] and "<state_dir>/exports" in r.json()["error"]
        status = c.get("/admin/status", headers=_bearer(ADMIN))
        assert status.json()["last_job"]["state"] == "failed"
        for text in (r.text, status.text):
            assert str(tmp_path) not in text and str(settings.state_dir.resolve()) not in text, text[:400]
        assert runtime.active_version() == "base"


def test_is_version_name_accepts_exactly_the_registry_format() -> None:
    from models.registry import is_version_name

    assert is_version_name("v000001-0a1b2c3d")
    for bad in ["v000001-0a1b2c3d\n", "v00001-0a1b2c3d", "v000001-0A1B2C3D", "v٠٠٠٠٠١-0a1b2c3d", "../v000001-0a1b2c3d",
                "v000001-0a1b2c3d/..", "", "base", "v000001-0a1b2c3d\x00"]:
        assert not is_version_name(bad), repr(bad)
