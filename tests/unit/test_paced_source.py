"""streams.paced_source: an idle partition is polled less and less often, a busy one at once."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from streams.paced_source import FIRST_PAUSE_S, IdlePacing, PacedPartition


def test_pauses_double_while_empty_up_to_the_cap_and_reset_on_a_message() -> None:
    pacing = IdlePacing(0.05)
    pauses = [pacing.after(0) for _ in range(8)]
    assert pauses == [0.002, 0.004, 0.008, 0.016, 0.032, 0.05, 0.05, 0.05]
    assert pacing.after(3) == 0.0
    assert pacing.after(0) == FIRST_PAUSE_S


def test_a_zero_cap_keeps_bytewaxs_own_pacing() -> None:
    pacing = IdlePacing(0.0)
    assert [pacing.after(0) for _ in range(3)] == [0.0, 0.0, 0.0]


class Inner:
    def __init__(self, batches: list[list[Any]]) -> None:
        self.batches = batches
        self.closed = False

    def next_batch(self) -> list[Any]:
        return self.batches.pop(0)

    def next_awake(self) -> None:
        return None

    def snapshot(self) -> int:
        return 41

    def close(self) -> None:
        self.closed = True


def test_the_partition_passes_messages_snapshots_and_close_through_and_sets_next_awake() -> None:
    inner = Inner([[], [], ["m1", "m2"], []])
    part = PacedPartition(inner, 0.05)  # type: ignore[arg-type]
    assert part.next_awake() is None
    before = datetime.now(timezone.utc)
    assert part.next_batch() == []
    first = part.next_awake()
    assert first is not None and first > before
    assert part.next_batch() == []
    second = part.next_awake()
    assert second is not None and second > first and part.pacing.pause_s == 2 * FIRST_PAUSE_S
    assert part.next_batch() == ["m1", "m2"] and part.next_awake() is None
    assert part.next_batch() == [] and part.next_awake() is not None
    assert part.snapshot() == 41
    part.close()
    assert inner.closed
