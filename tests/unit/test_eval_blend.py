"""The evaluation's vectorised blend is serving's blend, number for number."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.blend import candidate_pool, dense_blend
from serving.scoring import BlendWeights, blend


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
