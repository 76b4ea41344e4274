"""serving.result_cache and the generations it keys on: the LRU bound, the TTL, a key that
changes with each thing an answer is made of, and the sources that move those generations
exactly when (and only when) what they hold changes."""

from __future__ import annotations

import doctest
import threading
from pathlib import Path

import numpy as np
import pytest

import serving.result_cache as result_cache_module
from freshrec.contracts import Event, ItemVector
from models.live_index import LiveIndex
from models.ranker_registry import LoadedRanker, RankerRegistry
from ranking.features import FeatureRules
from ranking.user_state import UserState, apply_event
from serving.collab_data import CollabShop
from serving.pair import ActivePair, ServingPair
from serving.ranker_slot import RankerSlot
from serving.result_cache import AnswerKey, ResultCache, state_digest
from serving.shop_view import ShopCache
from serving.shopper_data import PopularityCache, PopularityView
from serving.testing import HashEncoder
from serving.vectors import VectorApplier
from tests.unit.test_ranker_slot import linear, publish


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_docstring_examples_run() -> None:
    assert doctest.testmod(result_cache_module).failed == 0


def test_least_recently_used_entries_go_first_and_the_bound_holds() -> None:
    cache: ResultCache[str] = ResultCache(max_entries=2, ttl_s=60.0, clock=Clock())
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("c", "C")
    assert len(cache) == 2 and cache.evicted == 1
    assert cache.get("b") is None
    assert cache.get("a").value == "A" and cache.get("c").value == "C"  # type: ignore[union-attr]
    cache.put("a", "A2")  # a replaced entry does not grow the cache
    assert len(cache) == 2 and cache.get("a").value == "A2"  # type: ignore[union-attr]
    assert cache.stats() | {"hit_rate": None} == {
        "enabled": True, "entries": 2, "max_entries": 2, "ttl_s": 60.0,
        "hits": 4, "misses": 1, "expired": 0, "evicted": 1, "hit_rate": None,
    }
    assert cache.stats()["hit_rate"] == 0.8


def test_an_entry_is_served_until_its_ttl_with_its_age_then_dropped() -> None:
    clock = Clock()
    cache: ResultCache[str] = ResultCache(max_entries=10, ttl_s=2.0, clock=clock)
    cache.put("k", "v")
    clock.now += 1.5
    hit = cache.get("k")
    assert hit is not None and hit.value == "v" and hit.age_s == pytest.approx(1.5)
    clock.now += 0.5  # exactly the TTL: still served
    assert cache.get("k") is not None
    clock.now += 0.01
    assert cache.get("k") is None and cache.expired == 1 and len(cache) == 0
    cache.put("k", "v2")  # stored anew: its age starts again
    hit = cache.get("k")
    assert hit is not None and hit.value == "v2" and hit.age_s == 0.0


def test_size_zero_turns_the_cache_off_and_bad_settings_are_refused() -> None:
    cache: ResultCache[str] = ResultCache(max_entries=0, ttl_s=2.0)
    assert not cache.enabled
    cache.put("k", "v")
    assert len(cache) == 0 and cache.get("k") is None
    with pytest.raises(ValueError, match="max_entries"):
        ResultCache(max_entries=-1, ttl_s=2.0)
    with pytest.raises(ValueError, match="ttl_s"):
        ResultCache(max_entries=1, ttl_s=0.0)


def test_threads_sharing_the_cache_never_exceed_its_bound() -> None:
    cache: ResultCache[int] = ResultCache(max_entries=50, ttl_s=60.0)
    errors: list[BaseException] = []
    sizes: list[int] = []

    def work(seed: int) -> None:
        try:
            rng = np.random.default_rng(seed)
            for n in rng.integers(0, 200, size=3000).tolist():
                if cache.get(n) is None:
                    cache.put(n, n)
                sizes.append(len(cache))
        except BaseException as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and max(sizes) <= 50
    assert cache.hits + cache.misses == 4 * 3000
    assert all(cache.get(n) is None or cache.get(n).value == n for n in range(200))  # type: ignore[union-attr]


def _key(**change: object) -> AnswerKey:
    base = AnswerKey("u1", 10, state_digest(b"{}"), "base@1", 0, 1, None, 3, 4)
    return base._replace(**change)


