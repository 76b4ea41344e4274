"""serving.ranker_slot and serving.ranked: the ranker swaps on its own, rolls back exactly, refuses
corrupt and other-schema versions while the active one serves, and any failure is a flagged fallback."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from freshrec.contracts import Event
from models.live_index import LiveIndex
from models.ranker import MLPRanker, RankerFailed, RankerMismatch
from models.ranker_registry import ACTIVE_FILE, MODEL_FILE, RankerRegistry
from ranking.collab import CollabRules
from ranking.features import COLUMN, FEATURE_NAMES, FEATURE_SCHEMA, FeatureRules, ShopperView, ShopView
from ranking.scoring import IDENTITY_SCALE
from ranking.user_state import DAY_S, UserState, apply_event
from serving.ranked import FALLBACKS, gather_shopper, rank, top, try_ranker
from serving.ranker_slot import RankerRefused, RankerSlot, announcement_bytes, parse_announcement

D = len(FEATURE_NAMES)
T0 = 1_300_000_000.0
_ids = itertools.count()


def linear(feature: str, sign: float = 1.0, schema: str = FEATURE_SCHEMA, names: tuple[str, ...] = FEATURE_NAMES) -> MLPRanker:
    """A ranker whose score is ``sign * feature`` exactly (a linear MLP: no hidden layer)."""
    w = np.zeros(len(names), dtype=np.float32)
    w[names.index(feature)] = sign
    return MLPRanker({"mean": np.zeros(len(names)), "std": np.ones(len(names)), "w0": w, "b0": np.zeros(())}, names, schema)


def publish(registry: RankerRegistry, model: MLPRanker, parent: str | None = None) -> str:
    return registry.publish(model, parent, {"recall@10": 0.3}).version


@pytest.fixture
def registry(tmp_path: Path) -> RankerRegistry:
    return RankerRegistry(tmp_path / "rankers")


def x(n: int = 5) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, D)).astype(np.float32)


def test_sync_follows_the_registry_and_swaps_one_object(registry: RankerRegistry) -> None:
    swapped: list[str | None] = []
    slot = RankerSlot(registry, on_swap=lambda r: swapped.append(None if r is None else r.version))
    assert slot.sync() is None and slot.current is None and slot.blocked is None
    v1 = publish(registry, linear("log_pop"))
    v2 = publish(registry, linear("log_repeat"), v1)
    assert slot.sync() is None  # published but not active: still the blend
    registry.activate(v1)
    assert slot.sync() == v1 and slot.version == v1
    first = slot.current
    registry.activate(v2)
    assert slot.sync() == v2 and slot.previous is first
    assert swapped == [v1, v2]
    assert slot.sync() == v2 and swapped == [v1, v2]  # an unchanged record installs nothing


def test_rollback_reinstalls_the_same_object_and_exact_scores(registry: RankerRegistry) -> None:
    v1 = publish(registry, linear("log_pop"))
    v2 = publish(registry, linear("log_repeat"), v1)
    slot = RankerSlot(registry)
    slot.activate(v1)
    first = slot.current
    assert first is not None
    before = first.model.score(x(), schema=FEATURE_SCHEMA)
    slot.activate(v2)
    assert registry.active() == v2
    assert not np.array_equal(slot.current.model.score(x(), schema=FEATURE_SCHEMA), before)
    back = slot.rollback()
    assert back is first and slot.current is first and registry.active() == v1
    np.testing.assert_array_equal(slot.current.model.score(x(), schema=FEATURE_SCHEMA), before)
    with pytest.raises(LookupError):
        slot.rollback()  # the record holds v1 alone now


def _corrupt(registry: RankerRegistry, version: str) -> None:
    path = registry.path(version) / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_version_is_refused_and_the_active_one_keeps_serving(registry: RankerRegistry) -> None:
    v1 = publish(registry, linear("log_pop"))
    v2 = publish(registry, linear("log_repeat"), v1)
    slot = RankerSlot(registry)
    slot.activate(v1)
    serving = slot.current
    _corrupt(registry, v2)
    with pytest.raises(RankerRefused) as refused:
        slot.activate(v2)
    assert refused.value.code == "rejected" and "checksum mismatch" in str(refused.value)
    assert registry.active() == v1 and slot.current is serving  # the record was not touched
    # corrupted after another process made it active: the slot keeps v1 and says why
    registry._write_history([v1, v2])
    assert slot.sync() == v1 and slot.current is serving
    assert slot.blocked is not None and slot.blocked.version == v2 and slot.blocked.code == "rejected"
    n = len(slot.refusals)
    slot.sync()
    assert len(slot.refusals) == n  # refused once, not re-read on every poll
    assert slot.summary()["blocked"]["version"] == v2


def test_other_schema_is_refused_and_the_blend_is_flagged(registry: RankerRegistry) -> None:
    other = publish(registry, linear("log_pop", schema="f0-00000000"))
    slot = RankerSlot(registry)
    with pytest.raises(RankerRefused) as refused:
        slot.activate(other)
    assert refused.value.code == "schema_mismatch" and registry.active() is None
    registry._write_history([other])  # e.g. serving upgraded its features, the registry did not
    assert slot.sync() is None and slot.current is None
    assert slot.blocked is not None and slot.blocked.code == "schema_mismatch"
    answer, fallback = try_ranker(
        slot.current, slot.blocked.code, UserState("u"), None, None, None, IDENTITY_SCALE, FeatureRules(), 5  # type: ignore[arg-type]
    )
    assert answer is None and fallback == "schema_mismatch" and fallback in FALLBACKS
    # same names in another order: also another schema as far as serving is concerned
    names = tuple(reversed(FEATURE_NAMES))
    swapped = publish(registry, linear("log_pop", names=names))
    with pytest.raises(RankerRefused):
        slot.activate(swapped)


def test_announcements_parse_and_other_schemas_are_refused_unloaded(registry: RankerRegistry) -> None:
    ann = parse_announcement(announcement_bytes("v000001-0000aaaa", FEATURE_SCHEMA, None))
    assert ann.version == "v000001-0000aaaa" and ann.feature_schema == FEATURE_SCHEMA
    extra = json.dumps({"version": "v000002-0000bbbb", "schema": FEATURE_SCHEMA, "family": "mlp", "metrics": {}}).encode()
    assert parse_announcement(extra).version == "v000002-0000bbbb"  # publishers may say more
    for bad in (b"nope", b"[]", b'{"version": "v1"}'):
        with pytest.raises(ValueError):
            parse_announcement(bad)
    slot = RankerSlot(registry)
    assert slot.on_announcement(b"garbage") is None
    slot.on_announcement(announcement_bytes("v000003-0000cccc", "f0-other"))
    assert slot.refusals[-1].code == "schema_mismatch" and slot.announcements[-1]["refused"]


# -- the ranker path over a real LiveIndex ------------------------------------------------------


def _ev(user: str, item: str, ts: float, kind: str = "purchase") -> Event:
    return Event(event_id=f"s{next(_ids)}", user_id=user, kind=kind, ts=ts, item_id=item)


def _state(user: str, purchases: list[tuple[str, float]]) -> UserState:
    s = UserState(user)
    for item, ts in purchases:
        apply_event(s, _ev(user, item, ts))
    return s


ITEMS = [f"i{n}" for n in range(12)]


def _index() -> LiveIndex:
    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((len(ITEMS), 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = LiveIndex(16, "base", kind="flat", use_gpu=False)
    index.upsert(ITEMS, vecs)
    return index


def _shop() -> ShopView:
    pop = {item: (n + 1) / len(ITEMS) for n, item in enumerate(ITEMS)}  # i11 most popular
    pop["gone"] = 1.0  # popular but not in the index: must never be ranked
    ranked = sorted(pop, key=lambda i: (-pop[i], i))
    return ShopView(now_ts=T0 + 10 * DAY_S, popularity=pop, pop_short=pop, pop_long=pop, popular_top=ranked)


def test_rank_orders_by_the_rankers_scores_and_drops_items_not_in_the_index(registry: RankerRegistry) -> None:
    registry.activate(publish(registry, linear("log_pop")))
    loaded = registry.load_active()
    state = _state("u", [("i0", T0), ("i1", T0 + DAY_S)])
    view = ShopperView(state)
    answer = rank(loaded, view, _shop(), _index(), IDENTITY_SCALE, FeatureRules(), 5)
    assert [i for i, _ in answer.ranked] == ["i11", "i10", "i9", "i8", "i7"]  # log_pop order; "gone" left out
    assert answer.proposed == answer.candidates + 1
    scores = [s for _, s in answer.ranked]
    assert scores == sorted(scores, reverse=True)
    # the other sign: the least popular first, own items included
    flipped = registry.load(publish(registry, linear("log_pop", -1.0)))
    assert [i for i, _ in rank(flipped, view, _shop(), _index(), IDENTITY_SCALE, FeatureRules(), 3).ranked] == ["i0", "i1", "i2"]


class _Raises:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def score(self, features: np.ndarray, *, schema: str) -> np.ndarray:
        raise self.exc


def test_any_failure_of_the_ranker_path_is_a_flagged_fallback(registry: RankerRegistry) -> None:
    registry.activate(publish(registry, linear("log_pop")))
    loaded = registry.load_active()
    state = _state("u", [("i0", T0)])
    shop = _shop()
    gather = lambda s, now: ShopperView(s)  # noqa: E731
    args = (gather, _index(), IDENTITY_SCALE, FeatureRules(), 5)
    ok, none = try_ranker(loaded, None, state, shop, *args)
    assert ok is not None and none is None
    seen: list[str] = []
    for exc, code in ((RankerFailed("nan"), "ranker_error"), (RankerMismatch("width"), "schema_mismatch"),
                      (ZeroDivisionError("boom"), "ranker_error")):
        broken = type(loaded)(loaded.manifest, _Raises(exc))  # type: ignore[arg-type]
        answer, fallback = try_ranker(broken, None, state, shop, *args, on_error=lambda c, e: seen.append(c))
        assert answer is None and fallback == code
    assert seen == ["ranker_error", "schema_mismatch", "ranker_error"]

    def down(s: UserState, now: float) -> ShopperView:
        from serving.shopper_data import RedisUnavailable

        raise RedisUnavailable("redis unavailable (test)")

    assert try_ranker(loaded, None, state, shop, down, *args[1:]) == (None, "redis")
    assert try_ranker(None, None, state, shop, *args) == (None, "no_ranker")
    assert try_ranker(None, "rejected", state, shop, *args) == (None, "ranker_refused")
    assert try_ranker(loaded, None, UserState("v"), shop, *args) == (None, "no_baskets")
    assert try_ranker(loaded, None, state, None, *args) == (None, "no_shop_view")


def test_gather_reads_rows_and_neighbours_in_one_call_and_keeps_known_neighbours() -> None:
    state = _state("u", [("i0", T0), ("i1", T0)])
    other = _state("w", [("i0", T0), ("i2", T0)])
    calls: list[tuple[list[str], list[str]]] = []

    def read(rows, ids, now):  # type: ignore[no-untyped-def]
        calls.append((list(rows), list(ids)))
        return {"i0": {"i2": 1.0, "i0": 2.0}}, {"w": other}

    found = lambda vec, k, exclude: [("w", 0.9), ("gone", 0.5)]  # noqa: E731
    view = gather_shopper(state, T0, FeatureRules(), CollabRules(), 50, found, read)
    assert len(calls) == 1 and set(calls[0][0]) == {"i0", "i1"} and calls[0][1] == ["w", "gone"]
    assert [(s, n.user_id) for s, n in view.neighbours] == [(0.9, "w")] and "i0" in view.copurchase


def test_top_breaks_ties_by_id_and_keeps_every_tie_at_the_cut() -> None:
    items = [f"x{n:02d}" for n in range(40)]
    scores = np.zeros(40)
    scores[[5, 7]] = 2.0
    assert [i for i, _ in top(items, scores, 4)] == ["x05", "x07", "x00", "x01"]
    assert COLUMN["log_pop"] == FEATURE_NAMES.index("log_pop")


def test_decode_cache_hits_only_on_identical_bytes_and_stays_bounded() -> None:
    from serving.collab_data import DecodeCache

    cache = DecodeCache(max_entries=10)
    decoded: list[bytes] = []

    def decode(raw: bytes) -> str:
        decoded.append(raw)
        return raw.decode()

    assert cache.get("u", b"a", decode) == "a" and cache.get("u", b"a", decode) == "a"
    assert cache.get("u", b"b", decode) == "b"  # the stored state changed: decoded again
    assert decoded == [b"a", b"b"] and (cache.hits, cache.misses) == (1, 2)
    for n in range(50):
        cache.get(n, b"x", decode)
    assert len(cache._data) <= 10
