"""The admin API over HTTP with real adapters: auth, listing, activation, exact rollback, status."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from freshrec.infra import free_port
from freshrec.settings import Settings
from serving.app import create_app
from serving.runtime import ServingRuntime
from serving.testing import ServerThread, ensure_test_adapters
from tests.integration.helpers import seed_catalog

pytestmark = pytest.mark.integration

TOKEN = "admin-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="session")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.getbasetemp() / "serving-shared"
    (root / "exports").mkdir(parents=True, exist_ok=True)
    return root, ensure_test_adapters(root / "adapters", root / "exports", n=3)


@pytest.fixture
def admin_server(fresh_settings: Settings, shared: tuple[Path, list[str]], sample_dir: Path) -> Iterator[tuple[httpx.Client, ServingRuntime, dict, list[str]]]:
    root, versions = shared
    settings = fresh_settings.model_copy(update={"admin_token": TOKEN, "serve_version": "base", "auto_activate": False})
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    (settings.state_dir / "exports").symlink_to(root / "exports", target_is_directory=True)
    shutil.copytree(root / "adapters", settings.state_dir / "adapters")
    items = seed_catalog(settings, sample_dir, 150)
    runtime = ServingRuntime(settings)
    with ServerThread(create_app(runtime), free_port()) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert runtime.wait_ready(120)
        yield c, runtime, items, versions


def test_admin_refuses_missing_and_wrong_tokens(admin_server: tuple[httpx.Client, ServingRuntime, dict, list[str]]) -> None:
    c, _, _, versions = admin_server
    calls = [
        ("GET", "/admin/adapters"),
        ("GET", "/admin/status"),
        ("POST", f"/admin/adapters/{versions[0]}/activate"),
        ("POST", "/admin/rollback"),
    ]
    for method, path in calls:
        assert c.request(method, path).status_code == 401, path
        assert c.request(method, path, headers={"Authorization": "Bearer nope"}).status_code == 403, path
        assert c.request(method, path, headers={"Authorization": TOKEN}).status_code == 401, path  # no scheme
    assert c.get("/admin/status", headers=AUTH).status_code == 200


def test_list_activate_rollback_exact_and_status(admin_server: tuple[httpx.Client, ServingRuntime, dict, list[str]]) -> None:
    c, runtime, items, versions = admin_server
    listing = c.get("/admin/adapters", headers=AUTH).json()
    assert [v["version"] for v in listing["versions"]] == versions
    assert listing["active"] == "base" and not any(v["active"] for v in listing["versions"])
    assert all("recall@10" in v["metrics"] and v["pairs_seen"] > 0 for v in listing["versions"])

    queries = [it.title for it in list(items.values())[:8]]

    def answers() -> list[dict]:
        return [c.post("/search", json={"query": q, "k": 10}).json() for q in queries]

    r = c.post(f"/admin/adapters/{versions[0]}/activate", params={"wait": "true"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "live", r.text
    first = answers()
    assert {a["adapter_version"] for a in first} == {versions[0]}
    r = c.post(f"/admin/adapters/{versions[1]}/activate", params={"wait": "true"}, headers=AUTH)
    assert r.status_code == 200
    second = answers()
    assert [a["items"] for a in second] != [a["items"] for a in first]
    assert c.get("/admin/adapters", headers=AUTH).json()["active"] == versions[1]

    r = c.post("/admin/rollback", params={"wait": "true"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["version"] == versions[0], r.text
    rolled = answers()
    assert [a["items"] for a in rolled] == [a["items"] for a in first]  # the exact results, scores included
    assert all(a["adapter_version"] == versions[0] for a in rolled)

    status = c.get("/admin/status", headers=AUTH).json()
    assert status["active"]["adapter_version"] == versions[0]
    assert status["last_swap"]["reason"] == "rollback" and status["last_swap"]["state"] == "live"
    assert set(status["last_swap"]["stages_s"]) >= {"adapter", "encoder", "catalog", "index", "swap"}
    assert status["history"] == ["base", versions[0]]
    assert status["learner"]["latest_version"] == versions[-1]
    assert status["learner"]["pairs_seen"] > 0 and "lag_pairs" in status["learner"]

    # async activation: 202 now, live later; /admin/status shows the build meanwhile
    r = c.post(f"/admin/adapters/{versions[2]}/activate", headers=AUTH)
    assert r.status_code in (200, 202)
    job = runtime.builder.current or runtime.builder.last
    assert job is not None
    assert runtime.wait_ready(5)
    # unknown version: 404, nothing changes
    r = c.post("/admin/adapters/v999999-deadbeef/activate", headers=AUTH)
    assert r.status_code == 404 and "no such version" in r.json()["error"]


def test_version_names_are_checked_and_no_answer_carries_a_path(
    admin_server: tuple[httpx.Client, ServingRuntime, dict, list[str]],
) -> None:
    """Issue 13 items 8-9: malformed names are refused before the file system sees them
    (a 10,000-character one was a 500, OSError: File name too long), and registry errors
    reach the caller without the host's paths (the log keeps them)."""
    c, runtime, _, _ = admin_server
    state_dir = runtime.settings.state_dir
    for name in ["x" * 10_000, "%2E%2E", "..%00", "v000001-0000aaaa%0A", "v000001-0000AAAA"]:
        r = c.post(f"/admin/adapters/{name}/activate", headers=AUTH)
        assert r.status_code == 422 and "v<6 digits>-<8 lowercase hex>" in r.json()["error"], (name[:20], r.text[:200])
    for name in ["..%2F..%2Fetc", "a%2Fb"]:
        assert 400 <= c.post(f"/admin/adapters/{name}/activate", headers=AUTH).status_code < 500

    broken = state_dir / "adapters" / "v000042-0badf00d"  # a version folder without its files
    broken.mkdir()
    (broken / "stray.txt").write_text("not an adapter")
    unknown = c.post("/admin/adapters/v000041-0badf00d/activate", headers=AUTH)
    corrupt = c.post("/admin/adapters/v000042-0badf00d/activate", headers=AUTH)
    assert unknown.status_code == 404 and "<state_dir>/adapters" in unknown.json()["error"]
    assert corrupt.status_code == 422 and "missing" in corrupt.json()["error"]
    listing = c.get("/admin/adapters", headers=AUTH)
    entry = next(v for v in listing.json()["versions"] if v["version"] == broken.name)
    assert "missing manifest.json" in entry["error"]
    status = c.get("/admin/status", headers=AUTH)  # the learner figure reads the broken newest version
    assert "error" in status.json()["learner"]
    for r in (unknown, corrupt, listing, status):
        assert str(state_dir) not in r.text and str(state_dir.resolve()) not in r.text and "/tmp/" not in r.text, r.text[:500]