@pytest.mark.parametrize(
    "change",
    [
        {"user_id": "u2"}, {"k": 11}, {"state": state_digest(b"{ }")}, {"index_version": "base@2"},
        {"catalog": 1}, {"ranker": 2}, {"blocked": "schema_mismatch"}, {"popularity": 4}, {"shop": 5},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_change_of_any_part_of_the_key_misses(change: dict[str, object]) -> None:
    cache: ResultCache[str] = ResultCache(max_entries=10, ttl_s=60.0)
    cache.put(_key(), "answer")
    assert cache.get(_key()) is not None
    assert cache.get(_key(**change)) is None


def _purchase(state: UserState, item: str, ts: float) -> None:
    event = Event(event_id=f"{state.user_id}:{item}:{ts}", user_id=state.user_id, kind="purchase", item_id=item, ts=ts)
    apply_event(state, event)


def test_the_state_digest_moves_with_a_purchase_and_survives_a_round_trip_through_redis_bytes() -> None:
    state = UserState("u1")
    _purchase(state, "i1", 1_300_000_000.0)
    before = state_digest(state.to_bytes())
    assert state_digest(UserState.from_bytes(state.to_bytes()).to_bytes()) == before
    _purchase(state, "i2", 1_300_000_060.0)
    assert state_digest(state.to_bytes()) != before
    again = UserState.from_bytes(state.to_bytes())
    _purchase(again, "i2", 1_300_000_060.0)  # the same event again: a duplicate changes nothing
    assert state_digest(again.to_bytes()) == state_digest(state.to_bytes())


def test_popularity_generation_moves_with_each_new_view_and_not_on_an_idle_refresh() -> None:
    offsets = {"events:0": 5}
    reads = []

    class Reading:
        scores = {"i1": 2.0, "i2": 1.0}
        first_seen: dict[str, float] = {}
        newest_ts = 10.0

    def read() -> Reading:
        reads.append(1)
        return Reading()

    cache = PopularityCache(read, every_s=60.0, read_applied=lambda: offsets)
    gen0, view0 = cache.stamped
    assert cache.refresh() and len(reads) == 1
    gen1, view1 = cache.stamped
    assert gen1 != gen0 and view1 is cache.view and view1.ranked == ("i1", "i2")
    assert cache.refresh() and len(reads) == 1  # offsets unchanged: same view, same generation
    assert cache.stamped == (gen1, view1)
    offsets["events:0"] = 6
    assert cache.refresh() and len(reads) == 2
    assert cache.stamped[0] not in (gen0, gen1)
    cache.view = view1  # set directly (tests do): the same object again is still a new generation
    assert cache.stamped[1] is view1 and cache.stamped[0] not in (gen0, gen1)


def test_shop_generation_moves_when_the_view_is_rebuilt_only() -> None:
    popularity = PopularityCache(lambda: None, every_s=60.0)  # type: ignore[arg-type,return-value]
    popularity.view = PopularityView.of({"i1": 1.0})
    collab = CollabShop(newest_ts=10.0, first_seen={"i1": 1.0}, marker=(10.0, 1, 1))
    shop = ShopCache(lambda previous: previous or collab, popularity, FeatureRules(), every_s=60.0)
    gen0, view0 = shop.stamped
    assert view0 is None
    assert shop.refresh()
    gen1, view1 = shop.stamped
    assert view1 is not None and gen1 != gen0
    assert shop.refresh() and shop.stamped == (gen1, view1)  # the marker did not move: nothing rebuilt
    popularity.view = PopularityView.of({"i1": 1.0, "i2": 3.0})
    shop.on_popularity(popularity.view)  # what the popularity thread calls
    gen2, view2 = shop.stamped
    assert view2 is not view1 and gen2 not in (gen0, gen1) and view2.popularity == popularity.view.scores


def test_ranker_generation_moves_with_every_install_even_of_the_same_version(tmp_path: Path) -> None:
    registry = RankerRegistry(tmp_path / "rankers")
    slot = RankerSlot(registry)
    gen0, current = slot.stamped
    assert current is None
    v1 = publish(registry, linear("log_pop"))
    loaded = slot.activate(v1)
    gen1, current = slot.stamped
    assert current is loaded and gen1 != gen0
    slot.install(loaded, "again")  # the same object: a no-op
    assert slot.stamped == (gen1, loaded)
    replaced = LoadedRanker(loaded.manifest, linear("log_pop", -1.0))
    slot.install(replaced, "same version, another model")
    gen2, current = slot.stamped
    assert current is replaced and current.version == v1 and gen2 not in (gen0, gen1)
    slot.install(loaded, "rollback")
    assert slot.stamped[1] is loaded and slot.stamped[0] not in (gen0, gen1, gen2)


def test_applying_item_vectors_signals_a_change_once_it_is_complete_even_when_it_fails() -> None:
    encoder = HashEncoder("base", dim=8)
    index = LiveIndex(8, "base", kind="flat", use_gpu=False)
    index.upsert(["i1", "i2"], encoder.encode(["red mug", "blue mug"]))
    active = ActivePair(ServingPair(encoder, index, "base", "base@1"))
    seen: list[tuple[bool, bool]] = []  # at each signal: (i1 present, i3 present)

    def read_items(ids: list[str]) -> dict[str, object]:
        raise ConnectionError("redis away")

    applier = VectorApplier(active, None, read_items, on_changed=lambda: seen.append(("i1" in index, "i3" in index)))
    applier.apply([ItemVector("i1", "base", None)])  # a delete: no read needed
    assert seen == [(False, False)]
    with pytest.raises(ConnectionError):  # the vector is in; re-reading the item's record failed
        applier.apply([ItemVector("i3", "base", encoder.encode(["green mug"])[0])])
    assert seen == [(False, False), (False, True)]
    applier.apply([])
    assert len(seen) == 2  # nothing applied, nothing signalled
