"""An indexer restarted on a recreated changed-items topic stops with the reset message, and works after `freshrec reset`."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from freshrec.consumer import TopicFollower
from freshrec.contracts import CatalogItem, ItemVector
from freshrec.epochs import EpochMismatch, topic_ids
from freshrec.producer import RecordProducer
from freshrec.reset import reset
from freshrec.settings import Settings
from indexer.process import IndexerProcess, checkpoint_path

pytestmark = pytest.mark.integration


class _FakeEncoder:
    """Encodes nothing real: these tests are about positions, not vectors."""

    dim = 384

    def __init__(self, version: str) -> None:
        self.version = version

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        out[:, 0] = 1.0
        return out


def recreate_topic(settings: Settings, topic: str) -> None:
    """Delete and create ``topic`` again (what a restarted embedded broker amounts to); wait for its new id."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    before = topic_ids(settings, [topic])[topic]
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="test-recreate")
    try:
        admin.delete_topics([topic])
        deadline = time.monotonic() + 10
        while topic_ids(settings, [topic])[topic] is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        admin.create_topics([NewTopic(topic, settings.partitions, 1)])
    finally:
        admin.close()
    after = topic_ids(settings, [topic])[topic]
    assert after is not None and after != before


def _send(settings: Settings, ids: list[str]) -> None:
    with RecordProducer(settings, client_id="test-changes") as producer:
        for item_id in ids:
            producer.send(settings.topics.changed_items, item_id, CatalogItem(item_id=item_id, title=item_id).to_bytes())
        assert producer.flush().failed == 0


def _run_until(settings: Settings, n: int, vectors: TopicFollower) -> list[str]:
    """Run an indexer on a thread until ``n`` item vectors arrived; stop it; return their item ids."""
    proc = IndexerProcess(settings, version="base", make_encoder=_FakeEncoder, follow_adapters=False)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            proc.run(stop=stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    got: list[str] = []
    deadline = time.monotonic() + 30
    while len(got) < n and time.monotonic() < deadline and not errors:
        got.extend(ItemVector.from_bytes(m.value).item_id for m in vectors.poll(0.2))
    stop.set()
    thread.join(30)
    if errors:
        raise errors[0]
    return got


def test_indexer_on_a_recreated_topic_stops_and_resumes_after_reset(
    fresh_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    s = fresh_settings
    vectors = TopicFollower(s, s.topics.item_vectors, start="beginning", client_id="test-vectors")
    try:
        _send(s, ["a", "b", "c"])
        assert sorted(_run_until(s, 3, vectors)) == ["a", "b", "c"]
        assert checkpoint_path(s).is_file() and checkpoint_path(s).with_name("epoch.json").is_file()

        recreate_topic(s, s.topics.changed_items)
        _send(s, ["d", "e"])  # offsets 0.. again: below the checkpoint's, so a trusting indexer would skip them

        proc = IndexerProcess(s, version="base", make_encoder=_FakeEncoder, follow_adapters=False)
        with pytest.raises(EpochMismatch, match="freshrec reset"):
            proc.run(max_seconds=5)

        # The command says it in one paragraph and exits 1, no traceback.
        import indexer.cli
        import indexer.process

        monkeypatch.setattr(indexer.process, "default_encoder_factory", lambda settings: _FakeEncoder)
        assert indexer.cli.main(["--version", "base", "--no-follow-adapters", "--max-seconds", "5"], s) == 1
        err = capsys.readouterr().err
        assert "freshrec index: stopped, nothing was skipped." in err and "freshrec reset" in err
        assert "Traceback" not in err

        reset(s)
        assert sorted(_run_until(s, 2, vectors)) == ["d", "e"]
    finally:
        vectors.close()
