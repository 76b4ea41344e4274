"""Hot-swap under load, with real adapters, the real int8 ONNX encoders, Kafka and Redis.

Three random adapters (far apart, so versions are easy to tell apart by their scores)
are published once per session and exported once; each test links its state_dir to
them. Serving runs on uvicorn in a thread and is driven over HTTP.

The version check recomputes every sampled answer with the version the response claims:
the query encoded by that version's encoder, the items' vectors from an index built by
that version over the same catalog. A response that mixed an encoder of one version with
an index of another has scores that fit neither, which the check catches (the unit test
``test_consistency_check_catches_a_mixed_answer`` shows it failing on a mixed answer).
"""

from __future__ import annotations

import random
import shutil
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

import pytest

from freshrec.contracts import AdapterAnnouncement, CatalogItem
from freshrec.infra import free_port
from freshrec.settings import Settings
from serving.app import create_app
from serving.runtime import ServingRuntime
from serving.testing import ServerThread, ensure_test_adapters
from tests.integration.helpers import seed_catalog

pytestmark = pytest.mark.integration

N_ITEMS = 200
TOKEN = "swap-token"
TOL = 2e-3


@pytest.fixture(scope="session")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.getbasetemp() / "serving-shared"
    (root / "exports").mkdir(parents=True, exist_ok=True)
    versions = ensure_test_adapters(root / "adapters", root / "exports", n=3)
    return root, versions


def _link(settings: Settings, root: Path, copy_registry: bool = False) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    (settings.state_dir / "exports").symlink_to(root / "exports", target_is_directory=True)
    if copy_registry:
        shutil.copytree(root / "adapters", settings.state_dir / "adapters")
    else:
        (settings.state_dir / "adapters").symlink_to(root / "adapters", target_is_directory=True)


@pytest.fixture
def swap_server(fresh_settings: Settings, shared: tuple[Path, list[str]], sample_dir: Path) -> Iterator[tuple[str, ServingRuntime, dict, list[str]]]:
    root, versions = shared
    settings = fresh_settings.model_copy(update={"admin_token": TOKEN, "serve_version": "base"})
    _link(settings, root)
    items = seed_catalog(settings, sample_dir, N_ITEMS)
    runtime = ServingRuntime(settings)
    with ServerThread(create_app(runtime), free_port()) as url:
        assert runtime.wait_ready(120)
        yield url, runtime, items, versions


class References:
    """Per version: the encoder and an index built by it over the catalog (the ground truth)."""

    def __init__(self, settings: Settings, items: dict[str, CatalogItem]) -> None:
        self.settings = settings
        self.items = dict(sorted(items.items()))
        self._cache: dict[str, tuple[Any, Any]] = {}

    def get(self, version: str) -> tuple[Any, Any]:
        if version not in self._cache:
            from models.build import build_index
            from models.onnx_encoder import encoder_for

            enc = encoder_for(self.settings, version, None)  # loads the shared export
            self._cache[version] = (enc, build_index(enc, self.items, version))
        return self._cache[version]

    def error(self, version: str, answer: dict[str, Any]) -> float:
        """Largest |returned score - recomputed score| of one answer under ``version``."""
        enc, index = self.get(version)
        if answer["kind"] == "search":
            ref = enc.encode([answer["query"]])[0]
        else:
            ref = index.reconstruct(answer["item"])
        worst = 0.0
        for hit in answer["items"]:
            vec = index.reconstruct(hit["item_id"])
            worst = max(worst, abs(float(vec @ ref) - hit["score"]))
        return worst


def _load(url: str, items: dict[str, CatalogItem], stop: threading.Event, answers: list[dict], errors: list[str], seed: int) -> None:
    rng = random.Random(seed)
    ids = list(items)
    words = [w for it in items.values() for w in it.title.lower().split() if len(w) > 3]
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set():
            try:
                if rng.random() < 0.6:
                    q = " ".join(rng.sample(words, 2))
                    r = c.post("/search", json={"query": q, "k": 5})
                    info = {"kind": "search", "query": q}
                else:
                    item = rng.choice(ids)
                    r = c.get(f"/similar/{item}", params={"k": 5})
                    info = {"kind": "similar", "item": item}
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                body = r.json()
                answers.append({**info, "version": body["adapter_version"], "index_version": body["index_version"], "items": body["items"]})
            except Exception as exc:  # a transport error is an error too
                errors.append(f"{type(exc).__name__}: {exc}")


def _announce(settings: Settings, version: str) -> None:
    from freshrec.producer import RecordProducer

    with RecordProducer(settings) as producer:
        ann = AdapterAnnouncement(version=version, path=str(settings.state_dir / "adapters" / version), created=time.time())
        producer.send(settings.topics.adapters, version, ann.to_bytes())
        producer.flush()


def _wait_live(runtime: ServingRuntime, version: str, timeout: float = 90) -> float:
    t0 = time.perf_counter()
    while runtime.active_version() != version:
        assert time.perf_counter() - t0 < timeout, f"{version} not live after {timeout} s: {runtime.builder.last}"
        time.sleep(0.05)
    return time.perf_counter() - t0


