"""learner.rank_loop's decisions on a synthetic stream: when to update, what is published, what is held.

The synthetic baskets have 20 candidates; the bought one has the largest ``log_cooc``
(a column the blend ignores) while the blend's own columns are noise, so a ranker can
learn what the blend cannot: the first candidate must beat the blend on the held-back
baskets and be published. When the blend's columns point at the bought item too, both
put it in the top ten of every basket: a tie, which must be held.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from freshrec.settings import Settings
from learner.rank_intake import RankerState, RankExample, RankIntake
from learner.rank_loop import ItemVectors, RankerUpdater, SimFiller, announcement_value, blend_scores
from models.ranker_registry import RankerRegistry
from ranking.features import COLUMN, FEATURE_NAMES, FEATURE_SCHEMA, FeatureRules, similarity_column
from ranking.scoring import IDENTITY_SCALE, LogBlendWeights, log_blend_terms

N_CANDIDATES = 20


def synthetic_example(i: int, blend_knows: bool = False, seed: int = 0, signal: str = "log_cooc") -> RankExample:
    """One basket: item ``b`` bought; ``signal`` is highest for it (and the blend's columns too if ``blend_knows``)."""
    rng = np.random.default_rng([seed, i])
    x = rng.normal(size=(N_CANDIDATES, len(FEATURE_NAMES))).astype(np.float32)
    x[:, COLUMN["sim"]] = 0.0  # as the flow emits it
    x[:, COLUMN["new"]] = (rng.random(N_CANDIDATES) < 0.2).astype(np.float32)
    b = int(rng.integers(N_CANDIDATES))
    x[b, COLUMN[signal]] = x[:, COLUMN[signal]].max() + 1.0
    if blend_knows:
        x[b, COLUMN["log_repeat"]] = x[:, COLUMN["log_repeat"]].max() + 5.0
    labels = np.zeros(N_CANDIDATES, dtype=np.float32)
    labels[b] = 1.0
    items = tuple(f"i{(i * 7 + k) % 500}" for k in range(N_CANDIDATES))
    return RankExample(
        example_id=f"u{i % 50}@{1_300_000_000 + 60 * i}", user_id=f"u{i % 50}", ts=1_300_000_000.0 + 60 * i,
        schema=FEATURE_SCHEMA, items=items, sources=np.full(N_CANDIDATES, 2, dtype=np.uint8), features=x,
        labels=labels, basket=(items[b],), history=((items[(b + 1) % N_CANDIDATES], "purchase", 1_299_999_000.0 + 60 * i),),
    )


SMALL = dict(
    ranker_family="lgbm", ranker_trees=30, ranker_gate_baskets=60, ranker_window_baskets=300,
    ranker_min_gate_baskets=30, ranker_update_baskets=200, ranker_update_seconds=30.0, ranker_train_negatives=50,
    device="cpu",
)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(tmp_path: Path, **changes: object) -> tuple[RankerUpdater, RankIntake, RankerRegistry, Clock]:
    settings = Settings(state_dir=tmp_path, **{**SMALL, **changes})
    intake = RankIntake(settings.ranker_gate_baskets, settings.ranker_window_baskets, settings.ranker_train_negatives, 10_000)
    registry = RankerRegistry(tmp_path / "rankers")
    clock = Clock()
    updater = RankerUpdater(settings, intake, RankerState(topic="t"), registry, "cpu", clock)
    return updater, intake, registry, clock


def feed(intake: RankIntake, start: int, stop: int, **kw: Any) -> None:
    for i in range(start, stop):
        intake.offer(synthetic_example(i, **kw))


def test_due_needs_a_full_gate_then_n_baskets_or_t_seconds(tmp_path: Path) -> None:
    updater, intake, _, clock = make(tmp_path)
    feed(intake, 0, 60)
    assert not updater.due(), "nothing to train on yet: every basket is held back"
    feed(intake, 60, 199)
    assert not updater.due()
    feed(intake, 199, 200)
    assert updater.due(), "ranker_update_baskets new baskets"
    updater.update()
    assert not updater.due() and updater.new_baskets() == 0
    feed(intake, 200, 205)
    assert not updater.due()
    clock.t += 30.0
    assert updater.due(), "ranker_update_seconds with some new basket"
    updater.update()
    clock.t += 100.0
    assert not updater.due(), "time alone, with no new basket, is no reason"


def test_due_by_event_time(tmp_path: Path) -> None:
    updater, intake, _, _ = make(tmp_path, ranker_update_days=0.5, ranker_update_baskets=5000)
    feed(intake, 0, 200)
    updater.update()  # at basket 199's event time
    feed(intake, 200, 200 + 719)  # 60 s apart: just under half a day
    assert not updater.due()
    feed(intake, 919, 921)
    assert updater.due()


def test_a_learnable_pattern_is_published_against_the_blend_with_its_figures(tmp_path: Path) -> None:
    updater, intake, registry, _ = make(tmp_path)
    feed(intake, 0, 200)
    outcome = updater.update()
    assert outcome.published is not None, outcome.reason
    j = outcome.judgement
    assert j is not None and j.candidate["recall@10"] > j.active["recall@10"] + 0.2, "the blend's columns are noise"
    assert "blend" in outcome.reason and outcome.trained_baskets == 140 and outcome.rows == 140 * N_CANDIDATES
    version = outcome.published.version
    assert registry.active() == version
    m = registry.load(version).manifest
    assert m.parent is None and m.family == "lightgbm" and m.feature_schema == FEATURE_SCHEMA
    assert m.feature_names == FEATURE_NAMES and m.examples_seen == 140
    assert m.metrics["recall@10"] == pytest.approx(j.candidate["recall@10"]) and m.metrics["eval_baskets"] == 60
    assert updater.state.published == [version] and updater.state.active_trained_seq == 140
    value = announcement_value(outcome.published)
    assert b'"schema":"' + FEATURE_SCHEMA.encode() in value and b'"parent":null' in value

    # Nothing new trained since: held, whatever the figures.
    again = updater.update()
    assert again.published is None and again.reason.startswith("hold")


def test_a_tie_with_the_blend_is_held(tmp_path: Path) -> None:
    updater, intake, registry, _ = make(tmp_path)
    feed(intake, 0, 200, blend_knows=True)
    outcome = updater.update()
    assert outcome.judgement is not None
    assert outcome.judgement.candidate["recall@10"] == outcome.judgement.active["recall@10"] == 1.0
    assert outcome.published is None and "tie" in outcome.reason
    assert registry.active() is None and registry.versions() == []


def test_a_tie_with_the_active_ranker_is_held(tmp_path: Path) -> None:
    updater, intake, registry, _ = make(tmp_path)
    feed(intake, 0, 200)
    first = updater.update().published
    assert first is not None
    feed(intake, 200, 400)
    second = updater.update()
    # The active ranker already finds the bought item in every top ten: nothing left to win.
    assert second.judgement is not None and second.judgement.active["recall@10"] > 0.95
    assert second.published is None, second.reason
    assert first.version in second.reason, "judged against the active ranker, not the blend"
    assert registry.versions() == [first.version]


def test_continued_family_trains_only_what_the_active_version_has_not_seen(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    updater, intake, registry, _ = make(tmp_path, ranker_family="torch", ranker_mlp_hidden="16")
    feed(intake, 0, 200)
    first = updater.update()
    assert first.published is not None, first.reason
    feed(intake, 200, 250)
    second = updater.update()
    assert second.trained_baskets == 50, "only the baskets that left the held-back window since the active version"
    if second.published is not None:
        assert registry.load(second.published.version).manifest.parent == first.published.version


def test_blend_scores_are_the_log_blend_of_the_rows() -> None:
    rng = np.random.default_rng(1)
    repeat, pop, sim = rng.random(30), rng.random(30), rng.normal(size=30)
    new = (rng.random(30) < 0.3).astype(float)
    w = LogBlendWeights()
    x = np.zeros((30, len(FEATURE_NAMES)), dtype=np.float32)
    x[:, COLUMN["log_repeat"]] = np.log(repeat + w.repeat_floor)
    x[:, COLUMN["log_pop"]] = np.log(pop + w.popularity_floor)
    x[:, COLUMN["sim"]] = np.maximum(sim, 0)
    x[:, COLUMN["new"]] = new
    assert np.allclose(blend_scores(x, w), log_blend_terms(repeat, sim, pop, new, w), atol=1e-5)


def test_sim_is_filled_from_the_history_once_per_vectors_version() -> None:
    ex = synthetic_example(3)
    rng = np.random.default_rng(0)
    vecs = {item: v / np.linalg.norm(v) for item, v in ((i, rng.normal(size=8).astype(np.float32)) for i in ex.items)}
    filler = SimFiller(FeatureRules())
    assert filler.fill([ex], None) == 0 and not ex.features[:, COLUMN["sim"]].any(), "no vectors: sim as carried"
    assert filler.fill([ex], ItemVectors("v1", vecs, IDENTITY_SCALE)) == 1
    expected = np.maximum(similarity_column(ex.state_before(), ex.items, vecs, FeatureRules(), IDENTITY_SCALE), 0)
    assert np.allclose(ex.features[:, COLUMN["sim"]], expected, atol=1e-6) and expected.any()
    assert filler.fill([ex], ItemVectors("v1", vecs, IDENTITY_SCALE)) == 0, "already filled with v1"
    assert filler.fill([ex], ItemVectors("v2", vecs, IDENTITY_SCALE)) == 1, "a new adapter version refills"


def test_the_next_version_replaces_the_active_one_and_names_it_as_parent(tmp_path: Path) -> None:
    updater, intake, registry, _ = make(tmp_path)
    feed(intake, 0, 200)
    first = updater.update().published
    assert first is not None
    feed(intake, 200, 400, signal="log_knn")  # the shop changed: nearest shoppers now tell what is bought
    second = updater.update()
    assert second.published is not None, second.reason
    assert first.version in second.reason, "judged against the active ranker"
    manifest = registry.load(second.published.version).manifest
    assert manifest.parent == first.version and registry.active() == second.published.version
    assert registry.history() == [first.version, second.published.version]
