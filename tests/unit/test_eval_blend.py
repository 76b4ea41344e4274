"""The evaluation's vectorised blends are serving's blends, number for number."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.blend import candidate_pool, dense_blend, log_blend
from ranking.scoring import BlendWeights, LogBlendWeights, blend, new_arrivals
from ranking.scoring import log_blend as serving_log_blend


def test_dense_blend_equals_serving_blend() -> None:
    rng = np.random.default_rng(0)
    n = 50
    repeat = np.where(rng.random(n) < 0.3, rng.random(n) * 3, 0.0)
    sim = rng.uniform(-0.5, 1.0, n)
    pop = rng.random(n)
    pop /= pop.max()
    w = BlendWeights(repeat=1.0, similarity=0.4, popularity=0.25)
    ids = [f"i{k}" for k in range(n)]
    expected = blend(
        {ids[k]: float(repeat[k]) for k in range(n) if repeat[k] > 0},
        {ids[k]: float(sim[k]) for k in range(n)},
        {ids[k]: float(pop[k]) for k in range(n)},
        w,
        candidates=ids,
    )
    got = dense_blend(repeat, sim, pop, w)
    assert got == pytest.approx(np.array([expected[i] for i in ids]))


def test_candidate_pool_is_repeats_history_nearest_popular() -> None:
    repeat = np.array([0, 2.0, 0, 0, 0, 0])
    sim = np.array([0.9, 0, 0.8, 0, 0, 0.1])
    pop = np.array([0, 0, 0, 1.0, 0.5, 0])
    pool = candidate_pool(repeat, sim, pop, [5], candidates=1)
    assert pool.tolist() == [True, True, False, True, False, True]
    s = dense_blend(repeat, sim, pop, BlendWeights(), pool)
    assert np.isneginf(s[2]) and np.isneginf(s[4])


def test_dense_log_blend_equals_serving_log_blend() -> None:
    rng = np.random.default_rng(1)
    n = 60
    repeat = np.where(rng.random(n) < 0.3, rng.random(n) * 3, 0.0)
    sim = rng.uniform(-0.5, 1.0, n)
    pop = np.where(rng.random(n) < 0.8, rng.random(n), 0.0)
    pop /= pop.max()
    first_seen = rng.uniform(0, 100, n) * 86_400.0
    now, new_s = 100 * 86_400.0, 30 * 86_400.0
    is_new = ((now - first_seen) <= new_s).astype(np.float64)  # as evaluation.methods computes it
    ids = [f"i{k}" for k in range(n)]
    new_items = new_arrivals({ids[k]: float(first_seen[k]) for k in range(n)}, now, new_s)
    assert {ids[k] for k in np.flatnonzero(is_new)} == new_items and 0 < len(new_items) < n
    w = LogBlendWeights(repeat=1.0, similarity=2.0, popularity=0.8, new=0.5)
    expected = serving_log_blend(
        {ids[k]: float(repeat[k]) for k in range(n) if repeat[k] > 0},
        {ids[k]: float(sim[k]) for k in range(n)},
        {ids[k]: float(pop[k]) for k in range(n) if pop[k] > 0},
        new_items,
        w,
        candidates=ids,
    )
    got = log_blend(repeat, sim, pop, is_new, w)
    # One formula function under both: equal to the last bit, not just approximately.
    assert got.tolist() == [expected[i] for i in ids]
    pool = candidate_pool(repeat, sim, pop, [], 5, is_new)
    assert pool[np.flatnonzero(is_new)].all()  # new arrivals join the pool
    masked = log_blend(repeat, sim, pop, is_new, w, pool)
    assert np.isneginf(masked[~pool]).all() and np.array_equal(masked[pool], got[pool])
