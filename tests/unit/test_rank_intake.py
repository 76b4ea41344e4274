"""learner.rank_intake: the rank-examples codec, dedupe, hold-back, trimmed training window, checkpoint."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import orjson
import pytest

from freshrec.contracts import InvalidRecord
from learner.rank_intake import (
    RankCheckpointStore,
    RankerState,
    RankExample,
    RankIntake,
    decode_example,
    encode_example,
    trim,
)
from ranking.features import FEATURE_NAMES, FEATURE_SCHEMA


def example(i: int, n: int = 8, bought: tuple[int, ...] = (0,), user: str | None = None) -> RankExample:
    rng = np.random.default_rng(i)
    labels = np.zeros(n, dtype=np.float32)
    labels[list(bought)] = 1.0
    return RankExample(
        example_id=f"{user or 'u' + str(i % 5)}@{1_300_000_000 + i}",
        user_id=user or f"u{i % 5}",
        ts=1_300_000_000.0 + i,
        schema=FEATURE_SCHEMA,
        items=tuple(f"item{k}" for k in range(n)),
        sources=np.full(n, 2, dtype=np.uint8),
        features=rng.normal(size=(n, len(FEATURE_NAMES))).astype(np.float32),
        labels=labels,
        basket=("item0", "gone"),
        history=(("item3", "purchase", 1_299_000_000.0 + i), ("item4", "view", 1_298_000_000.0)),
    )


def test_codec_round_trip_keeps_every_field() -> None:
    ex = example(3)
    back = decode_example(encode_example(ex))
    assert (back.example_id, back.user_id, back.ts, back.schema) == (ex.example_id, ex.user_id, ex.ts, ex.schema)
    assert back.items == ex.items and back.basket == ex.basket and back.history == ex.history
    assert np.array_equal(back.features, ex.features) and np.array_equal(back.labels, ex.labels)
    assert back.features.flags.writeable, "the sim column is filled in place"
    assert back.basket_size == 2 and back.seq == -1
    assert decode_example(encode_example(ex, with_seq=True)).seq == -1  # the codec keeps what it was given
    state = back.state_before()
    assert state.history[0].item_id == "item3" and state.last_ts == 1_299_000_003.0


@pytest.mark.parametrize(
    "change, field",
    [
        ({"features_f32": base64.b64encode(b"\0" * 12).decode()}, "features_f32"),
        ({"features_f32": "not base64!"}, "features_f32"),
        ({"labels": [0, 2, 0, 0, 0, 0, 0, 0]}, "labels"),
        ({"labels": [0, 1]}, "labels"),
        ({"items": "item0"}, "items"),
        ({"ts": True}, "ts"),
        ({"history": [["item", "view"]]}, "history"),
        ({"example_id": None}, "example_id"),
    ],
)
def test_invalid_records_name_their_field(change: dict[str, object], field: str) -> None:
    obj = orjson.loads(encode_example(example(1)))
    obj.update(change)
    with pytest.raises(InvalidRecord) as err:
        decode_example(orjson.dumps(obj))
    assert err.value.field == field


def test_non_finite_features_are_invalid() -> None:
    ex = example(1)
    ex.features[2, 5] = np.nan
    with pytest.raises(InvalidRecord, match="non-finite"):
        decode_example(encode_example(ex))


def test_duplicates_are_dropped_and_counted() -> None:
    intake = RankIntake(gate_size=3, window_size=10, negatives=50, dedupe_capacity=100)
    assert intake.offer(example(1)) and intake.offer(example(2))
    assert not intake.offer(example(1)), "a re-emitted example must be dropped"
    assert intake.duplicates == 1 and intake.next_seq == 2
    assert [ex.example_id for ex in intake.held()] == [example(1).example_id, example(2).example_id]


def test_holds_back_the_newest_and_bounds_the_training_window() -> None:
    intake = RankIntake(gate_size=5, window_size=20, negatives=50, dedupe_capacity=1000)
    for i in range(100):
        intake.offer(example(i))
    held, training = intake.held(), intake.training()
    assert [ex.seq for ex in held] == list(range(95, 100)), "the gate judges the newest baskets"
    assert [ex.seq for ex in training] == list(range(75, 95)), "training is the window just before them"
    assert intake.sizes() == (5, 20) and intake.newest_ts == 1_300_000_099.0
    assert not {ex.example_id for ex in held} & {ex.example_id for ex in training}


def test_training_examples_are_trimmed_but_held_back_ones_are_whole() -> None:
    intake = RankIntake(gate_size=1, window_size=10, negatives=3, dedupe_capacity=100)
    intake.offer(example(1, n=40, bought=(5, 30)))
    intake.offer(example(2, n=40, bought=(7,)))
    (trained,), (held,) = intake.training(), intake.held()
    assert len(held) == 40
    assert len(trained) == 5 and trained.labels.sum() == 2, "every bought row and 3 others"
    assert "item5" in trained.items and "item30" in trained.items
    assert list(trained.items) == sorted(trained.items, key=lambda i: int(i[4:])), "row order kept"
    # seeded by the id: the same rows whatever the arrival order or process
    again = trim(example(1, n=40, bought=(5, 30)), 3)
    assert again.items == trained.items and np.array_equal(again.features, trained.features)


def test_dedupe_memory_is_bounded() -> None:
    intake = RankIntake(gate_size=1, window_size=1, negatives=5, dedupe_capacity=10)
    for i in range(50):
        intake.offer(example(i))
    assert len(intake.seen_ids()) == 10


def test_checkpoint_restores_windows_ids_and_state(tmp_path: Path) -> None:
    intake = RankIntake(gate_size=4, window_size=6, negatives=3, dedupe_capacity=100)
    for i in range(20):
        intake.offer(example(i, n=12, bought=(1,)))
    store = RankCheckpointStore(tmp_path / "ranker", keep=2)
    state = RankerState(topic="t.rank-examples", offsets={0: 7, 3: 13}, next_seq=intake.next_seq, seen_seq=16,
                        published=["v000001-aaaaaaaa"], last_figures={"candidate_recall@10": 0.5})
    for _ in range(3):
        store.write(state, intake.held(), intake.training(), intake.seen_ids())
    assert len(store.checkpoints()) == 2, "only the newest two are kept"
    ckpt = store.latest()
    assert ckpt is not None and ckpt.state == state
    assert [e.seq for e in ckpt.held] == [e.seq for e in intake.held()]
    assert [e.seq for e in ckpt.training] == [e.seq for e in intake.training()]
    assert all(np.array_equal(a.features, b.features) for a, b in zip(ckpt.training, intake.training(), strict=True))
    restored = RankIntake(4, 6, 3, 100, held=ckpt.held, training=ckpt.training, seen_ids=ckpt.seen_ids,
                          next_seq=ckpt.state.next_seq)
    assert not restored.offer(example(3, n=12, bought=(1,))), "an id seen before the restart is still a duplicate"
    assert restored.offer(example(20, n=12, bought=(1,))) and restored.held()[-1].seq == 20


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RankCheckpointStore(tmp_path / "ranker")
    state = RankerState(topic="t", offsets={0: 1})
    store.write(state, [], [], [])

    def boom(_: Path) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr("learner.rank_intake.fsync_dir_files", boom)
    with pytest.raises(OSError):
        store.write(RankerState(topic="t", offsets={0: 99}), [], [], [])
    latest = store.latest()
    assert latest is not None and latest.state.offsets == {0: 1}
    assert not [p for p in store.dir.iterdir() if p.name.startswith(".staging")]
