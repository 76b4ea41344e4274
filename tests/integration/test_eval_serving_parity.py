"""The evaluation's top ten is /recommend's top ten, for the same state and the same version.

One state, made once by the pure code both sides run: a few shoppers' events go through
the users flow's partition logic (``streams.user_partition.UserPartition``) and its
write to a real Redis; the evaluation replays the same events with its
``SystemReplay``. A real serving app (real Redis, int8 ONNX encoder, FAISS index) then
answers /recommend for each shopper, and the evaluation's ``frozen`` method ranks the
same shopper: ids, order and scores must be equal, first on the base version, then on an
adapter version that both load from the same registry.

The evaluation's top ten here is the protocol's own ``top_k`` over every catalog item:
the protocol additionally hides items no event has mentioned yet, which serving cannot
know of, so a top ten of the whole catalog is the like-for-like comparison.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from evaluation.data import build_log
from evaluation.item_space import ServingEncoders, catalog_of, encode_space
from evaluation.methods import SystemMethod, build_system_methods
from evaluation.protocol import top_k
from freshrec.infra import free_port
from freshrec.settings import Settings
from models.registry import AdapterRegistry
from serving.app import create_app
from serving.runtime import ServingRuntime
from serving.testing import ServerThread, ensure_test_adapters
from tests.integration.helpers import seed_catalog

pytestmark = pytest.mark.integration

N_ITEMS = 150
DAY = 86_400.0
T0 = 1_300_000_000.0


@pytest.fixture(scope="session")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The serving tests' shared registry and exports (one random adapter, int8 exported once)."""
    root = tmp_path_factory.getbasetemp() / "serving-shared"
    (root / "exports").mkdir(parents=True, exist_ok=True)
    return root, ensure_test_adapters(root / "adapters", root / "exports", n=1)


@dataclass
class Msg:
    """A Kafka message as the users flow's partition logic reads it."""

    key: bytes
    value: bytes
    offset: int
    topic: str
    partition: int = 0
    timestamp: tuple[int, int] | None = None


def _events(ids: list[str]) -> list[dict[str, Any]]:
    """Six shoppers over nine weeks: re-orders, views, carts, a return, and late arrivals.

    Items 100.. appear only in the last week, so they are new arrivals (``blend_new_days``
    30) while the first weeks' items are not; ``viewer`` has one view, ``ret`` a
    purchase taken back.
    """
    rows: list[tuple[str, str, str, float]] = []
    for n, user in enumerate(["u1", "u2", "u3", "u4"]):
        for visit in range(3):
            t = T0 + visit * 21 * DAY + n * 3600
            basket = ids[n * 7 : n * 7 + 4] if visit != 1 else ids[n * 7 + 2 : n * 7 + 6]
            rows += [(user, i, "purchase", t) for i in basket]
            rows += [(user, ids[40 + n * 5 + visit], "view", t + 60), (user, ids[60 + n], "cart", t + 120)]
    rows += [("u2", ids[1], "purchase", T0 + 50 * DAY), ("u3", ids[1], "purchase", T0 + 51 * DAY)]
    rows += [("u4", ids[100 + k], "purchase", T0 + 60 * DAY + k) for k in range(4)]
    rows += [("u1", ids[104], "view", T0 + 61 * DAY), ("viewer", ids[50], "view", T0 + 61 * DAY + 5)]
    rows += [("ret", ids[3], "purchase", T0 + 55 * DAY), ("ret", ids[3], "cancel", T0 + 55 * DAY + 600)]
    rows.sort(key=lambda r: r[3])
    return [
        {"event_id": f"parity:{k}", "user_id": u, "item_id": i, "kind": kind, "ts": ts}
        for k, (u, i, kind, ts) in enumerate(rows)
    ]


def _write_through_flow_logic(settings: Settings, events: list[dict[str, Any]]) -> dict[str, bytes]:
    """Apply the events with the users flow's partition code and write its batches to Redis as the flow does.

    Each shopper's events go to the partition the producers' partitioner picks for the
    key (murmur2 of the user id), the partition serving then reads that shopper from.
    """
    from stores.user_store import connect, user_partition, write_partition_batch
    from streams.user_partition import UserPartition

    topic = settings.topics.events
    states: dict[str, bytes] = {}
    for p in range(settings.partitions):
        mine = [e for e in events if user_partition(settings, e["user_id"]) == p]
        if not mine:
            continue
        partition = UserPartition.from_settings(settings)
        msgs = [Msg(e["user_id"].encode(), orjson.dumps(e), k, topic, p) for k, e in enumerate(mine)]
        batch = partition.apply(msgs)
        assert batch.applied == len(mine) and not batch.dead_letters
        write_partition_batch(
            connect(settings), settings, topic, p, batch.last_offset, batch.users, batch.popularity, batch.newest_ts,
            batch.first_seen,
        )
        states |= {u: s.to_bytes() for u, s in partition.users().items()}
    return states


