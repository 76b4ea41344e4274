"""Helpers shared by the benchmarks: a private stack on free ports, and the real data."""

from __future__ import annotations

import contextlib
import itertools
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from freshrec.children import Guard
from freshrec.dataset import DatasetError, locate, read_events
from freshrec.infra import Stack, free_port, start_stack, stop_stack
from freshrec.settings import Settings

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "online_retail_ii"
REPORT_FROM = "2011-06-01"  # the pre-registered report window starts here (docs/eval_online_retail_ii.md)


def refuse_report_window(until: str, doing: str) -> None:
    """Exit when a benchmark that chooses settings would read the report window (``--until`` past it)."""
    from evaluation.data import parse_date

    if parse_date(until) > parse_date(REPORT_FROM):
        raise SystemExit(f"--until after {REPORT_FROM} reaches the report window: {doing} on the validation window only")


@contextlib.contextmanager
def private_stack(partitions: int = 4) -> Iterator[Settings]:
    """A broker and Redis of the benchmark's own on free ports (never the user's stack)."""
    with tempfile.TemporaryDirectory(prefix="freshrec-bench-") as tmp:
        settings = Settings(
            kafka_bootstrap=f"127.0.0.1:{free_port()}",
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
            state_dir=Path(tmp),
            topic_prefix="bench.",
            redis_prefix="bench:",
            partitions=partitions,
        )
        guard = start_guarded_stack(settings)
        try:
            yield settings
        finally:
            stop_stack(settings.state_dir)
            guard.close()


def start_guarded_stack(settings: Settings) -> Guard:
    """:func:`freshrec.infra.start_stack` (never reusing a Redis), plus a :class:`Guard`
    that stops that broker and Redis if the benchmark is killed before its ``finally``.

    The launcher starts them in their own session so that ``freshrec up`` can exit and
    leave them running; a benchmark's must not outlive it. Call ``guard.close()`` after
    ``stop_stack``.
    """
    guard = Guard()
    try:
        stack: Stack = start_stack(settings, reuse_redis=False)
    except BaseException:
        guard.close()
        raise
    guard.watch(stack.kafka.pid)
    guard.watch(stack.redis.pid)
    return guard


def load_events(data_dir: Path, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` events of the dataset, or exit with a clear message if absent."""
    try:
        files = locate(data_dir)
    except DatasetError as exc:
        sys.exit(f"benchmark data missing: {exc}\n(pass --data DIR with events.csv[.gz] in the format of ../shared/data)")
    return list(itertools.islice(read_events(files.events, files.name), limit))