def test_three_swaps_under_load_no_errors_no_mixed_versions(swap_server: tuple[str, ServingRuntime, dict, list[str]]) -> None:
    url, runtime, items, versions = swap_server
    stop = threading.Event()
    answers: list[dict] = []
    errors: list[str] = []
    threads = [threading.Thread(target=_load, args=(url, items, stop, answers, errors, s)) for s in range(3)]
    for t in threads:
        t.start()
    old_pairs = []
    try:
        time.sleep(0.5)
        for version in versions:
            old_pairs.append(weakref.ref(runtime.active.pair))
            _announce(runtime.settings, version)  # auto-activation on the adapters topic
            _wait_live(runtime, version)
            time.sleep(0.5)  # answers from the new pair too
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == [], errors[:5]
    assert runtime.active.swaps == 4  # startup + three
    seen = {a["version"] for a in answers}
    assert seen == {"base", *versions}, seen
    # index_version names one build of one adapter
    assert all(a["index_version"].startswith(a["version"] + "@") for a in answers)

    refs = References(runtime.settings, items)
    sample = answers[:: max(1, len(answers) // 150)]
    wrong = [a for a in sample if refs.error(a["version"], a) > TOL]
    assert not wrong, f"{len(wrong)} of {len(sample)} answers do not match their version, e.g. {wrong[0]}"
    # The check can tell versions apart: under any other version, (nearly) every answer fails it.
    others = [(a, v) for a in sample[:40] for v in ("base", *versions) if v != a["version"]]
    assert sum(refs.error(v, a) > TOL for a, v in others) >= 0.95 * len(others)

    # The old pairs are released once no request holds them (by reference counting: serving never forces a gc).
    assert all(ref() is None for ref in old_pairs)


def test_corrupt_adapter_is_refused_and_active_keeps_serving(
    fresh_settings: Settings, shared: tuple[Path, list[str]], sample_dir: Path
) -> None:
    from models.registry import WEIGHTS_FILE

    root, versions = shared
    settings = fresh_settings.model_copy(update={"admin_token": TOKEN, "serve_version": versions[0]})
    _link(settings, root, copy_registry=True)
    bad = versions[1]
    weights = settings.state_dir / "adapters" / bad / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(data))
    items = seed_catalog(settings, sample_dir, 50)
    runtime = ServingRuntime(settings)
    with ServerThread(create_app(runtime), free_port()) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert runtime.wait_ready(120)
        query = {"query": next(iter(items.values())).title, "k": 5}
        before = c.post("/search", json=query).json()
        _announce(settings, bad)
        deadline = time.time() + 20
        while not any(a.get("refused") for a in runtime.announcements):
            assert time.time() < deadline, "the announcement was not handled"
            time.sleep(0.1)
        assert "checksum mismatch" in runtime.announcements[-1]["refused"]
        r = c.post(f"/admin/adapters/{bad}/activate", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 422 and "checksum mismatch" in r.json()["error"], r.text
        after = c.post("/search", json=query).json()
        assert after["adapter_version"] == versions[0] and after["items"] == before["items"]
        assert runtime.active.swaps == 1



def test_replicas_building_one_version_encode_the_catalog_once(
    fresh_settings: Settings, shared: tuple[Path, list[str]], sample_dir: Path
) -> None:
    """Two replicas' builders (real registry, int8 export, Redis catalog) swap to the same
    version at once: one encodes the catalog, the other waits and reads its vectors; a
    later build (a rollback) re-encodes only the item whose title changed meanwhile."""
    from serving.swap import default_tools
    from stores import catalog_store
    from stores.redis_client import connect

    root, versions = shared
    _link(fresh_settings, root)
    items = seed_catalog(fresh_settings, sample_dir, N_ITEMS)
    client = connect(fresh_settings)
    version = versions[0]
    tools = [default_tools(fresh_settings, client) for _ in range(2)]
    encoders = [t.make_encoder(version, t.load_adapter(version)) for t in tools]
    built: list[Any] = [None, None]
    start = threading.Barrier(2)

    def build(k: int) -> None:
        start.wait()
        built[k] = tools[k].build_index(encoders[k], tools[k].catalog(), version, lambda done, total: None)

    threads = [threading.Thread(target=build, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    reports = sorted((b.build_report for b in built), key=lambda r: r.encoded)
    assert [(r.encoded, r.reused) for r in reports] == [(0, N_ITEMS), (N_ITEMS, 0)]
    ids = sorted(items)
    first, second = built[0].reconstruct_many(ids), built[1].reconstruct_many(ids)
    assert all((first[i] == second[i]).all() for i in ids)

    changed = ids[7]
    catalog_store.write_items(client, fresh_settings, [items[changed].model_copy(update={"title": "a brand new title"})])
    again = tools[0].build_index(encoders[0], tools[0].catalog(), version, lambda done, total: None)
    assert (again.build_report.encoded, again.build_report.reused) == (1, N_ITEMS - 1)
    fresh = encoders[0].encode([tools[0].catalog()[changed].text()])[0]
    assert float(again.reconstruct(changed) @ fresh) > 0.9999
