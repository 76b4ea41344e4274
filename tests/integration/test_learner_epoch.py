"""A learner restarted on a recreated train-pairs topic stops with the reset message, and works after `freshrec reset`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from freshrec.epochs import EpochMismatch
from freshrec.producer import RecordProducer
from freshrec.reset import reset
from freshrec.settings import Settings
from learner.checkpoint import CheckpointStore

from .test_indexer_epoch import recreate_topic
from .test_learner_process import SMALL, _catalog, _pairs

pytestmark = pytest.mark.integration


def _send(settings: Settings, pairs: list) -> None:
    with RecordProducer(settings, client_id="test-pairs") as producer:
        for p in pairs:
            producer.send(settings.topics.train_pairs, p.user_id, p.to_bytes())
        assert producer.flush().failed == 0


def test_learner_on_a_recreated_topic_stops_and_resumes_after_reset(
    fresh_settings: Settings, sample_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from learner.cli import main as learn_main
    from learner.loop import Learner
    from stores.catalog_store import write_items
    from stores.redis_client import connect

    torch.set_num_threads(2)
    s = Settings(**{**fresh_settings.model_dump(), **SMALL, "learner_eval_every": 1000})
    items = _catalog(sample_dir)
    write_items(connect(s), s, items)
    catalog = lambda: {i.item_id: i for i in items}  # noqa: E731
    store = CheckpointStore(s.state_dir / "learner")

    _send(s, _pairs(items, 16))
    learner = Learner(s, catalog, device="cpu")
    try:
        learner.run(idle_exit_s=2)
    finally:
        learner.close()
    checkpoint = store.latest()
    assert checkpoint is not None and sum(store.read_state(checkpoint).offsets.values()) == 16
    assert store.epoch_path.is_file()

    recreate_topic(s, s.topics.train_pairs)
    _send(s, _pairs(items, 12, seed=1))  # offsets 0..: a learner trusting its checkpoint would skip them

    with pytest.raises(EpochMismatch, match="freshrec reset"):
        Learner(s, catalog, device="cpu")
    started = time.monotonic()
    assert learn_main(["--catalog-dir", str(sample_dir), "--quiet"], s) == 1
    assert time.monotonic() - started < 20, "the check must come before the model is loaded"
    err = capsys.readouterr().err
    assert "freshrec learn: stopped, nothing was skipped." in err and "freshrec reset" in err
    assert "Traceback" not in err

    removed = reset(s)
    assert s.state_dir / "learner" in removed.paths
    learner = Learner(s, catalog, device="cpu")
    try:
        assert learner.state.offsets == {} and learner.state.step == 0
        learner.run(idle_exit_s=2)
    finally:
        learner.close()
    state = store.read_state(store.latest())
    assert sum(state.offsets.values()) == 12, "every pair of the new topic was consumed"
