"""Helpers shared by the stream benchmarks: a private stack, the real data, tables, JSON."""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from freshrec.dataset import DatasetError, locate, read_events
from freshrec.infra import free_port, start_stack, stop_stack
from freshrec.settings import Settings

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "online_retail_ii"


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
        start_stack(settings, reuse_redis=False)
        try:
            yield settings
        finally:
            stop_stack(settings.state_dir)


def load_events(data_dir: Path, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` events of the dataset, or exit with a clear message if absent."""
    try:
        files = locate(data_dir)
    except DatasetError as exc:
        sys.exit(f"benchmark data missing: {exc}\n(pass --data DIR with events.csv[.gz] in the format of ../shared/data)")
    return list(itertools.islice(read_events(files.events, files.name), limit))


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    if not rows:
        return
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {path}")
