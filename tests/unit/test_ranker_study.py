"""The ranker study's own arithmetic: its Recall@10 and its coordinate ascent (bench/ranker_study.py)."""

from __future__ import annotations

import numpy as np

from bench.ranker_study import Basket, fit_linear, recall


def basket(features: list[list[float]], bought: list[bool], denominator: int) -> Basket:
    f = np.asarray(features, dtype=np.float32)
    return Basket(0.0, f, np.asarray(bought), denominator, f[:, 0].copy())


def test_recall_counts_hits_in_the_top_ten_over_the_protocol_denominator() -> None:
    # 12 candidates scored 11..0 by column 0; bought: the best, and the 11th (outside the top 10).
    feats = [[float(11 - k), 0.0] for k in range(12)]
    bought = [k in (0, 10) for k in range(12)]
    b = basket(feats, bought, denominator=3)  # a 3-item basket, one item never seen
    assert recall([b], None) == 1 / 3
    assert recall([b], lambda x: -x[:, 0]) == 1 / 3  # the 11th is now in the top ten, the best is not
    small = basket([[1.0, 0.0], [0.0, 0.0]], [True, True], denominator=2)
    assert recall([b, small], None) == (1 / 3 + 1.0) / 2


def test_coordinate_ascent_moves_weight_to_the_informative_feature() -> None:
    rng = np.random.default_rng(0)
    train = []
    for _ in range(40):
        signal = rng.normal(size=30)
        noise = rng.normal(size=30)
        bought = signal > np.sort(signal)[-4]  # the top 3 by signal are bought
        f = np.stack([noise, signal], axis=1)
        train.append(Basket(0.0, f.astype(np.float32), bought, 3, noise))
    start = np.array([1.0, 0.0])
    before = recall(train, lambda x: x[:, [0, 1]] @ start)
    w = fit_linear(train, [0, 1], start, (0.5, 0.2))
    after = recall(train, lambda x: x[:, [0, 1]] @ w)
    assert after > before and after > 0.9
    assert w[1] > abs(w[0])
