"""Replay a dataset into Kafka: the catalog first, then the events, paced as asked.

Pacing is computed against an absolute schedule (start time + offset), not by sleeping
a fixed gap after each send, so a slow send does not accumulate drift.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from freshrec.dataset import count_lines, locate, read_events, read_items
from freshrec.producer import DeliveryReport, RecordProducer
from freshrec.settings import Settings


@dataclass(frozen=True)
class Pace:
    """At most one of ``rate`` (events/s) and ``speedup`` (times real time)."""

    rate: float | None = None
    speedup: float | None = None

    def __post_init__(self) -> None:
        if self.rate is not None and self.speedup is not None:
            raise ValueError("give --rate or --speedup, not both")
        if (self.rate is not None and self.rate <= 0) or (self.speedup is not None and self.speedup <= 0):
            raise ValueError("--rate and --speedup must be positive")


def schedule(events: Iterable[dict[str, Any]], pace: Pace) -> Iterator[tuple[float, dict[str, Any]]]:
    """Pair each event with its send offset in seconds from the start (0.0 when unpaced)."""
    first_ts: float | None = None
    for i, event in enumerate(events):
        if pace.rate is not None:
            yield i / pace.rate, event
        elif pace.speedup is not None and isinstance(event.get("ts"), float):
            if first_ts is None:
                first_ts = event["ts"]
            yield (event["ts"] - first_ts) / pace.speedup, event
        else:
            yield 0.0, event


@dataclass
class ReplayReport:
    items: int
    events: int
    delivery: DeliveryReport
    seconds: float

    def summary(self) -> str:
        d = self.delivery
        return (
            f"replayed {self.items} catalog records and {self.events} events in {self.seconds:.1f} s: "
            f"sent {d.sent}, rejected {d.rejected} (to dead-letter), confirmed {d.confirmed}, failed {d.failed}"
        )


def replay(
    settings: Settings,
    dataset_dir: Path,
    pace: Pace = Pace(),
    limit: int | None = None,
    progress: bool = True,
    stamp_sent_at: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    include_catalog: bool = True,
) -> ReplayReport:
    """Send the catalog (unless ``include_catalog`` is False), then up to ``limit`` events.

    ``on_event`` sees each event dict right after it was handed to the producer (the
    demo's freshness probe uses it); an exception it raises stops the replay.
    """
    files = locate(dataset_dir)
    start = time.monotonic()
    with RecordProducer(settings, client_id="freshrec-replay") as producer:
        n_items = 0
        if files.items is not None and include_catalog:
            for item in read_items(files.items):
                producer.send_catalog(item)
                n_items += 1
            producer.flush()
        total = count_lines(files.events)
        if limit is not None:
            total = min(total, limit)
        events = itertools.islice(read_events(files.events, files.name), limit)
        bar = tqdm(total=total, unit="ev", desc="replay", disable=not progress, smoothing=0.1)
        t0 = time.monotonic()
        n_events = 0
        for offset, event in schedule(events, pace):
            delay = t0 + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            producer.send_event(event, stamp_sent_at=stamp_sent_at)
            if on_event is not None:
                on_event(event)
            n_events += 1
            if n_events % 512 == 0:
                bar.update(512)
        bar.update(n_events % 512)
        bar.close()
        report = producer.flush()
    return ReplayReport(n_items, n_events, report, time.monotonic() - start)
