"""streams.paced_source: an idle partition is polled less and less often, a busy one at once."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from streams.paced_source import FIRST_PAUSE_S, IdlePacing, PacedPartition


def test_pauses_start_after_a_quiet_stretch_double_up_to_the_cap_and_reset_on_a_message() -> None:
    pacing = IdlePacing(0.05, idle_after_s=0.5)
    assert pacing.after(5, now=0.0) == 0.0
    # empty polls between bursts (under traffic): no pause
    assert [pacing.after(0, now=t) for t in (0.1, 0.2, 0.49)] == [0.0, 0.0, 0.0]
    pauses = [pacing.after(0, now=0.5 + 0.01 * k) for k in range(8)]
    assert pauses == [0.002, 0.004, 0.008, 0.016, 0.032, 0.05, 0.05, 0.05]
    assert pacing.after(3, now=1.0) == 0.0
    assert pacing.after(0, now=1.2) == 0.0  # quiet again, but not yet for idle_after_s
    assert pacing.after(0, now=1.6) == FIRST_PAUSE_S


def test_a_zero_cap_keeps_bytewaxs_own_pacing() -> None:
    pacing = IdlePacing(0.0)
    assert [pacing.after(0, now=float(t)) for t in range(3)] == [0.0, 0.0, 0.0]


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
    part.pacing.idle_after_s = 0.0  # idle from the first empty poll
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
