"""A dataset in the normalised format, loaded once into flat numpy arrays.

The evaluation replays hundreds of thousands of events many times per method; holding
them as integer-coded arrays (user index, item index, time, kind) keeps the replay loop
cheap and makes every method see exactly the same, identically ordered input.
Rows are kept in file order (the format is sorted by ts); a stable sort by ts guards
against a file that is not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from freshrec.dataset import locate, read_events, read_items

# Kinds coded as small ints; the protocol only distinguishes purchases and cancels, the
# other kinds are ingested as history like the streams flow does.
KIND_CODES: dict[str, int] = {"purchase": 0, "cancel": 1, "cart": 2, "click": 3, "view": 4, "search": 5}
PURCHASE = KIND_CODES["purchase"]
CANCEL = KIND_CODES["cancel"]
KIND_NAMES: tuple[str, ...] = tuple(sorted(KIND_CODES, key=KIND_CODES.__getitem__))


@dataclass(frozen=True)
class EventLog:
    """Every item-bearing event of a dataset as parallel arrays, sorted by ``ts``.

    ``event_ids`` are the dataset's own ``<name>:<line>`` ids, so pairs and events built
    from the log carry the same ids a replay through Kafka would.
    """

    name: str
    user: np.ndarray  # int32 index into user_ids
    item: np.ndarray  # int32 index into item_ids
    ts: np.ndarray  # float64 Unix seconds
    kind: np.ndarray  # int8 KIND_CODES
    event_ids: list[str]
    user_ids: list[str]
    item_ids: list[str]
    titles: list[str]  # encoder text per item (CatalogItem.text()); the id when the catalog lacks it

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def window(self, end_ts: float) -> EventLog:
        """The events strictly before ``end_ts`` (same id spaces), e.g. a tuning cut."""
        n = int(np.searchsorted(self.ts, end_ts, side="left"))
        return EventLog(
            self.name, self.user[:n], self.item[:n], self.ts[:n], self.kind[:n], self.event_ids[:n],
            self.user_ids, self.item_ids, self.titles,
        )


def parse_date(text: str) -> float:
    """``YYYY-MM-DD`` (UTC midnight) or an ISO time, as Unix seconds."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def format_ts(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d")


def build_log(
    name: str,
    events: Iterable[Mapping[str, Any]],
    items: Iterable[Mapping[str, Any]] = (),
) -> EventLog:
    """Code wire-shaped event dicts (``freshrec.dataset.read_events``) into an :class:`EventLog`.

    Events without an item (searches) or of an unknown kind are skipped: next-basket
    evaluation has nothing to score them against. Item texts come from the catalog rows
    in the order given, then items seen only in events are appended with their id as text.
    """
    item_index: dict[str, int] = {}
    item_ids: list[str] = []
    titles: list[str] = []
    for row in items:
        iid = str(row["item_id"]).strip()
        if not iid or iid in item_index:
            continue
        item_index[iid] = len(item_ids)
        item_ids.append(iid)
        parts = [str(row.get(k) or "").strip() for k in ("title", "category", "description")]
        titles.append(" | ".join(p for p in parts if p) or iid)
    user_index: dict[str, int] = {}
    user_ids: list[str] = []
    users: list[int] = []
    its: list[int] = []
    tss: list[float] = []
    kinds: list[int] = []
    eids: list[str] = []
    for ev in events:
        iid = ev.get("item_id")
        code = KIND_CODES.get(str(ev.get("kind")))
        if not iid or code is None:
            continue
        try:
            ts = float(ev["ts"])
        except (TypeError, ValueError):
            continue
        uid = str(ev["user_id"])
        u = user_index.get(uid)
        if u is None:
            u = user_index[uid] = len(user_ids)
            user_ids.append(uid)
        i = item_index.get(iid)
        if i is None:
            i = item_index[iid] = len(item_ids)
            item_ids.append(iid)
            titles.append(iid)
        users.append(u)
        its.append(i)
        tss.append(ts)
        kinds.append(code)
        eids.append(str(ev.get("event_id", "")))
    ts_arr = np.asarray(tss, dtype=np.float64)
    order = np.argsort(ts_arr, kind="stable")
    return EventLog(
        name=name,
        user=np.asarray(users, dtype=np.int32)[order],
        item=np.asarray(its, dtype=np.int32)[order],
        ts=ts_arr[order],
        kind=np.asarray(kinds, dtype=np.int8)[order],
        event_ids=[eids[k] for k in order],
        user_ids=user_ids,
        item_ids=item_ids,
        titles=titles,
    )


def load_log(dataset_dir: Path, end_ts: float | None = None) -> EventLog:
    """Read a dataset folder (``freshrec.dataset.locate`` says what is missing)."""
    files = locate(Path(dataset_dir))
    items = read_items(files.items) if files.items is not None else ()
    log = build_log(files.name, read_events(files.events, files.name), items)
    return log if end_ts is None else log.window(end_ts)