@pytest.fixture
def parity(fresh_settings: Settings, shared: tuple[Path, list[str]], sample_dir: Path) -> Iterator[dict[str, Any]]:
    root, versions = shared
    settings = fresh_settings.model_copy(
        # 20 nearest and 20 popular candidates of 150 items: the pool is a real choice.
        # One partition: the evaluation keeps one popularity sum, serving merges one per
        # partition, and with several the decayed float sums differ in the last bits.
        update={"partitions": 1, "serve_version": "base", "encoder_precision": "int8", "popularity_refresh_s": 0.2, "recommend_candidates": 20}
    )
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    (settings.state_dir / "exports").symlink_to(root / "exports", target_is_directory=True)
    (settings.state_dir / "adapters").symlink_to(root / "adapters", target_is_directory=True)
    items = seed_catalog(settings, sample_dir, N_ITEMS)
    events = _events(sorted(items))
    flow_states = _write_through_flow_logic(settings, events)
    log = build_log("parity", events, [r.model_dump() for r in items.values()])
    runtime = ServingRuntime(settings)
    with ServerThread(create_app(runtime), free_port()) as url:
        assert runtime.wait_ready(180), "the serving pair did not load"
        assert runtime.popularity.loaded.wait(10) and runtime.popularity.view.ranked, "serving read no popularity"
        yield {"url": url, "runtime": runtime, "settings": settings, "log": log, "items": items,
               "flow_states": flow_states, "version": versions[0], "root": root}


def _served(client: httpx.Client, user: str) -> dict[str, Any]:
    r = client.get("/recommend", params={"user_id": user, "k": 10})
    assert r.status_code == 200, r.text
    return r.json()


def _assert_same_top_ten(client: httpx.Client, method: SystemMethod, users: list[str], version: str) -> None:
    log = method.replay.log
    everything = np.ones(log.n_items, dtype=bool)
    for user in users:
        body = _served(client, user)
        assert body["adapter_version"] == version == method.space.version
        served = [(i["item_id"], i["score"]) for i in body["items"]]
        u = log.user_ids.index(user) if user in log.user_ids else -1
        evaluated = [log.item_ids[k] for k in top_k(method.scores(u, 0.0), everything, 10)]
        assert evaluated == [i for i, _ in served], f"{user} on {version}: eval {evaluated} != served {served}"
        # The same functions on the same inputs: the same scores, not merely the same order.
        assert [s for _, s in method.ranking(u, 10)] == pytest.approx([s for _, s in served], rel=1e-12, abs=1e-12)
        assert len(served) == 10


def test_eval_top_ten_equals_recommend(parity: dict[str, Any]) -> None:
    settings, log, runtime = parity["settings"], parity["log"], parity["runtime"]
    (frozen,) = build_system_methods(log, settings, float(log.ts[0]), ["frozen"], adapter_exports=parity["root"] / "exports")
    frozen.observe(log, 0, len(log))

    # the same state: the evaluation's replay holds what the flow's logic wrote to Redis
    assert {log.user_ids[u]: s.to_bytes() for u, s in frozen.replay.states.items()} == parity["flow_states"]
    view, served_view = frozen.replay.popularity_view(), runtime.popularity.view
    assert view.scores == served_view.scores and view.ranked == served_view.ranked
    assert view.new_items == served_view.new_items
    assert 0 < len(view.new_items) < len(frozen.replay.popularity.first_seen)  # some items new, most not

    # the same version: int8 vectors equal to the bit, the same similarity scale
    pair = runtime.active.pair
    assert pair is not None and pair.adapter_version == "base" and frozen.space.version == "base"
    assert getattr(pair.encoder, "precision", None) == "int8"
    served_vectors = pair.index.reconstruct_many(log.item_ids)
    assert all(np.array_equal(served_vectors[i], frozen.vectors[k]) for k, i in enumerate(log.item_ids))
    assert pair.similarity == frozen.similarity_scale

    users = ["u1", "u2", "u3", "u4", "ret", "viewer", "nobody"]
    with httpx.Client(base_url=parity["url"], timeout=30) as client:
        assert _served(client, "u1")["source"] == "personal" and _served(client, "nobody")["source"] == "popularity"
        _assert_same_top_ten(client, frozen, users, "base")

        # an adapter version: serving builds its pair, the evaluation its space, from one registry
        version = parity["version"]
        job = runtime.builder.activate(version, reason="admin")
        assert job.done.wait(180) and job.state == "live", job.error
        adapter_dir = AdapterRegistry(settings.state_dir / "adapters").load(version)[1]
        encoders = ServingEncoders(settings, parity["root"] / "exports")
        catalog = catalog_of(log.item_ids, log.titles)
        frozen.set_space(encode_space(encoders.encoder(version, adapter_dir), catalog, log.item_ids, settings))
        assert encoders.exports == 0  # the export serving made is the one the evaluation loads
        assert runtime.active.pair.similarity == frozen.similarity_scale  # type: ignore[union-attr]
        _assert_same_top_ten(client, frozen, users, version)
