"""The ranking-stage benches' shared protocol (bench/_fit_once.py) and bench.ranker_variants' arguments."""

from __future__ import annotations

import numpy as np
import pytest

from bench._fit_once import fit_and_recall, parse_models, recall, sampled_rows
from bench.ranker_variants import parse_variants


def test_recall_is_hits_in_the_top_ten_over_the_smaller_of_ten_and_the_basket() -> None:
    scores = np.arange(12, 0, -1, dtype=np.float64)  # candidate 0 first, 11 last
    labels = np.zeros(12, dtype=np.float32)
    labels[[0, 11]] = 1.0
    assert recall(scores, labels, 3) == pytest.approx(1 / 3)  # the 12th is outside the top ten
    assert recall(-scores, labels, 3) == pytest.approx(1 / 3)  # now the 1st is outside
    assert recall(scores, labels, 20) == pytest.approx(1 / 10)
    tied = np.zeros(12)  # ties keep candidate order (a stable sort)
    assert recall(tied, labels, 2) == pytest.approx(1 / 2)


def test_sampled_rows_keep_every_bought_item_and_at_most_k_others_in_order() -> None:
    labels = [np.array([0, 1, 0, 0, 0, 1, 0, 0], dtype=np.float32), np.array([1, 0], dtype=np.float32)]
    rows = sampled_rows(labels, negatives=3, seed=7)
    assert rows[0][:2].tolist() == [1, 5] and rows[0].size == 5  # bought first, then 3 of the 6 others
    others = rows[0][2:].tolist()
    assert others == sorted(others) and not {1, 5} & set(others) and len(set(others)) == 3
    assert rows[1].tolist() == [0, 1]  # fewer negatives than asked: all kept
    again = sampled_rows(labels, negatives=3, seed=7)
    assert [r.tolist() for r in again] == [r.tolist() for r in rows]  # the same draw for every variant


def test_fit_and_recall_learns_an_informative_column() -> None:
    rng = np.random.default_rng(0)
    xs, labels = [], []
    for _ in range(400):
        x = rng.normal(size=(20, 2)).astype(np.float32)
        lab = np.zeros(20, dtype=np.float32)
        lab[np.argsort(-x[:, 1])[:2]] = 1.0  # column 1 decides what is bought; column 0 is noise
        xs.append(x)
        labels.append(lab)
    rows = sampled_rows(labels[:300], negatives=10)
    got = fit_and_recall(xs[:300], labels[:300], rows, xs[300:], labels[300:], [2] * 100, seeds=[7],
                         params={"min_data_in_leaf": 20, "num_threads": 1}, trees=20)
    assert got[0] > 0.9  # chance is ~0.5 (two of 20 in the top ten)


def test_models_and_variants_parse_and_refuse_what_they_cannot_read() -> None:
    assert parse_models("stream:;big:num_leaves=31,learning_rate=0.1,trees=300") == {
        "stream": {}, "big": {"num_leaves": 31, "learning_rate": 0.1, "trees": 300}}
    assert parse_variants("base:;d:collab_shopper_dim=1024,collab_neighbours=100") == {
        "base": {}, "d": {"collab_shopper_dim": "1024", "collab_neighbours": "100"}}
    for bad in ("m:num_leaves", ""):
        with pytest.raises(SystemExit):
            parse_models(bad)
    with pytest.raises(SystemExit):
        parse_variants("d:collab_shopper_dim")


def test_ranker_columns_maps_every_stream_column_to_one_study_column() -> None:
    """bench.ranker_columns swaps the study's columns in by name: every stream feature must be in
    exactly one group and have a study column of its (mapped) name, or the swap is wrong."""
    from bench.ranker_columns import GROUPS, STUDY_NAME
    from bench.ranker_study import ALL
    from ranking.features import FEATURE_NAMES

    grouped = [n for names in GROUPS.values() for n in names]
    assert sorted(grouped) == sorted(FEATURE_NAMES) and len(set(grouped)) == len(grouped)
    assert all(STUDY_NAME.get(n, n) in ALL for n in FEATURE_NAMES)


def test_rank_agreement_is_spearman_and_nan_for_a_constant_column() -> None:
    from bench.ranker_columns import rank_agreement

    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert rank_agreement(a, np.exp(a)) == pytest.approx(1.0)  # monotone: same order
    assert rank_agreement(a, -a) == pytest.approx(-1.0)
    assert np.isnan(rank_agreement(a, np.ones(4)))
