"""The ranker in the learner process against the real broker: examples in, a gated version out, resumed exactly.

rank-examples records (the contract's format, a learnable synthetic pattern from
tests/unit/test_rank_loop.py) go to the topic; the learner's ranker thread publishes a
version to the ranker registry (parent, schema, figures) and announces it on the rankers
topic. A restarted learner resumes from its checkpoint: it neither re-reads nor
re-trains those examples, and its next version names the first as parent.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from freshrec.consumer import TopicFollower
from freshrec.producer import RecordProducer
from freshrec.settings import Settings
from learner.rank_intake import RankExample, encode_example
from models.ranker_registry import RankerRegistry
from ranking.features import FEATURE_NAMES, FEATURE_SCHEMA
from tests.unit.test_rank_loop import synthetic_example

pytestmark = pytest.mark.integration

SMALL = {
    "ranker_family": "lgbm",
    "ranker_trees": 30,
    "ranker_gate_baskets": 60,
    "ranker_window_baskets": 300,
    "ranker_min_gate_baskets": 30,
    "ranker_update_baskets": 200,
    "ranker_update_seconds": 600.0,  # only the basket count triggers here
    "learner_log_seconds": 2.0,
    "device": "cpu",
}


def _with(settings: Settings, **changes: object) -> Settings:
    return Settings(**{**settings.model_dump(), **changes})


def _send(settings: Settings, examples: list[RankExample]) -> None:
    with RecordProducer(settings, client_id="test-rank-examples") as producer:
        for ex in examples:
            producer.send(settings.topics.rank_examples, ex.user_id, encode_example(ex))
        report = producer.flush()
    assert report.confirmed == len(examples) and report.failed == 0


def _run(settings: Settings, until_published: int | None, budget_s: float = 120.0):  # noqa: ANN202
    from learner.loop import Learner

    learner = Learner(settings, lambda: {}, device="cpu")
    assert learner.ranker is not None
    deadline = time.monotonic() + budget_s
    try:
        if until_published is None:
            learner.run(idle_exit_s=3.0, stop=lambda: time.monotonic() > deadline)
        else:
            learner.run(stop=lambda: len(learner.ranker.state.published) >= until_published or time.monotonic() > deadline)
    finally:
        learner.close()
    assert not learner.ranker.alive, "the ranker thread must be gone after close()"
    return learner.ranker.state


def _announcements(settings: Settings, want: int, timeout: float = 15.0) -> dict[str, dict]:
    got: dict[str, dict] = {}
    with TopicFollower(settings, settings.topics.rankers) as follower:
        end = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < end:
            for m in follower.poll(0.2):
                got[m.key.decode()] = orjson.loads(m.value)
    return got


def test_rank_examples_become_a_gated_announced_ranker_and_a_restart_resumes(fresh_settings: Settings, tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(2)
    settings = _with(fresh_settings, **SMALL)
    first_batch = [synthetic_example(i) for i in range(200)]
    _send(settings, first_batch + first_batch[-10:])  # ten re-emitted: dropped on example_id

    state = _run(settings, until_published=1)
    assert len(state.published) == 1, f"nothing published: {state.last_reason}"
    v1 = state.published[0]
    registry = RankerRegistry(settings.state_dir / "rankers")
    loaded = registry.load(v1)  # verifies the checksum and the model
    m = loaded.manifest
    assert m.parent is None and m.family == "lightgbm"
    assert m.feature_schema == FEATURE_SCHEMA and m.feature_names == FEATURE_NAMES
    assert {"recall@10", "ndcg@10", "active_recall@10", "eval_baskets", "gate_gain"} <= set(m.metrics)
    assert m.metrics["recall@10"] > m.metrics["active_recall@10"], "published only because it beats the blend"
    assert registry.active() == v1
    ann = _announcements(settings, 1)
    assert ann[v1]["schema"] == FEATURE_SCHEMA and ann[v1]["parent"] is None and ann[v1]["metrics"] == m.metrics

    # Restart with nothing new: the rest of the topic is read once, nothing is trained again.
    state = _run(settings, until_published=None)
    assert state.consumed == 210 and state.duplicates == 10, "every record read exactly once across the restart"
    assert state.updates == 1 and state.published == [v1], "a restart must not re-train on the same examples"
    assert sum(state.offsets.values()) == 210
    assert registry.versions() == [v1]

    # The shop changes; the next version replaces the active one and names it as parent.
    _send(settings, [synthetic_example(i, signal="log_knn") for i in range(200, 400)])
    state = _run(settings, until_published=2)
    assert len(state.published) == 2, state.last_reason
    v2 = state.published[1]
    assert registry.load(v2).manifest.parent == v1 and registry.active() == v2
    ann = _announcements(settings, 2)
    assert ann[v2]["parent"] == v1
    assert state.consumed == 410 and state.updates == 2
