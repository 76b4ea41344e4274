"""What serving reads of the collaborative state in Redis (the layout of docs/ranking_stage_contract.md).

Two kinds of read, kept apart because they are paid differently:

* **shop-wide** (:func:`read_shop`): item statistics, popularity at two horizons and
  first-seen times, whole hashes of the catalog's size. Read by a background thread
  every ``popularity_refresh_s`` (:mod:`serving.shop_view`), never by a request; the
  ``collab:meta`` hash is read first, and when its newest event time has not moved the
  previous reading is kept without reading the large hashes again.
* **per request** (:func:`read_shopper_inputs`): the co-purchase rows of
  ``ranking.features.rows_needed`` and the nearest shoppers' user states, in one
  pipeline (one round trip), through the request client and its gate.

The layout is the contract's; ``stores.collab_store`` (being written beside this) will
hold the same reads for every reader, and this module's functions are then thin
calls into it: keep the signatures (plain data in, plain data out) when switching.
Shopper vectors for the neighbour index come from :func:`read_shopper_vectors`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from ranking.collab import CollabRules, decayed_row, normalised
from ranking.user_state import Popularity, UserState

COP = "cop:"
ITEMS = "collab:items"
POP_SHORT = "collab:pop_short"
POP_LONG = "collab:pop_long"
FIRST_SEEN = "collab:first_seen"
META = "collab:meta"
SHOPVEC = "shopvec"


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


def _key(settings: Any, name: str) -> str:
    return f"{settings.redis_prefix}{name}"


def read_meta_marker(client: Any, settings: Any) -> tuple[Any, ...]:
    """``collab:meta``'s newest_ts, epoch and offsets: changes whenever the flow writes."""
    meta = client.hmget(_key(settings, META), ["newest_ts", "epoch", "offsets"])
    return tuple(meta)


def read_shop(client: Any, settings: Any, rules: CollabRules, previous: CollabShop | None = None) -> CollabShop:
    """The shop-wide state (one round trip for the marker, one for the hashes when it moved)."""
    marker = read_meta_marker(client, settings)
    if previous is not None and previous.marker == marker and marker != (None, None, None):
        return previous
    pipe = client.pipeline(transaction=False)
    for name in (ITEMS, POP_SHORT, POP_LONG, FIRST_SEEN):
        pipe.hgetall(_key(settings, name))
    items, short, long_, first = pipe.execute()
    newest = float(marker[0]) if marker[0] is not None else 0.0
    baskets: dict[str, int] = {}
    buyers: dict[str, int] = {}
    for item, raw in items.items():
        b, u = orjson.loads(raw)
        key = item.decode()
        baskets[key], buyers[key] = int(b), int(u)
    first_seen = {item.decode(): float(v) for item, v in first.items()}
    return CollabShop(
        newest_ts=newest,
        pop_short=normalised(_decayed(short, rules.pop_short_half_life_s, newest)),
        pop_long=normalised(_decayed(long_, rules.pop_long_half_life_s, newest)),
        first_seen=first_seen,
        baskets=baskets,
        buyers=buyers,
        marker=marker,
    )


def _decayed(raw: Mapping[bytes, bytes], half_life_s: float, now_ts: float) -> dict[str, float]:
    entries = {item.decode(): tuple(orjson.loads(v)) for item, v in raw.items()}
    pop = Popularity(half_life_s, entries)  # type: ignore[arg-type]
    newest = max((as_of for _, as_of in pop.entries.values()), default=0.0)
    return pop.scores(max(now_ts, newest))


class DecodeCache:
    """Decoded values keyed by their exact stored bytes, bounded (oldest entries dropped first).

    A request reads ~50 neighbours' states and ~20-40 co-purchase rows; decoding them
    (``UserState.from_bytes``, ``decayed_row``) was most of the ranker path's cost
    (measured: ~5 ms of states, ~2.5 ms of rows per request on the development machine),
    while the same popular shoppers and items recur across requests. A hit needs the
    bytes Redis returned to equal the cached bytes (and, for a row, the same "now"), so
    a cached value is always exactly what decoding would give; the read itself is not
    saved.
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
) -> tuple[dict[str, dict[str, float]], dict[str, UserState]]:
    """(decayed co-purchase rows of ``row_items``, user states of ``neighbour_ids``) in one round trip.

    Items without a stored row and shoppers without a state are left out. Callers must
    not change the returned states or rows (with caches they are shared across requests).
    """
    from stores.user_store import user_key

    if not row_items and not neighbour_ids:
        return {}, {}
    pipe = client.pipeline(transaction=False)
    if row_items:
        pipe.mget([_key(settings, COP + item) for item in row_items])
    if neighbour_ids:
        pipe.mget([user_key(settings, u) for u in neighbour_ids])
    replies = pipe.execute()
    rows: dict[str, dict[str, float]] = {}
    states: dict[str, UserState] = {}
    at = 0
    if row_items:
        for item, raw in zip(row_items, replies[0], strict=True):
            if raw is not None:
                decode_row = _row_decoder(item, now_ts, rules)
                rows[item] = decode_row(raw) if rows_cache is None else rows_cache.get((item, now_ts), raw, decode_row)
        at = 1
    if neighbour_ids:
        for user, raw in zip(neighbour_ids, replies[at], strict=True):
            if raw is not None:
                states[user] = UserState.from_bytes(raw) if states_cache is None else states_cache.get(user, raw, UserState.from_bytes)
    return rows, states


def _row_decoder(item: str, now_ts: float, rules: CollabRules) -> Any:
    def decode(raw: bytes) -> dict[str, float]:
        stored = {other: (float(v[0]), float(v[1])) for other, v in orjson.loads(raw).items()}
        return decayed_row(stored, item, now_ts, rules)

    return decode


def read_shopper_vectors(client: Any, settings: Any, dim: int, batch: int = 2000) -> dict[str, np.ndarray]:
    """Every stored shopper vector (``shopvec``, HSCAN in batches); vectors of another size are skipped."""
    out: dict[str, np.ndarray] = {}
    for user, raw in client.hscan_iter(_key(settings, SHOPVEC), count=batch):
        vec = decode_vector(raw, dim)
        if vec is not None:
            out[user.decode()] = vec
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
    """Write state in the contract's layout (the tests' and the benchmark's stand-in for the flow)."""
    pipe = client.pipeline(transaction=False)
    for item, row in rows.items():
        pipe.set(_key(settings, COP + item), orjson.dumps({o: list(v) for o, v in row.items()}))
    for name, data in ((ITEMS, stats), (POP_SHORT, pop_short), (POP_LONG, pop_long)):
        if data:
            pipe.hset(_key(settings, name), mapping={k: orjson.dumps(list(v)) for k, v in data.items()})
    if first_seen:
        pipe.hset(_key(settings, FIRST_SEEN), mapping={k: repr(float(v)) for k, v in first_seen.items()})
    if vectors:
        pipe.hset(_key(settings, SHOPVEC), mapping={u: np.asarray(v, dtype="<f4").tobytes() for u, v in vectors.items()})
    # offsets move on every flow write; a fresh value here makes the cache re-read
    marker = orjson.dumps({"test": time.time_ns()})
    pipe.hset(_key(settings, META), mapping={"newest_ts": repr(float(newest_ts)), "offsets": marker})
    pipe.execute()
