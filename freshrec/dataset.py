"""Reading the normalised dataset format of ``../shared/data`` (and the bundled sample).

``events.csv[.gz]``: ``user_id,item_id,ts,event_type``, sorted by ts.
``items.csv``: ``item_id,title,category,description``.

Rows become plain dicts in the wire shape of :mod:`freshrec.contracts`; validation is
the producer's job, so a bad row here still reaches the dead-letter topic with a reason.
Event ids are ``<dataset>:<line>``: a second replay of the same file carries the same
ids, which is what lets every consumer stay idempotent.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Source event types that are not freshrec kinds. A rating says the shopper subscribed
# to (bought) the item, so it counts as a purchase.
KIND_ALIASES = {"rating": "purchase"}

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"


class DatasetError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class DatasetFiles:
    name: str
    events: Path
    items: Path | None


def locate(dataset_dir: Path) -> DatasetFiles:
    """Find the two files; a clear error says what is missing and where it looked."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DatasetError(
            f"dataset folder {dataset_dir} does not exist; use the bundled sample ({SAMPLE_DIR}) "
            "or a folder in the format of ../shared/data"
        )
    for name in ("events.csv.gz", "events.csv"):
        if (dataset_dir / name).exists():
            events = dataset_dir / name
            break
    else:
        raise DatasetError(f"{dataset_dir} has no events.csv or events.csv.gz")
    items = dataset_dir / "items.csv"
    return DatasetFiles(dataset_dir.name, events, items if items.exists() else None)


# Python's csv module refuses a field over 131,072 characters with csv.Error, which would
# stop a whole replay at one bad row. Rows are read in full instead, and the validating
# producer rejects an over-long field to dead-letter with its reason (contracts' limits:
# a record over MAX_RECORD_BYTES, a description over MAX_DESCRIPTION_CHARS).
csv.field_size_limit(64 * 1024 * 1024)


def _open_text(path: Path) -> Any:
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")


def read_items(path: Path) -> Iterator[dict[str, Any]]:
    with _open_text(path) as fh:
        for row in csv.DictReader(fh):
            yield {
                "op": "upsert",
                "item_id": (row.get("item_id") or "").strip(),
                "title": (row.get("title") or "").strip(),
                "category": (row.get("category") or "").strip(),
                "description": (row.get("description") or "").strip(),
            }


def read_events(path: Path, name: str) -> Iterator[dict[str, Any]]:
    """Yield events in file order; an unparsable ts is passed on for the producer to reject."""
    with _open_text(path) as fh:
        for line_no, row in enumerate(csv.DictReader(fh), start=2):
            kind = (row.get("event_type") or "").strip()
            ts_raw = row.get("ts") or ""
            try:
                ts: Any = float(ts_raw)
            except ValueError:
                ts = ts_raw
            yield {
                "event_id": f"{name}:{line_no}",
                "user_id": (row.get("user_id") or "").strip(),
                "item_id": (row.get("item_id") or "").strip() or None,
                "kind": KIND_ALIASES.get(kind, kind),
                "ts": ts,
            }


def count_lines(path: Path) -> int:
    with _open_text(path) as fh:
        return max(sum(1 for _ in fh) - 1, 0)
