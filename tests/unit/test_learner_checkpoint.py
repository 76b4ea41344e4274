"""Checkpoint directories and the training log: atomic commits and log reconciliation."""

from __future__ import annotations

from pathlib import Path

from freshrec.contracts import TrainPair
from learner.checkpoint import STATE_FILE, TRAINER_FILE, CheckpointStore, LearnerState


class FakeTrainer:
    def __init__(self, payload: bytes = b"weights") -> None:
        self.payload = payload

    def save_state(self, path: Path) -> None:
        Path(path).write_bytes(self.payload)


def _pair(i: int) -> TrainPair:
    return TrainPair(pair_id=f"p{i}", user_id="u", context_text="c", target_item="i", target_text="t", weight=0.5)


def test_state_round_trips_through_json() -> None:
    state = LearnerState(topic="t.train-pairs", offsets={0: 5, 3: 7}, window=[_pair(1)], pending=[_pair(2)], step=4,
                         pairs_trained=12, active_version="v000001-00aa11bb")
    back = LearnerState.from_json(state.to_json())
    assert back == state and back.offsets == {0: 5, 3: 7}


def test_write_commits_whole_directories_and_keeps_the_newest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    assert store.latest() is None
    for step in range(1, 4):
        store.write(FakeTrainer(f"w{step}".encode()), LearnerState(topic="t", step=step))
    names = [p.name for p in store.checkpoints()]
    assert len(names) == 2 and names == sorted(names)
    latest = store.latest()
    assert sorted(p.name for p in latest.iterdir()) == [STATE_FILE, TRAINER_FILE]
    assert (latest / TRAINER_FILE).read_bytes() == b"w3" and store.read_state(latest).step == 3
    assert not [p for p in store.dir.iterdir() if p.name.startswith(".")]


def test_stale_staging_directory_is_never_a_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.write(FakeTrainer(), LearnerState(topic="t", step=1))
    (store.dir / ".staging-killed").mkdir()  # what a SIGKILL mid-write leaves
    assert store.read_state(store.latest()).step == 1
    store.write(FakeTrainer(), LearnerState(topic="t", step=2))
    assert not (store.dir / ".staging-killed").exists()


def test_log_is_truncated_to_the_checkpointed_step(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for step in range(1, 5):
        store.append_trained(step, [f"s{step}a", f"s{step}b"])
    with open(store.log_path, "a") as fh:
        fh.write('{"step": 5, "pair_ids": ["s5')  # torn by a kill mid-append
    assert [s for s, _ in store.trained_batches()] == [1, 2, 3, 4]
    assert store.truncate_log(3) == 1
    assert store.trained_ids() == ["s1a", "s1b", "s2a", "s2b", "s3a", "s3b"]
    assert store.log_path.read_text().endswith("\n")
    assert store.truncate_log(3) == 0
