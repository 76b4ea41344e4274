"""Dedupe, the held-out window and the micro-batcher: pure, with a fake clock."""

from __future__ import annotations

import pytest

from freshrec.contracts import TrainPair
from learner.intake import HoldoutWindow, Intake, MicroBatcher, RecentIds


def _pair(i: int | str) -> TrainPair:
    return TrainPair(pair_id=f"p{i}", user_id="u", context_text="ctx", target_item=f"i{i}", target_text="t")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_batcher_flushes_at_size() -> None:
    b = MicroBatcher(3, 5.0, FakeClock())
    for i in range(2):
        b.add(_pair(i))
    assert not b.due()
    b.add(_pair(2))
    assert b.due() and [p.pair_id for p in b.take()] == ["p0", "p1", "p2"]
    assert not b.due() and len(b) == 0


def test_batcher_flushes_partial_batch_after_flush_seconds() -> None:
    clock = FakeClock()
    b = MicroBatcher(10, 5.0, clock)
    assert not b.due()  # empty never flushes
    b.add(_pair(0))
    clock.now += 4.9
    b.add(_pair(1))
    assert not b.due()
    clock.now += 0.1  # 5 s after the *first* pair
    assert b.due() and len(b.take()) == 2


def test_batcher_take_leaves_the_rest_in_order() -> None:
    b = MicroBatcher(2, 5.0, FakeClock())
    for i in range(5):
        b.add(_pair(i))
    assert [p.pair_id for p in b.take()] == ["p0", "p1"]
    assert [p.pair_id for p in b.pending()] == ["p2", "p3", "p4"]


def test_batcher_timer_follows_the_oldest_waiting_pair() -> None:
    clock = FakeClock()
    b = MicroBatcher(4, 5.0, clock, pool=8)
    for i in range(6):
        b.add(_pair(i))  # p0..p5 arrive at 100..105
        clock.now += 1.0
    clock.now = 104.9
    assert not b.due()
    clock.now = 105.0
    assert b.due()
    assert [p.pair_id for p in b.take()] == ["p0", "p1", "p2", "p3"]
    assert not b.due()  # p4 arrived at 104
    clock.now = 109.0
    assert b.due() and [p.pair_id for p in b.take()] == ["p4", "p5"]


def test_mixing_pool_drains_as_interleaved_batches() -> None:
    b = MicroBatcher(4, 5.0, FakeClock(), pool=16)
    for i in range(15):
        b.add(_pair(i))
        assert not b.due()
    b.add(_pair(15))
    batches = []
    while b.due():
        batches.append([int(p.pair_id[1:]) for p in b.take()])
    assert batches[0] == [0, 4, 8, 12]
    assert len(batches) == 4 and sorted(sum(batches, [])) == list(range(16))
    assert all(max(batch) - min(batch) >= 8 for batch in batches[:3])  # each spans the pool
    assert len(b) == 0


def test_mixing_pool_starves_no_pair() -> None:
    for size, pool in ((4, 16), (32, 256), (5, 17)):
        b = MicroBatcher(size, 1e9, FakeClock(), pool=pool)
        taken_at: dict[int, int] = {}
        n = pool * 12
        for i in range(n):
            b.add(_pair(i))
            while b.due():
                for p in b.take():
                    assert int(p.pair_id[1:]) not in taken_at
                    taken_at[int(p.pair_id[1:])] = i
        assert len(taken_at) + len(b) == n
        assert max(taken_at[i] - i for i in taken_at) < pool


def test_batcher_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(0, 1.0)
    with pytest.raises(ValueError):
        MicroBatcher(2, 0.0)
    with pytest.raises(ValueError, match="at least one batch"):
        MicroBatcher(8, 1.0, pool=4)


def test_recent_ids_forget_the_oldest() -> None:
    ids = RecentIds(2)
    assert ids.add("a") and ids.add("b") and not ids.add("a")
    assert ids.add("c")  # forgets "a"
    assert "a" not in ids and "b" in ids and ids.add("a")


def test_window_keeps_newest_and_releases_oldest() -> None:
    w = HoldoutWindow(2)
    assert w.push(_pair(0)) is None and w.push(_pair(1)) is None
    assert w.push(_pair(2)).pair_id == "p0"
    assert [p.pair_id for p in w.pairs()] == ["p1", "p2"]


def test_intake_trains_each_pair_once_after_it_leaves_the_window() -> None:
    clock = FakeClock()
    intake = Intake(batch_size=3, flush_seconds=5.0, window_size=4, clock=clock)
    trained: list[str] = []
    for i in range(9):
        assert intake.offer(_pair(i))
        assert not intake.offer(_pair(i))  # redelivered duplicate
        while intake.batch_due():
            trained += [p.pair_id for p in intake.take_batch()]
    assert trained == ["p0", "p1", "p2"]
    assert [p.pair_id for p in intake.pending_pairs()] == ["p3", "p4"]
    assert [p.pair_id for p in intake.window_pairs()] == ["p5", "p6", "p7", "p8"]
    assert intake.duplicates == 9
    clock.now += 5.0  # the partial batch flushes on time
    assert intake.batch_due()
    trained += [p.pair_id for p in intake.take_batch()]
    assert trained == [f"p{i}" for i in range(5)]
    # the window never trains while nothing newer arrives
    assert not intake.batch_due()


def test_intake_restored_from_checkpoint_parts_still_dedupes() -> None:
    intake = Intake(2, 5.0, 2, clock=FakeClock(), window=[_pair(5), _pair(6)], pending=[_pair(4)], seen_ids=["p1"])
    assert not intake.offer(_pair(1)) and not intake.offer(_pair(4)) and not intake.offer(_pair(6))
    assert intake.offer(_pair(7))
    assert [p.pair_id for p in intake.take_batch()] == ["p4", "p5"]
