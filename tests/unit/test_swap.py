"""Hot-swap logic (serving.swap, serving.pair, serving.vectors) on toy encoders and the real LiveIndex."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import numpy as np
import pytest

from freshrec.contracts import CatalogItem, ItemVector
from serving.pair import ActivePair
from serving.swap import ActivationRefused, PairBuilder
from serving.testing import CatalogTwin, HashEncoder, hash_tools
from serving.vectors import VectorApplier

TITLES = [
    "red ceramic mug", "blue ceramic mug", "white tea cup", "glass lantern", "tea light candle",
    "paper napkins", "cake stand", "vintage doormat", "heart wicker wreath", "jumbo bag red",
]


def _catalog() -> CatalogTwin:
    return CatalogTwin({f"i{n}": CatalogItem(item_id=f"i{n}", title=t) for n, t in enumerate(TITLES)})


def _builder(catalog: CatalogTwin, **kw) -> tuple[ActivePair, PairBuilder]:  # type: ignore[no-untyped-def]
    active = ActivePair()
    builder = PairBuilder(active, hash_tools(catalog, **kw))
    builder.start()
    return active, builder


def _live(builder: PairBuilder, version: str, reason: str = "admin") -> None:
    job = builder.activate(version, reason)
    assert job.done.wait(10), "build did not finish"
    assert job.state == "live", job.error


def test_build_and_swap_keeps_encoder_and_index_of_one_version() -> None:
    catalog = _catalog()
    active, builder = _builder(catalog)
    try:
        _live(builder, "base", "startup")
        first = active.pair
        assert first is not None and first.adapter_version == "base" and first.index.version == "base"
        assert len(first.index) == len(TITLES)
        _live(builder, "v2")
        pair = active.pair
        assert pair is not None and pair.adapter_version == pair.index.version == pair.encoder.version == "v2"
        assert pair.index_version != first.index_version
        assert builder.history == ["base", "v2"]
        assert set(builder.last_swap.stages) >= {"adapter", "encoder", "catalog", "index", "catch-up", "swap"}
    finally:
        builder.stop()


def test_old_pair_is_released_after_swap() -> None:
    catalog = _catalog()
    active, builder = _builder(catalog)
    try:
        _live(builder, "base", "startup")
        old_index = weakref.ref(active.pair.index)
        old_encoder = weakref.ref(active.pair.encoder)
        _live(builder, "v2")
        # no gc.collect(): reference counting alone must free it (serving never forces a collection)
        assert old_index() is None and old_encoder() is None
    finally:
        builder.stop()


def test_request_in_flight_keeps_its_pair() -> None:
    catalog = _catalog()
    active, builder = _builder(catalog)
    try:
        _live(builder, "base", "startup")
        held = active.pair  # a request that started before the swap
        _live(builder, "v2")
        gc.collect()
        q = held.encoder.encode(["red mug"])
        hits = held.index.search(q, 3)[0]
        assert held.adapter_version == "base" and hits and hits[0][0] == "i0"
    finally:
        builder.stop()


def test_corrupt_adapter_is_refused_and_active_keeps_serving() -> None:
    catalog = _catalog()
    active, builder = _builder(catalog, corrupt={"vbad"})
    try:
        _live(builder, "base", "startup")
        with pytest.raises(ActivationRefused, match="checksum"):
            builder.check("vbad")
        job = builder.activate("vbad")
        assert job.done.wait(10)
        assert job.state == "failed" and "checksum" in (job.error or "")
        assert active.pair.adapter_version == "base"
        assert builder.history == ["base"]
    finally:
        builder.stop()


def test_rollback_returns_previous_versions_exact_results() -> None:
    catalog = _catalog()
    active, builder = _builder(catalog)
    try:
        _live(builder, "v1", "startup")
        q = active.pair.encoder.encode(["ceramic cup"])
        before = active.pair.index.search(q, 5)[0]
        _live(builder, "v2")
        assert active.pair.index.search(active.pair.encoder.encode(["ceramic cup"]), 5)[0] != before
        job = builder.rollback()
        assert job.done.wait(10) and job.state == "live"
        assert active.pair.adapter_version == "v1"
        assert active.pair.index.search(active.pair.encoder.encode(["ceramic cup"]), 5)[0] == before
        assert builder.history == ["v1"]
        with pytest.raises(ActivationRefused, match="nothing to roll back"):
            builder.rollback()
    finally:
        builder.stop()


def test_activating_the_active_version_is_a_no_op() -> None:
    catalog = _catalog()
    active, builder = _builder(catalog)
    try:
        _live(builder, "base", "startup")
        pair = active.pair
        job = builder.activate("base")
        assert job.state == "live" and job.done.is_set() and active.pair is pair
    finally:
        builder.stop()


def test_changes_during_a_build_reach_the_new_pair() -> None:
    """An item changed and one deleted while v2 builds: the active pair applies them at
    once, and v2 goes live with them (re-encoded by v2's own encoder)."""
    catalog = _catalog()
    applier_box: list[VectorApplier] = []

    def mid_build(version: str) -> None:
        if version != "v2":
            return
        catalog.put(CatalogItem(item_id="i0", title="green velvet cushion"))
        catalog.delete("i3")
        base = HashEncoder("base")
        applier_box[0].apply(
            [
                ItemVector("i0", "base", base.encode(["green velvet cushion"])[0]),
                ItemVector("i3", "base", None),
            ]
        )

    active, builder = _builder(catalog, before_build=mid_build)
    applier = VectorApplier(active, builder, catalog.read)
    applier_box.append(applier)
    try:
        _live(builder, "base", "startup")
        _live(builder, "v2")
        pair = active.pair
        assert "i3" not in pair.index
        v2 = HashEncoder("v2")
        expected = v2.encode(["green velvet cushion"])[0]
        assert np.allclose(pair.index.reconstruct("i0"), expected, atol=1e-6)
    finally:
        builder.stop()


def test_applier_routes_by_version() -> None:
    catalog = _catalog()
    active, builder = _builder(catalog)
    seen: dict[str, str] = {}
    applier = VectorApplier(active, builder, catalog.read, lambda recs: seen.update({i: r.title for i, r in recs.items()}))
    try:
        _live(builder, "base", "startup")
        pair = active.pair
        enc = HashEncoder("base")
        # Active version: applied as given.
        catalog.put(CatalogItem(item_id="new1", title="striped deck chair"))
        applier.apply([ItemVector("new1", "base", enc.encode(["striped deck chair"])[0])])
        assert "new1" in pair.index and seen["new1"] == "striped deck chair"
        # Foreign version, unchanged text: nothing re-encoded.
        calls = pair.encoder.calls
        applier.apply([ItemVector("i1", "vOther", np.ones(32, np.float32))])
        assert pair.encoder.calls == calls and applier.unchanged == 1
        # Foreign version, changed text: re-encoded with the active encoder, never the foreign vector.
        catalog.put(CatalogItem(item_id="i1", title="blue enamel jug"))
        applier.apply([ItemVector("i1", "vOther", np.ones(32, np.float32))])
        assert np.allclose(pair.index.reconstruct("i1"), enc.encode(["blue enamel jug"])[0], atol=1e-6)
        # Foreign delete: gone from the catalog, so gone from the index.
        catalog.delete("i2")
        applier.apply([ItemVector("i2", "vOther", None)])
        assert "i2" not in pair.index
    finally:
        builder.stop()


def test_latest_request_supersedes_a_queued_one() -> None:
    catalog = _catalog()
    gate = threading.Event()

    def slow(version: str) -> None:
        if version == "v1":
            gate.wait(10)

    active, builder = _builder(catalog, before_build=slow)
    try:
        j1 = builder.activate("v1", "startup")
        time.sleep(0.1)
        j2 = builder.activate("v2")
        j3 = builder.activate("v3")
        assert j2.done.wait(1) and j2.state == "superseded"
        gate.set()
        assert j3.done.wait(10) and j3.state == "live" and j1.state == "live"
        assert active.pair.adapter_version == "v3"
    finally:
        gate.set()
        builder.stop()


def _answer_consistent(version: str, query: str, hits: list[tuple[str, float]], catalog: CatalogTwin) -> bool:
    """Recompute every returned score with the claimed version's encoder."""
    enc = HashEncoder(version)
    q = enc.encode([query])[0]
    items = catalog.all()
    return all(abs(float(enc.encode([items[i].text()])[0] @ q) - s) < 1e-4 for i, s in hits)


def test_consistency_check_catches_a_mixed_answer() -> None:
    """The check used below can fail: encoder of v1 against the index of v2 is caught."""
    catalog = _catalog()
    active, builder = _builder(catalog)
    try:
        _live(builder, "v1", "startup")
        enc_v1 = active.pair.encoder
        _live(builder, "v2")
        mixed = active.pair.index.search(enc_v1.encode(["ceramic mug"]), 3)[0]
        assert not _answer_consistent("v1", "ceramic mug", mixed, catalog)
        assert not _answer_consistent("v2", "ceramic mug", mixed, catalog)
    finally:
        builder.stop()


def test_readers_never_see_mixed_versions_across_swaps() -> None:
    catalog = _catalog()
    active, builder = _builder(catalog)
    stop = threading.Event()
    answers: list[tuple[str, list[tuple[str, float]]]] = []
    failures: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                pair = active.pair  # once per request
                hits = pair.index.search(pair.encoder.encode(["ceramic mug"]), 3)[0]
                answers.append((pair.adapter_version, hits))
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    try:
        _live(builder, "v0", "startup")
        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        for v in ("v0", "v1", "v2", "v3"):
            if v != "v0":
                _live(builder, v)
            deadline = time.monotonic() + 5
            while not any(a[0] == v for a in answers[-50:]) and time.monotonic() < deadline:
                time.sleep(0.005)
        stop.set()
        for t in threads:
            t.join(5)
        assert not failures
        versions = {v for v, _ in answers}
        assert versions == {"v0", "v1", "v2", "v3"}
        sample = answers[:: max(1, len(answers) // 200)]
        assert all(_answer_consistent(v, "ceramic mug", hits, catalog) for v, hits in sample)
    finally:
        stop.set()
        builder.stop()


def test_same_version_requested_twice_builds_once() -> None:
    catalog = _catalog()
    gate = threading.Event()
    builds: list[str] = []

    def slow(version: str) -> None:
        builds.append(version)
        if version == "v1":
            gate.wait(10)

    active, builder = _builder(catalog, before_build=slow)
    try:
        j1 = builder.activate("v1", "startup")
        time.sleep(0.1)
        assert builder.activate("v1", "announcement") is j1  # already building
        j2 = builder.activate("v2", "announcement")
        assert builder.activate("v2", "admin") is j2  # already queued
        gate.set()
        assert j2.done.wait(10) and j2.state == "live"
        assert builds == ["v1", "v2"]
    finally:
        gate.set()
        builder.stop()


def test_each_pair_gets_the_similarity_scale_of_its_own_vectors() -> None:
    from ranking.scoring import IDENTITY_SCALE, SimilarityScale

    seen: list[int] = []

    def fit(vectors: np.ndarray) -> SimilarityScale:
        seen.append(vectors.shape[0])
        return SimilarityScale(0.1, 2.0)

    catalog = _catalog()
    active = ActivePair()
    builder = PairBuilder(active, hash_tools(catalog), similarity=fit)
    builder.start()
    try:
        _live(builder, "base", "startup")
        assert active.pair is not None and active.pair.similarity == SimilarityScale(0.1, 2.0)
        assert seen == [len(TITLES)]  # fitted on every vector of the index just built
    finally:
        builder.stop()
    _, plain = _builder(_catalog())  # no fit given: cosines are used as they are
    try:
        _live(plain, "base", "startup")
        assert plain.active.pair.similarity == IDENTITY_SCALE
    finally:
        plain.stop()
