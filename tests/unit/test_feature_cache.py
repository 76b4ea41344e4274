"""evaluation.feature_cache and shared collaborative replays: sharing work never changes a figure.

``freshrec eval`` shares one collaborative replay between the example streams of a run
and one feature cache between its runs and worker processes. Both are pure savings, so
each test compares a run that shares with one that does not, example for example.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evaluation.collab_replay import BasketFeatures, CollabReplay, VectorSpace
from evaluation.feature_cache import FeatureCache, settings_digest, space_digest
from evaluation.protocol import evaluate
from evaluation.ranker_method import build_ranker_methods, example_stream
from ranking.scoring import SimilarityScale

from .test_ranker_method import EVAL_FROM, frozen_method, settings, shop_log


def _examples(stream) -> list[tuple[str, float, list[str], bytes, bytes]]:  # type: ignore[no-untyped-def]
    return [(ex.user_id, ex.ts, ex.items, ex.features.tobytes(), ex.labels.tobytes()) for ex in stream.examples]


def _decisions(ranker) -> list[str]:  # type: ignore[no-untyped-def]
    return [d.split("fit")[0] for d in ranker.log.decisions]


def test_streams_sharing_one_replay_build_the_examples_of_streams_alone() -> None:
    """Two streams on one CollabReplay each label from the state *before* a group, whichever applies it."""
    log = shop_log()
    s = settings()
    frozen = frozen_method(log, s)
    alone = example_stream(log, s, frozen, EVAL_FROM)
    shared = CollabReplay(s)
    first = example_stream(log, s, frozen, EVAL_FROM, collab=shared)
    second = example_stream(log, s, frozen, EVAL_FROM, collab=shared)

    class Driver:
        name = "driver"

        def observe(self, log, start, stop):  # type: ignore[no-untyped-def]
            frozen.observe(log, start, stop)
            alone.observe(log, start, stop)
            second.observe(log, start, stop)  # the second listener applies the group: the first must still see "before"
            first.observe(log, start, stop)

        def advance(self, now: float) -> None:
            pass

        def scores(self, user: int, now: float) -> np.ndarray:
            return frozen.scores(user, now)

    evaluate(log, EVAL_FROM, [Driver()])
    assert alone.next_seq > 300
    assert _examples(first) == _examples(alone) == _examples(second)


def test_a_warm_cache_gives_the_figures_and_decisions_of_no_cache(tmp_path: Path) -> None:
    """A second run reads every example's features from the first run's cache and decides exactly alike."""

    def run(cache: FeatureCache | None):  # type: ignore[no-untyped-def]
        log = shop_log()
        s = settings()
        frozen = frozen_method(log, s)
        (ranker,) = build_ranker_methods(log, s, EVAL_FROM, frozen, [7], cache=cache)
        return evaluate(log, EVAL_FROM, [frozen, ranker])["ranker"], ranker

    plain, ranker_plain = run(None)
    cold_cache = FeatureCache(tmp_path / "f.sqlite", settings())
    cold, ranker_cold = run(cold_cache)
    assert cold_cache.hits == 0 and cold_cache.misses > 300
    warm_cache = FeatureCache(tmp_path / "f.sqlite", settings().model_copy(update={"seed": 8}))  # the seed is not in the key
    warm, ranker_warm = run(warm_cache)
    assert warm_cache.misses == 0 and warm_cache.hits == cold_cache.misses
    assert plain.as_dict() == cold.as_dict() == warm.as_dict()
    assert _decisions(ranker_plain) and _decisions(ranker_plain) == _decisions(ranker_cold) == _decisions(ranker_warm)
    assert _examples(ranker_plain.stream) == _examples(ranker_warm.stream)


def test_entries_are_keyed_by_space_and_feature_settings(tmp_path: Path) -> None:
    s = settings()
    rng = np.random.default_rng(3)
    m = rng.normal(size=(4, 3)).astype(np.float32)
    ids, index = ["a", "b", "c", "d"], {"a": 0, "b": 1, "c": 2, "d": 3}
    base = VectorSpace(m, ids, index)
    assert space_digest(base) == space_digest(VectorSpace(m.copy(), ids, index))
    other_scale = VectorSpace(m, ids, index, SimilarityScale(0.1, 2.0))
    other_vectors = VectorSpace(m + np.float32(1e-7), ids, index)
    assert len({space_digest(base), space_digest(other_scale), space_digest(other_vectors)}) == 3
    assert settings_digest(s) == settings_digest(s.model_copy(update={"seed": 99}))
    assert settings_digest(s) != settings_digest(s.model_copy(update={"ranker_ann_candidates": 6}))

    cache = FeatureCache(tmp_path / "f.sqlite", s)
    bf = BasketFeatures(["a", "c"], np.array([1, 5], dtype=np.uint8), rng.normal(size=(2, 17)).astype(np.float32))
    cache.put(space_digest(base), "u1", 12.5, bf)
    got = cache.get(space_digest(base), "u1", 12.5)
    assert got is not None and got.items == bf.items
    assert got.sources.dtype == np.uint8 and np.array_equal(got.sources, bf.sources)
    assert got.features.tobytes() == bf.features.tobytes()
    assert cache.get(space_digest(other_scale), "u1", 12.5) is None
    assert cache.get(space_digest(base), "u1", 12.500001) is None
    assert FeatureCache(tmp_path / "f.sqlite", s.model_copy(update={"ranker_ann_candidates": 6})).get(
        space_digest(base), "u1", 12.5) is None
    empty = BasketFeatures([], np.zeros(0, dtype=np.uint8), np.zeros((0, 17), dtype=np.float32))
    cache.put(space_digest(base), "u2", 1.0, empty)
    got = cache.get(space_digest(base), "u2", 1.0)
    assert got is not None and got.items == [] and got.features.shape == (0, 17)
    with pytest.raises(TypeError):
        cache.put(space_digest(base), "u3", 1.0, BasketFeatures(["a"], bf.sources[:1], np.zeros((1, 17))))
