"""The indexer process against the real broker: changed items in, item vectors out."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from freshrec.consumer import TopicFollower
from freshrec.contracts import AdapterAnnouncement, CatalogDelete, CatalogItem, DeadLetter, ItemVector
from freshrec.producer import RecordProducer
from freshrec.settings import Settings
from models.onnx_encoder import encoder_for
from indexer.process import IndexerProcess, checkpoint_path

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shared_exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One base-model export for the module; each test's state_dir links to it."""
    state = tmp_path_factory.mktemp("indexer-exports")
    encoder_for(Settings(state_dir=state), "base", None, "int8")
    return state / "exports"


def _link_exports(settings: Settings, exports: Path) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    (settings.state_dir / "exports").symlink_to(exports, target_is_directory=True)


def _send_changes(settings: Settings, records: Sequence[CatalogItem | CatalogDelete | bytes]) -> None:
    with RecordProducer(settings, client_id="test-changes") as producer:
        for rec in records:
            if isinstance(rec, bytes):
                producer.send(settings.topics.changed_items, b"bad", rec)
            else:
                producer.send(settings.topics.changed_items, rec.item_id, rec.to_bytes())
        assert producer.flush().failed == 0


def _read_vectors(follower: TopicFollower, n: int, timeout_s: float = 45.0) -> list[ItemVector]:
    """Exactly ``n`` records (counted, not judged by end offsets: see the Tansu quirk)."""
    out: list[ItemVector] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out.extend(ItemVector.from_bytes(m.value) for m in follower.poll(0.2))
    assert len(out) >= n, f"got {len(out)} item vectors, expected {n}"
    return out


class _Running:
    """An IndexerProcess on a thread, stopped (gracefully, with a checkpoint) on exit."""

    def __init__(self, proc: IndexerProcess) -> None:
        self.proc = proc
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.proc.run(stop=self.stop)
        except BaseException as exc:  # noqa: BLE001 - surfaced in __exit__
            self.error = exc

    def __enter__(self) -> IndexerProcess:
        self.thread.start()
        return self.proc

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "indexer did not stop"
        if self.error is not None:
            raise self.error


def test_changed_items_become_item_vectors_and_restart_resumes(fresh_settings: Settings, shared_exports: Path) -> None:
    s = fresh_settings
    _link_exports(s, shared_exports)
    first = [CatalogItem(item_id=f"i{n}", title=f"red heart lantern {n}", category="home") for n in range(20)]
    _send_changes(s, [*first, CatalogDelete(item_id="i3", ts=7.0), b'{"item_id": "x", "title": ""}'])

    vectors_topic = TopicFollower(s, s.topics.item_vectors, start="beginning", client_id="test-vectors")
    with _Running(IndexerProcess(s, follow_adapters=False)) as proc:
        got = _read_vectors(vectors_topic, 20)  # 19 upserts (i3's upsert is superseded) + 1 delete
        assert proc.encoder.version == "base"
    by_id = {v.item_id: v for v in got}
    assert len(got) == 20 and set(by_id) == {f"i{n}" for n in range(20)}
    assert by_id["i3"].vector is None and by_id["i3"].ts == 7.0
    assert {v.adapter_version for v in got} == {"base"}
    reference = encoder_for(s, "base", None, "int8").encode([first[5].text()])[0]
    assert by_id["i5"].vector.shape == (384,)
    assert float(by_id["i5"].vector @ reference) > 0.9999
    assert proc.stats.encoded == 19 and proc.stats.deleted == 1 and proc.stats.invalid == 1
    assert checkpoint_path(s).is_file()

    with TopicFollower(s, s.topics.dead_letter, start="beginning", client_id="test-dlq") as dlq:
        dead = [DeadLetter.from_bytes(m.value) for m in dlq.drain(idle_s=0.5, timeout_s=10)]
    assert [(d.stage, d.field) for d in dead] == [("indexer", "title")]

    # A restart resumes from the checkpoint: only the two new changes are encoded.
    _send_changes(s, [CatalogItem(item_id="i1", title="blue heart lantern"), CatalogItem(item_id="new", title="tea cup")])
    with _Running(IndexerProcess(s, follow_adapters=False)) as proc2:
        again = _read_vectors(vectors_topic, 2)
    assert sorted(v.item_id for v in again) == ["i1", "new"]
    assert proc2.stats.encoded == 2
    time.sleep(0.5)
    assert vectors_topic.poll(0.5) == []  # nothing re-published
    vectors_topic.close()


class _LabelEncoder:
    """Stands in for a per-version encoder in the adapter-switch test (no export needed)."""

    dim = 384

    def __init__(self, version: str) -> None:
        self.version = version

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        out[:, 0] = 1.0
        return out


def test_switches_to_an_announced_adapter_and_skips_a_broken_one(fresh_settings: Settings) -> None:
    s = fresh_settings

    def make(version: str) -> _LabelEncoder:
        if version == "v-broken":
            raise ValueError("checksum mismatch")
        return _LabelEncoder(version)

    vectors_topic = TopicFollower(s, s.topics.item_vectors, start="beginning", client_id="test-vectors")
    with _Running(IndexerProcess(s, version="base", make_encoder=make)) as proc:
        _send_changes(s, [CatalogItem(item_id="a", title="a")])
        assert [v.adapter_version for v in _read_vectors(vectors_topic, 1)] == ["base"]
        with RecordProducer(s, client_id="test-adapters") as producer:
            for version in ("v0001", "v-broken"):
                ann = AdapterAnnouncement(version=version, path=f"/nowhere/{version}", created=time.time())
                producer.send(s.topics.adapters, version, ann.to_bytes())
        deadline = time.monotonic() + 20
        while proc.stats.switches < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        _send_changes(s, [CatalogItem(item_id="b", title="b")])
        got = _read_vectors(vectors_topic, 1)
    # v-broken is the newest but does not load: the newest that does (v0001) is used
    assert proc.encoder.version == "v0001"
    assert [(v.item_id, v.adapter_version) for v in got] == [("b", "v0001")]
    vectors_topic.close()


def test_index_command_runs_and_checkpoints(fresh_settings: Settings, shared_exports: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from indexer.cli import main

    s = fresh_settings
    _link_exports(s, shared_exports)
    _send_changes(s, [CatalogItem(item_id="a", title="lantern")])
    assert main(["--max-seconds", "5", "--version", "base", "--no-follow-adapters"], s) == 0
    assert "1 encoded" in capsys.readouterr().out
    assert checkpoint_path(s).is_file()
