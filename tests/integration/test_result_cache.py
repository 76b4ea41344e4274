"""The /recommend result cache over HTTP, with the real Redis and broker (test_serving_ranker's world):
a repeated question is a hit, counted in /metrics and /admin/status; a purchase written to Redis
is in the very next answer, which equals the answer computed with the cache off; a new ranker, a
model replaced under the same version, an item deleted in place and a new adapter each invalidate.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from freshrec.contracts import Event, ItemVector
from freshrec.settings import Settings
from models.ranker_registry import LoadedRanker, RankerRegistry
from ranking.user_state import DAY_S, apply_event
from serving.runtime import ServingRuntime
from tests.integration.test_serving_ranker import (  # noqa: F401 - served is a fixture
    AUTH,
    T0,
    World,
    _Broken,
    _ids_of,
    _recommend,
    linear,
    served,
)

pytestmark = pytest.mark.integration

Served = tuple[httpx.Client, ServingRuntime, World, Settings]


def _metric(c: httpx.Client, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(c.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{name} {labels} not on /metrics")


class Lookups:
    """Hits and misses of the cache since the last call (read from /metrics)."""

    def __init__(self, c: httpx.Client) -> None:
        self.c = c
        self.last = self._read()

    def _read(self) -> tuple[float, float]:
        return (_metric(self.c, "freshrec_result_cache_hits_total"), _metric(self.c, "freshrec_result_cache_misses_total"))

    def since(self) -> tuple[int, int]:
        now = self._read()
        delta = (int(now[0] - self.last[0]), int(now[1] - self.last[1]))
        self.last = now
        return delta


def _timeless(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "server_ms"}


def test_a_repeat_is_a_hit_and_a_purchase_is_in_the_very_next_answer(served: Served) -> None:
    from stores.user_store import connect, write_user_states

    c, runtime, world, settings = served
    lookups = Lookups(c)

    first = _recommend(c)
    assert lookups.since() == (0, 1) and first["ranker_fallback"] == "no_ranker" and first["source"] == "personal"
    second = _recommend(c)
    assert lookups.since() == (1, 0)
    assert _timeless(second) == _timeless(first) and isinstance(second["server_ms"], float)
    assert _metric(c, "freshrec_result_cache_staleness_seconds_count") == 1.0
    assert 0 <= _metric(c, "freshrec_result_cache_staleness_seconds_sum") <= settings.result_cache_ttl_s
    assert _metric(c, "freshrec_recommend_ranked_total", by="blend") == 2.0  # a hit is still an answer
    _recommend(c, "nobody")  # cold: popularity, never looked up
    assert lookups.since() == (0, 0)

    # a purchase applied to Redis (twice: the repeat signal puts the item near the top)
    bought = world.items[40]
    assert bought not in _ids_of(first)
    state = world.users["u1"]
    for n, ts in enumerate((T0 + 3 * DAY_S, T0 + 3 * DAY_S + 60)):
        apply_event(state, Event(event_id=f"cache-{n}", user_id="u1", kind="purchase", item_id=bought, ts=ts))
    write_user_states(connect(settings), settings, [state])

    third = _recommend(c)
    assert lookups.since() == (0, 1)
    assert bought in _ids_of(third)[:3], third
    assert "bought before" in third["items"][_ids_of(third).index(bought)]["reasons"], third

    # exactly what a computation with the cache off gives
    runtime.results.max_entries = 0
    try:
        uncached = _recommend(c)
    finally:
        runtime.results.max_entries = settings.result_cache_size
    assert lookups.since() == (0, 0) and _timeless(uncached) == _timeless(third)
    assert _timeless(_recommend(c)) == _timeless(third) and lookups.since() == (1, 0)

    status = c.get("/admin/status", headers=AUTH).json()["result_cache"]
    assert status["enabled"] and status["hits"] == 2 and status["misses"] == 2 and status["hit_rate"] == 0.5
    assert status["entries"] == 2  # the answer from before the purchase stays until it ages out or is evicted


def test_a_new_ranker_a_replaced_model_a_deleted_item_and_a_new_adapter_each_invalidate(served: Served) -> None:
    c, runtime, world, settings = served
    registry = RankerRegistry(settings.state_dir / "rankers")
    lookups = Lookups(c)

    up = registry.publish(linear("log_pop_short", 1.0), None, {}).version
    runtime.ranker.activate(up)
    first = _recommend(c)
    assert first["ranker_version"] == up and _ids_of(first) == world.order(1.0)
    assert _timeless(_recommend(c)) == _timeless(first) and lookups.since() == (1, 1)

    down = registry.publish(linear("log_pop_short", -1.0), up, {}).version
    runtime.ranker.activate(down)
    second = _recommend(c)
    assert lookups.since() == (0, 1) and second["ranker_version"] == down and _ids_of(second) == world.order(-1.0)

    # the same version with another model (as test_serving_ranker's failing one is installed):
    # never the cached answer, and a failure is not cached either
    loaded = runtime.ranker.current
    assert loaded is not None
    runtime.ranker.install(LoadedRanker(loaded.manifest, _Broken()), "test: a failing model")  # type: ignore[arg-type]
    assert [_recommend(c)["ranker_fallback"] for _ in range(2)] == ["ranker_error", "ranker_error"]
    assert lookups.since() == (0, 2)
    runtime.ranker.install(loaded, "test: the model back")
    assert _timeless(_recommend(c)) == _timeless(second) and lookups.since() == (0, 1)
    assert _timeless(_recommend(c)) == _timeless(second) and lookups.since() == (1, 0)

    # an item deleted from the active index in place (the item-vectors follower's route)
    gone = _ids_of(second)[0]
    runtime.applier.apply([ItemVector(gone, second["adapter_version"], None)])
    third = _recommend(c)
    assert lookups.since() == (0, 1) and gone not in _ids_of(third) and third["ranker_version"] == down

    # a new adapter: a new pair
    job = runtime.builder.activate("v000002-0000aaaa")
    assert job.done.wait(60) and job.state == "live", job.summary()
    fourth = _recommend(c)
    assert lookups.since() == (0, 1)
    assert fourth["adapter_version"] == "v000002-0000aaaa" and fourth["index_version"] != third["index_version"]
    assert gone in _ids_of(fourth)  # the new index was built from the catalog, which still has it
    assert _timeless(_recommend(c)) == _timeless(fourth) and lookups.since() == (1, 0)
