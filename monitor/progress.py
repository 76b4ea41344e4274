"""How far behind a flow is, from offsets alone (no Kafka, no Redis: unit-tested).

A flow's *position* in a partition is the next offset it has to apply: one past the
offset Redis holds as applied, or the partition's first offset when Redis holds none.
Its lag is what lies between that and the end offset. Its *freshness* is the age of the
oldest message still waiting (the one at the position): a flow that keeps up shows 0, a
stalled one shows how long shoppers' actions have been missing from Redis, which a message
count cannot say when traffic is low.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PartitionProgress:
    partition: int
    position: int  # next offset the flow applies
    end: int  # the partition's end offset (next offset to be written)

    @property
    def lag(self) -> int:
        # Tansu under-reports end offsets (README, "Known broker quirk"): never below 0.
        return max(self.end - self.position, 0)


def partition_progress(
    begin: Mapping[int, int], end: Mapping[int, int], applied: Mapping[int, int]
) -> list[PartitionProgress]:
    """Per partition of ``end``: the position after ``applied`` (last applied offset per
    partition; missing: nothing applied yet, so the first offset still held) and the end."""
    return [
        PartitionProgress(p, applied[p] + 1 if p in applied else begin.get(p, 0), end[p]) for p in sorted(end)
    ]


@dataclass(frozen=True, slots=True)
class FlowProgress:
    position: int  # sum of positions: its rate is messages applied per second
    lag: int  # messages not yet applied, all partitions
    lag_seconds: float  # age of the oldest waiting message; 0 when caught up


def flow_progress(parts: list[PartitionProgress], oldest_waiting_ms: Mapping[int, int], now_s: float) -> FlowProgress:
    """Sum the partitions; ``oldest_waiting_ms`` holds, per lagging partition, the timestamp
    (ms) of the message at its position (a partition missing there counts no age)."""
    ages = [
        max(now_s - oldest_waiting_ms[p.partition] / 1000.0, 0.0)
        for p in parts
        if p.lag > 0 and p.partition in oldest_waiting_ms
    ]
    return FlowProgress(sum(p.position for p in parts), sum(p.lag for p in parts), max(ages, default=0.0))


def partition_of(field: str) -> int:
    """The partition of a ``<topic>:<partition>`` field (the stores' applied-offset hashes)."""
    return int(field.rsplit(":", 1)[1])
