"""What serving reads of the collaborative state, through :mod:`stores.collab_store` (the one adapter).

Two kinds of read, kept apart because they are paid differently:

* **shop-wide** (:func:`read_shop`): item statistics, popularity at two horizons and
  first-seen times, whole hashes of the catalog's size. Read by a background thread
  every ``popularity_refresh_s`` (:mod:`serving.shop_view`), never by a request; the
  ``collab:meta`` marker is read first, and when it has not moved the previous reading
  is kept without reading the large hashes again.
* **per request** (:func:`read_shopper_inputs`): the co-purchase rows of
  ``ranking.features.rows_needed`` and the nearest shoppers' user states, in one
  pipeline (one round trip), through the request client and its gate. Both are decoded
  through :class:`DecodeCache` es keyed by the stored bytes; a neighbour's state is kept
  as its ``ranking.collab.neighbour_summary``, all the features read of it.

The keys and value formats are :mod:`stores.collab_store`'s; this module only decodes
into what ``ranking.features`` takes. Shopper vectors for the neighbour index come from
:func:`read_shopper_vectors`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from ranking.collab import (
    CollabRules,
    NeighbourSummary,
    StoredRow,
    coded_decayed_row,
    neighbour_summary,
    normalised,
    stored_row_arrays,
)
from ranking.user_state import Popularity, UserState
from stores import collab_store


@dataclass(frozen=True)
class CollabShop:
    """The shop-wide collaborative state at ``newest_ts`` (the flow's newest event time).

    ``pop_short``/``pop_long`` are already decayed to ``newest_ts`` and normalised to a
    maximum of 1 (``ranking.collab.normalised``), as ``ShopView`` takes them.
    """

    newest_ts: float = 0.0
    pop_short: Mapping[str, float] = field(default_factory=dict)
    pop_long: Mapping[str, float] = field(default_factory=dict)
    first_seen: Mapping[str, float] = field(default_factory=dict)
    baskets: Mapping[str, int] = field(default_factory=dict)
    buyers: Mapping[str, int] = field(default_factory=dict)
    marker: tuple[Any, ...] = ()  # what collab:meta said; an unchanged marker means an unchanged state


def read_shop(client: Any, settings: Any, rules: CollabRules, previous: CollabShop | None = None) -> CollabShop:
    """The shop-wide state (one round trip for the marker, one for the hashes when it moved)."""
    marker = collab_store.read_meta_marker(client, settings)
    if previous is not None and previous.marker == marker and marker != (None, None, None):
        return previous
    stats, short, long_, first_seen = collab_store.read_shop_state(client, settings)
    newest = float(marker[0]) if marker[0] is not None else 0.0
    return CollabShop(
        newest_ts=newest,
        pop_short=normalised(_decayed(short, rules.pop_short_half_life_s, newest)),
        pop_long=normalised(_decayed(long_, rules.pop_long_half_life_s, newest)),
        first_seen=first_seen,
        baskets={item: b for item, (b, _) in stats.items()},
        buyers={item: u for item, (_, u) in stats.items()},
        marker=marker,
    )


def _decayed(entries: dict[str, tuple[float, float]], half_life_s: float, now_ts: float) -> dict[str, float]:
    pop = Popularity(half_life_s, entries)
    newest = max((as_of for _, as_of in pop.entries.values()), default=0.0)
    return pop.scores(max(now_ts, newest))


class DecodeCache:
    """Decoded values keyed by their exact stored bytes, bounded (oldest entries dropped first).

    A request reads ~50 neighbours' states and ~20-40 co-purchase rows; decoding them
    (``UserState.from_bytes`` and the neighbour summary, ``decayed_row``) was most of the
    ranker path's cost (measured: ~5 ms of states, ~2.5 ms of rows per request on the
    development machine), while the same popular shoppers and items recur across
    requests. A hit needs the bytes Redis returned to equal the cached bytes, so a cached
    value is always exactly what decoding would give; the read itself is not saved. Rows
    are cached as arrays (``ranking.collab.StoredRow``) and decayed to each request's "now"
    with numpy (``coded_decayed_row``): a cached row serves every "now".
    """

    def __init__(self, max_entries: int = 5000) -> None:
        self.max_entries = max_entries
        self._data: dict[Any, tuple[bytes, Any]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: Any, raw: bytes, decode: Any) -> Any:
        hit = self._data.get(key)
        if hit is not None and hit[0] == raw:
            self.hits += 1
            return hit[1]
        self.misses += 1
        value = decode(raw)
        if len(self._data) >= self.max_entries:
            for old in list(self._data)[: self.max_entries // 10 or 1]:
                self._data.pop(old, None)
        self._data[key] = (raw, value)
        return value


def read_shopper_inputs(
    client: Any,
    settings: Any,
    row_items: Sequence[str],
    neighbour_ids: Sequence[str],
    now_ts: float,
    rules: CollabRules,
    states_cache: DecodeCache | None = None,
    rows_cache: DecodeCache | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, NeighbourSummary]]:
    """(decayed co-purchase rows of ``row_items``, neighbour summaries of ``neighbour_ids``) in one round trip.

    Items without a stored row and shoppers without a state are left out. Callers must
    not change the returned rows or summaries (with caches they are shared across requests).
    """
    raw_rows, raw_users = collab_store.read_rows_and_users(client, settings, row_items, neighbour_ids)
    rows: dict[str, dict[str, float]] = {}
    for item, raw in zip(row_items, raw_rows, strict=True):
        if raw is not None:
            decode_row = _row_decoder(item)
            stored = decode_row(raw) if rows_cache is None else rows_cache.get(item, raw, decode_row)
            rows[item] = coded_decayed_row(stored, now_ts, rules)
    summaries: dict[str, NeighbourSummary] = {}
    decode_user = _summary_decoder(rules.basket_decay)
    for user, raw in zip(neighbour_ids, raw_users, strict=True):
        if raw is not None:
            summaries[user] = decode_user(raw) if states_cache is None else states_cache.get(user, raw, decode_user)
    return rows, summaries


def _row_decoder(item: str) -> Any:
    def decode(raw: bytes) -> StoredRow:
        return stored_row_arrays(collab_store.decode_row(raw), item)

    return decode


def _summary_decoder(basket_decay: float) -> Any:
    def decode(raw: bytes) -> NeighbourSummary:
        return neighbour_summary(UserState.from_bytes(raw), basket_decay)

    return decode


def read_shopper_vectors(client: Any, settings: Any, dim: int, batch: int = 2000) -> dict[str, np.ndarray]:
    """Every stored shopper vector; vectors of another size are skipped."""
    out: dict[str, np.ndarray] = {}
    for user, raw in collab_store.scan_shopper_vectors(client, settings, batch):
        vec = decode_vector(raw, dim)
        if vec is not None:
            out[user] = vec
    return out


def decode_vector(raw: bytes | None, dim: int) -> np.ndarray | None:
    """A float32 little-endian vector of ``dim`` finite values, or None (a delete, or unusable bytes)."""
    if raw is None or len(raw) != 4 * dim:
        return None
    vec = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return vec if bool(np.isfinite(vec).all()) else None


def write_for_tests(
    client: Any,
    settings: Any,
    rows: Mapping[str, Mapping[str, tuple[float, float]]] = {},
    stats: Mapping[str, tuple[int, int]] = {},
    pop_short: Mapping[str, tuple[float, float]] = {},
    pop_long: Mapping[str, tuple[float, float]] = {},
    first_seen: Mapping[str, float] = {},
    newest_ts: float = 0.0,
    vectors: Mapping[str, np.ndarray] = {},
) -> None:
    """Write state as the collaborative flow does (:func:`stores.collab_store.write_batch`, one
    batch past the offsets Redis holds): the tests' and the benchmark's stand-in for the flow."""
    held = collab_store.read_offsets(client, settings)
    collab_store.write_batch(
        client, settings, topic=settings.topics.events, prev_offsets=held,
        offsets={**held, "0": held.get("0", -1) + 1}, runs=[],
        rows={item: orjson.dumps({o: list(v) for o, v in row.items()}) for item, row in rows.items()},
        stats=stats, pop_short=pop_short, pop_long=pop_long, first_seen=first_seen,
        vectors={u: np.asarray(v, dtype="<f4").tobytes() for u, v in vectors.items()},
        newest_ts=newest_ts,
    )
