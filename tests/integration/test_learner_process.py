"""The learner against the real broker and Redis: it publishes, and it survives SIGKILL exactly.

Small numbers keep each test well under a minute on two shared cores: batches of 4
pairs, a window of 8, an evaluation every 2-3 batches, a catalog of 40 real items.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from freshrec.consumer import TopicFollower
from freshrec.contracts import KIND_WEIGHT, AdapterAnnouncement, CatalogItem, TrainPair
from freshrec.dataset import locate, read_items
from freshrec.producer import RecordProducer
from freshrec.settings import Settings
from learner.checkpoint import TRAINER_FILE, CheckpointStore
from models.registry import AdapterRegistry
from learner.trainer import pair_id_digest

pytestmark = pytest.mark.integration

SMALL = {
    "learner_batch_size": 4,
    "learner_flush_seconds": 1.0,
    "learner_eval_window": 8,
    "learner_min_eval_pairs": 4,
    "learner_publish_margin": 1.0,  # these tests check the plumbing, not that 20 pairs improve recall
    "learner_log_seconds": 2.0,
    "learner_mix_pool": 8,
    "learner_catalog_negatives": 8,
    "device": "cpu",
}


def _catalog(sample_dir: Path, n: int = 40) -> list[CatalogItem]:
    rows = read_items(locate(sample_dir).items)
    return [CatalogItem.model_validate(next(rows)) for _ in range(n)]


def _pairs(items: list[CatalogItem], n: int, seed: int = 0) -> list[TrainPair]:
    rng = random.Random(seed)
    kinds = ["view", "click", "cart", "purchase"]
    out = []
    for i in range(n):
        context = rng.sample(items, 3)
        target = rng.choice(items)
        out.append(
            TrainPair(
                pair_id=f"pair-{i}",
                user_id=f"u{i % 7}",
                context_items=[c.item_id for c in context],
                context_text=" ; ".join(c.title for c in context),
                target_item=target.item_id,
                # every third pair leaves the text for the learner to fill from the catalog
                target_text="" if i % 3 == 0 else target.text(),
                weight=KIND_WEIGHT[kinds[i % 4]],
                ts=1_300_000_000 + i,
            )
        )
    return out


def _setup(settings: Settings, sample_dir: Path, n_pairs: int) -> list[TrainPair]:
    from stores.catalog_store import write_items
    from stores.redis_client import connect

    items = _catalog(sample_dir)
    write_items(connect(settings), settings, items)
    pairs = _pairs(items, n_pairs)
    with RecordProducer(settings, client_id="test-pairs") as producer:
        for p in pairs:
            producer.send(settings.topics.train_pairs, p.user_id, p.to_bytes())
        report = producer.flush()
    assert report.confirmed == n_pairs and report.failed == 0
    return pairs


def _with(settings: Settings, **changes: object) -> Settings:
    return Settings(**{**settings.model_dump(), **changes})


def test_streamed_pairs_produce_a_published_adapter_and_announcement(fresh_settings: Settings, sample_dir: Path) -> None:
    import torch

    from learner.cli import _redis_catalog
    from learner.loop import Learner

    torch.set_num_threads(2)
    settings = _with(fresh_settings, learner_eval_every=2, **SMALL)
    _setup(settings, sample_dir, n_pairs=24)

    learner = Learner(settings, _redis_catalog(settings), device="cpu")
    deadline = time.monotonic() + 50
    try:
        summary = learner.run(stop=lambda: bool(learner.published) or time.monotonic() > deadline)
    finally:
        learner.close()
    assert summary.published, f"nothing published: {summary}"
    version = summary.published[0]

    registry = AdapterRegistry(settings.state_dir / "adapters")
    manifest, path = registry.load(version)  # verifies checksum and base model
    assert manifest.parent is None and manifest.pairs_seen >= 8
    assert {"recall@10", "ndcg@10", "active_recall@10", "eval_pairs"} <= set(manifest.metrics)
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]

    # Versions are keys, so announcements spread over partitions: look for each by key.
    got: dict[bytes, AdapterAnnouncement] = {}
    with TopicFollower(settings, settings.topics.adapters) as follower:
        end = time.monotonic() + 15
        while len(got) < len(summary.published) and time.monotonic() < end:
            for m in follower.poll(0.2):
                got[m.key] = AdapterAnnouncement.model_validate(orjson.loads(m.value))
    assert set(got) == {v.encode() for v in summary.published}, "a publication was not announced"
    announcement = got[version.encode()]
    assert announcement.version == version and Path(announcement.path) == path.resolve()
    assert announcement.metrics == manifest.metrics and announcement.parent is None


def _env(settings: Settings, **extra: object) -> dict[str, str]:
    env = dict(os.environ)
    values = {
        "kafka_bootstrap": settings.kafka_bootstrap,
        "redis_url": settings.redis_url,
        "redis_prefix": settings.redis_prefix,
        "topic_prefix": settings.topic_prefix,
        "state_dir": str(settings.state_dir),
        "partitions": settings.partitions,
        **SMALL,
        **extra,
    }
    env.update({f"FRESHREC_{k.upper()}": str(v) for k, v in values.items()})
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def test_learner_killed_and_restarted_continues_without_retraining_or_skipping(
    fresh_settings: Settings, sample_dir: Path, tmp_path: Path
) -> None:
    n_pairs = 44
    pairs = _setup(fresh_settings, sample_dir, n_pairs)
    env = _env(fresh_settings, learner_eval_every=3)
    store = CheckpointStore(fresh_settings.state_dir / "learner")
    cmd = [sys.executable, "-m", "freshrec", "learn"]

    first_log = tmp_path / "first.log"
    with open(first_log, "wb") as err:
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 45
        while len(store.trained_batches()) < 3 and time.monotonic() < deadline:
            assert first.poll() is None, first_log.read_text()[-3000:]
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    batches_at_kill = len(store.trained_batches())
    assert 3 <= batches_at_kill < (n_pairs - 8) // 4, "the kill must land mid-stream"
    assert store.latest() is not None

    second_log = tmp_path / "second.log"
    with open(second_log, "wb") as err:
        second = subprocess.run(cmd + ["--idle-exit", "3"], env=env, stdout=subprocess.PIPE, stderr=err, timeout=90)
    log_text = second_log.read_text()
    assert second.returncode == 0, log_text[-3000:]
    assert "resumed from ckpt-" in log_text

    trained = store.trained_ids()
    state = store.read_state(store.latest())
    window = [p.pair_id for p in state.window]
    all_ids = {p.pair_id for p in pairs}
    assert len(trained) == len(set(trained)), "a pair was trained twice"
    assert len(trained) == n_pairs - 8 and len(window) == 8 and not state.pending
    assert set(trained) | set(window) == all_ids and not set(trained) & set(window), "a pair was skipped"
    assert sum(state.offsets.values()) == n_pairs  # every message consumed exactly up to the end

    import torch

    saved = torch.load(store.latest() / TRAINER_FILE, map_location="cpu", weights_only=True)
    assert saved["pairs_trained"] == n_pairs - 8 == state.pairs_trained
    assert saved["trained_digest"] == pair_id_digest(trained)
    # the weights came from the checkpoint, not from scratch: the step count runs on
    assert saved["step"] == len(store.trained_batches()) == state.step
