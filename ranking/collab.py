"""Shop-wide collaborative state: what is bought together, who resembles whom, what sells now.

The blend ranks a shopper's items by their own state; the ranker also needs what other
shoppers do (docs/ranker_study.md: co-purchase and nearest-shopper signals carry most of
a learned ranker's gain). This module is that state and the pure rules that move it, so
the collaborative flow, the evaluation and the tests run the very same code:

* **Co-purchase** (:class:`CoPurchase`): per item, decayed counts of the baskets in which
  another item was bought with it (half-life ``copurchase_half_life_s``), and, under the
  item's own id, the decayed count of baskets holding it (the denominator of
  :func:`confidence`, which the reasons of an answer use). Lines of one basket pair up as they arrive: a new line
  pairs with the lines of that basket already applied, so the result is every pair once
  whatever the arrival order. Only the first ``max_basket_lines`` distinct lines of a
  basket pair up (a wholesale order of 400 lines would otherwise add 160,000 pairs).
  **Memory bound**: a row holds at most ``row_cap`` entries; when it grows past that it
  is cut back to its ``top_k`` most *specific* partners, by :func:`cosine` (the decayed
  pair count over the geometric mean of the two items' basket counts, decayed to the
  event's time, ties by item id), so the whole table holds at most ``items x row_cap``
  entries (tested). Reads return every stored entry. Why cosine and not the count: a
  row cut by count keeps the partners that everything is bought with, which popularity
  already carries; the ranker gained nothing from such rows, and +1 to +2 % from rows
  cut and read as cosines (docs/ranker_study.md, "The co-purchase columns").
* **Item statistics** (:class:`ItemStats`): baskets with the item and distinct buyers
  (among the baskets a shopper's state keeps), whose ratio is the re-order ratio.
* **Popularity at two horizons**: :class:`ranking.user_state.Popularity` with
  ``pop_short_half_life_s`` (3 days: the study's second-largest ranker gain) and
  ``pop_long_half_life_s`` (60 days), fed by the same rule as served popularity
  (:func:`ranking.user_state.popularity_weight`); the long one also keeps first-seen times.
* **Shopper vectors** (:func:`shopper_vector`): the shopper's basket counts
  (``UserState.basket_scores``, as TIFU-KNN represents a shopper; Hu et al., SIGIR 2020)
  hashed into ``shopper_dim`` signed buckets and L2-normalised, so that the inner product
  of two vectors estimates the cosine of the two count vectors (feature hashing,
  Weinberger et al., ICML 2009) with a fixed size for any catalog, fit for a FAISS
  inner-product index. :class:`ShopperIndex` is the exact in-memory search the flow and
  the evaluation use; serving uses FAISS over the same vectors.

Every rule is decided by the events' own fields and their order, never the wall clock,
so a replay from a snapshot recomputes the same state (exactly once, like user state).
:meth:`CollabState.apply` must be called with the shopper's state *before* the event is
applied to it (it reads which basket the line joins), then the caller applies the event.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from freshrec.contracts import Event

from .user_state import DAY_S, Popularity, UserState, decay_factor, decayed_add, popularity_weight

COLLAB_FORMAT = 1


@dataclass(frozen=True, slots=True)
class CollabRules:
    """The knobs of the collaborative state (settings ``collab_*``)."""

    top_k: int = 100
    row_cap: int = 200
    copurchase_half_life_s: float = 180 * DAY_S
    max_basket_lines: int = 64
    pop_short_half_life_s: float = 3 * DAY_S
    pop_long_half_life_s: float = 60 * DAY_S
    shopper_dim: int = 256
    basket_decay: float = 0.9  # Settings.repeat_basket_decay: the shopper vector is the repeat signal
    shrink: float = 10.0  # of :func:`cosine`, as ranking.features.FeatureRules.shrink

    def __post_init__(self) -> None:
        if self.row_cap < self.top_k:
            raise ValueError(f"row_cap ({self.row_cap}) must be at least top_k ({self.top_k})")

    @classmethod
    def from_settings(cls, settings: Any) -> CollabRules:
        return cls(
            top_k=settings.collab_top_k,
            row_cap=settings.collab_row_cap,
            copurchase_half_life_s=settings.collab_copurchase_half_life_days * DAY_S,
            max_basket_lines=settings.collab_max_basket_lines,
            pop_short_half_life_s=settings.collab_pop_short_days * DAY_S,
            pop_long_half_life_s=settings.collab_pop_long_days * DAY_S,
            shopper_dim=settings.collab_shopper_dim,
            basket_decay=settings.repeat_basket_decay,
        )


# -- co-purchase ---------------------------------------------------------------------------


def cosine(count: float, n_a: float, n_b: float, shrink: float) -> float:
    """How specific a pair is: ``count / (sqrt(n_a * n_b) + shrink)``, with ``n_a``/``n_b`` the
    items' basket counts (``ItemStats.baskets``). The shrink keeps one shared basket of
    two rare items from scoring as a certainty (as ``evaluation.baselines.CoPurchase``)."""
    return count / (math.sqrt(float(n_a) * float(n_b)) + shrink)


@dataclass(slots=True)
class CoPurchase:
    """Decayed co-purchase counts per item: ``rows[a][b] = (count, as_of)``; ``rows[a][a]`` is a's basket count."""

    rules: CollabRules
    rows: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    # each read row as arrays (:class:`StoredRow`), dropped when the row changes: a row read
    # for many baskets between two of its purchases is sorted and coded once, and decayed with
    # numpy (:func:`coded_decayed_row`, the same floats as :func:`decayed_row`). At most one
    # per row: ~6.5 kB at a full row of 200, beside the row's ~31 kB.
    _arrays: dict[str, StoredRow] = field(default_factory=dict, repr=False, compare=False)

    def _add(self, a: str, b: str, ts: float, baskets: Mapping[str, int]) -> None:
        self._arrays.pop(a, None)
        row = self.rows.setdefault(a, {})
        value, as_of = row.get(b, (0.0, ts))
        row[b] = decayed_add(value, as_of, 1.0, ts, self.rules.copurchase_half_life_s)
        if len(row) > self.rules.row_cap:
            self._prune(a, row, ts, baskets)

    def _prune(self, item: str, row: dict[str, tuple[float, float]], ts: float, baskets: Mapping[str, int]) -> None:
        """Cut a row back to its ``top_k`` partners of largest :func:`cosine` (its own count always stays)."""
        hl, shrink = self.rules.copurchase_half_life_s, self.rules.shrink
        own = row.get(item)
        n_a = baskets.get(item, 0)
        ranked = sorted(
            ((other, v) for other, v in row.items() if other != item),
            key=lambda kv: (
                -cosine(kv[1][0] * decay_factor(max(ts - kv[1][1], 0.0), hl), n_a, baskets.get(kv[0], 0), shrink),
                kv[0],
            ),
        )
        kept = dict(ranked[: self.rules.top_k])
        if own is not None:
            kept[item] = own
        self.rows[item] = kept

    def add_line(
        self, item: str, basket: Sequence[str], ts: float, new_basket_for_item: bool, baskets: Mapping[str, int]
    ) -> set[str]:
        """Count one purchase line joining ``basket`` (the basket's other lines so far); the changed rows.

        ``baskets`` are the items' basket counts (``ItemStats.baskets``) that a cut ranks by.
        """
        if not new_basket_for_item:
            return set()
        self._add(item, item, ts, baskets)
        changed = {item}
        if len(basket) < self.rules.max_basket_lines:
            for other in basket:
                self._add(item, other, ts, baskets)
                self._add(other, item, ts, baskets)
                changed.add(other)
        return changed

    def row(self, item: str, now_ts: float) -> dict[str, float]:
        """The item's stored row, counts decayed to ``now_ts``: what :func:`decayed_row` returns,
        computed from the row's cached arrays. Rows must change only through :meth:`add_line`
        (or be replaced whole with :meth:`replace_rows`), which is what keeps the cache true."""
        stored = self._arrays.get(item)
        if stored is None:
            stored = self._arrays[item] = stored_row_arrays(self.rows.get(item, {}), item)
        return coded_decayed_row(stored, now_ts, self.rules)

    def replace_rows(self, rows: dict[str, dict[str, tuple[float, float]]]) -> None:
        """Install whole rows (a snapshot's), forgetting every cached array."""
        self.rows = rows
        self._arrays.clear()

    def entries(self) -> int:
        return sum(len(r) for r in self.rows.values())


def decayed_row(row: Mapping[str, tuple[float, float]], item: str, now_ts: float, rules: CollabRules) -> dict[str, float]:
    """A stored row read at ``now_ts``: every other item by id, then, under ``item``, its own count.

    The order is fixed by the ids (not by how the row was built), so sums over rows add
    in the same order on every path.
    """
    hl = rules.copurchase_half_life_s
    out = {other: row[other][0] * decay_factor(max(now_ts - row[other][1], 0.0), hl) for other in sorted(row) if other != item}
    own = row.get(item)
    out[item] = 0.0 if own is None else own[0] * decay_factor(max(now_ts - own[1], 0.0), hl)
    return out


@dataclass(frozen=True, slots=True)
class StoredRow:
    """A stored co-purchase row as arrays, decoded once per stored value (serving caches it by
    the bytes Redis returned, whatever "now" a request reads it at). The others are in id
    order, as :func:`decayed_row` returns them."""

    item: str
    names: list[str]  # the other items, by id (the item's own count apart)
    codes: np.ndarray  # their ITEM_CODES
    values: np.ndarray
    as_of: np.ndarray
    own: tuple[float, float] | None


def stored_row_arrays(row: Mapping[str, tuple[float, float]], item: str) -> StoredRow:
    names = sorted(o for o in row if o != item)
    return StoredRow(
        item,
        names,
        ITEM_CODES.encode(names),
        np.fromiter((row[o][0] for o in names), dtype=np.float64, count=len(names)),
        np.fromiter((row[o][1] for o in names), dtype=np.float64, count=len(names)),
        row.get(item),
    )


class CodedRow(dict):  # type: ignore[type-arg]
    """What :func:`decayed_row` returns (``{other: value}``, the item's own count last), with the
    others also as arrays (``codes``, ``values``, dict order) for the vectorised sums of
    :func:`ranking.features.shopper_signals`."""

    codes: np.ndarray
    values: np.ndarray


def coded_decayed_row(stored: StoredRow, now_ts: float, rules: CollabRules) -> CodedRow:
    """:func:`decayed_row` of the row ``stored`` holds: the same keys, order and floats
    (``math.exp2`` of the same quotients, as :func:`ranking.user_state.decay_factor`)."""
    hl = rules.copurchase_half_life_s
    age = np.maximum(now_ts - stored.as_of, 0.0)
    decay = np.fromiter(map(math.exp2, (-age / hl).tolist()), dtype=np.float64, count=len(age))
    values = stored.values * decay
    out = CodedRow(zip(stored.names, values.tolist(), strict=True))
    own = 0.0
    if stored.own is not None:
        v, as_of = stored.own
        own = v * decay_factor(max(now_ts - as_of, 0.0), hl)
    out[stored.item] = own
    out.codes, out.values = stored.codes, values
    return out


def confidence(row: Mapping[str, float], item: str, shrink: float = 10.0) -> dict[str, float]:
    """P(other | item) with shrinkage: ``count(item, other) / (count(item) + shrink)`` for a decayed row."""
    denom = row.get(item, 0.0) + shrink
    return {other: v / denom for other, v in row.items() if other != item}


# -- item statistics -----------------------------------------------------------------------


@dataclass(slots=True)
class ItemStats:
    """Baskets holding each item and its distinct buyers (within what shoppers' states keep)."""

    baskets: dict[str, int] = field(default_factory=dict)
    buyers: dict[str, int] = field(default_factory=dict)


def reorder_ratio(baskets: float, buyers: float) -> float:
    """Share of an item's baskets that re-bought it, smoothed: ``(baskets - buyers + 1) / (baskets + 2)``."""
    return (baskets - buyers + 1.0) / (baskets + 2.0)


# -- shopper vectors -------------------------------------------------------------------------


_BUCKETS: dict[tuple[str, int], tuple[int, float]] = {}


def _bucket(item: str, dim: int) -> tuple[int, float]:
    """The item's hashed bucket and sign (stable across processes and runs: blake2b, not ``hash``)."""
    key = (item, dim)
    hit = _BUCKETS.get(key)
    if hit is None:
        h = int.from_bytes(hashlib.blake2b(item.encode(), digest_size=8).digest(), "little")
        hit = (h % dim, 1.0 if (h >> 63) & 1 else -1.0)
        if len(_BUCKETS) < 1_000_000:
            _BUCKETS[key] = hit
    return hit


def shopper_vector(state: UserState, rules: CollabRules) -> np.ndarray | None:
    """The shopper's hashed, normalised basket-count vector; None without any basket."""
    scores = state.basket_scores(rules.basket_decay)
    if not scores:
        return None
    vec = np.zeros(rules.shopper_dim, dtype=np.float32)
    for item in sorted(scores):  # a fixed order: float sums do not depend on dict order
        b, sign = _bucket(item, rules.shopper_dim)
        vec[b] += sign * scores[item]
    norm = float(np.linalg.norm(vec))
    if not math.isfinite(norm) or norm < 1e-12:
        return None
    return vec / norm


@dataclass(slots=True)
class ShopperIndex:
    """Exact inner-product search over shopper vectors (numpy; a few thousand shoppers).

    A shopper whose vector becomes None keeps a zero row (never found); one forgotten by
    retention is :meth:`remove` d, the last row moving into its place. Rows, and so search
    ties (broken by row then id), depend only on the sequence of upserts and removals,
    which the stream and the evaluation's replay apply alike.
    """

    dim: int
    ids: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    matrix: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))

    def upsert(self, user_id: str, vector: np.ndarray | None) -> None:
        row = self.rows.get(user_id)
        if row is None:
            if vector is None:
                return
            row = self.rows[user_id] = len(self.ids)
            self.ids.append(user_id)
            if self.matrix.shape[0] <= row:
                grown = np.zeros((max(64, 2 * self.matrix.shape[0]), self.dim), dtype=np.float32)
                if self.matrix.size:
                    grown[: self.matrix.shape[0]] = self.matrix
                self.matrix = grown
        self.matrix[row] = 0.0 if vector is None else vector

    def remove(self, user_id: str) -> None:
        """Drop a shopper and their row: the last row moves into its place (memory follows the shoppers kept)."""
        row = self.rows.pop(user_id, None)
        if row is None:
            return
        last = len(self.ids) - 1
        if row != last:
            moved = self.ids[last]
            self.ids[row] = moved
            self.rows[moved] = row
            self.matrix[row] = self.matrix[last]
        self.ids.pop()
        self.matrix[last] = 0.0
        if self.matrix.shape[0] > 64 and len(self.ids) < self.matrix.shape[0] // 4:
            self.matrix = self.matrix[: max(64, self.matrix.shape[0] // 2)].copy()

    def search(self, vector: np.ndarray, k: int, exclude: str | None = None) -> list[tuple[str, float]]:
        """The ``k`` shoppers with the largest positive inner product with ``vector``, best first
        (found in float32, reported as :func:`rescored_neighbours` reports them)."""
        n = len(self.ids)
        if n == 0 or k <= 0:
            return []
        sims = self.matrix[:n] @ vector
        if exclude is not None and exclude in self.rows:
            sims[self.rows[exclude]] = -np.inf
        take = min(k, n)
        top = np.argpartition(-sims, take - 1)[:take] if take < n else np.arange(n)
        found = [r for r in top.tolist() if sims[r] > 0.0]
        return rescored_neighbours(vector, [self.ids[r] for r in found], self.matrix[found], k)


def shopper_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """The similarity of two shopper vectors as every path reports it: their float32 values'
    inner product summed in float64 (each product exact), the same float whichever index found them."""
    return float(np.dot(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)))


def rescored_neighbours(vector: np.ndarray, users: Sequence[str], vectors: np.ndarray, k: int) -> list[tuple[str, float]]:
    """Found shoppers (``vectors``: their rows) as (user, :func:`shopper_similarity`), positive
    ones only, best first, ties by user id, at most ``k``.

    The stream and the evaluation search with numpy (:class:`ShopperIndex`), serving with
    FAISS: their float32 sums differ in the last bit, and so would every neighbour feature
    (tests/integration/test_features_serving_path.py). Re-scoring the few found shoppers
    one way, and ordering them one way, makes the three paths' neighbours the same floats
    in the same order (the order of summation in :func:`neighbour_signals`).
    """
    scored = [(u, shopper_similarity(v, vector)) for u, v in zip(users, vectors, strict=True)]
    scored.sort(key=lambda us: (-us[1], us[0]))
    return [(u, s) for u, s in scored[:k] if s > 0.0]


# -- the whole collaborative state ------------------------------------------------------------


@dataclass(slots=True)
class CollabState:
    """Co-purchase rows, item statistics and popularity at two horizons, moved one event at a time."""

    rules: CollabRules
    copurchase: CoPurchase = field(init=False)
    stats: ItemStats = field(default_factory=ItemStats)
    pop_short: Popularity = field(init=False)
    pop_long: Popularity = field(init=False)

    def __post_init__(self) -> None:
        self.copurchase = CoPurchase(self.rules)
        self.pop_short = Popularity(self.rules.pop_short_half_life_s)
        self.pop_long = Popularity(self.rules.pop_long_half_life_s)

    def apply(self, before: UserState, event: Event) -> set[str]:
        """Apply one valid event, given its shopper's state *before* it; the items whose rows or stats changed.

        The caller then applies the event to ``before`` (``ranking.user_state.apply_event``)
        and skips this call for events that function would drop as duplicates.
        """
        item, ts = event.item_id, event.ts
        if item is None:
            return set()
        self.pop_short.observe(ts)
        self.pop_long.observe(ts)
        self.pop_long.see(item, ts)
        weight = popularity_weight(before, event)
        if weight:
            self.pop_short.add(item, weight, ts)
            self.pop_long.add(item, weight, ts)
        if event.kind != "purchase":
            return {item} if weight else set()
        basket, in_it = basket_at(before, ts, item)
        changed = self.copurchase.add_line(item, basket, ts, not in_it, self.stats.baskets)
        if not in_it:
            self.stats.baskets[item] = self.stats.baskets.get(item, 0) + 1
            if item not in before.basket_bits:
                self.stats.buyers[item] = self.stats.buyers.get(item, 0) + 1
        return changed | {item}

    # -- (de)serialisation (recovery snapshots) --------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": COLLAB_FORMAT,
            "rows": {k: {o: list(v) for o, v in row.items()} for k, row in self.copurchase.rows.items()},
            "baskets": self.stats.baskets,
            "buyers": self.stats.buyers,
            "pop_short": _pop_dict(self.pop_short),
            "pop_long": _pop_dict(self.pop_long),
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], rules: CollabRules) -> CollabState:
        if obj.get("v") != COLLAB_FORMAT:
            raise ValueError(f"collaborative state format {obj.get('v')!r}, expected {COLLAB_FORMAT}")
        out = cls(rules)
        out.copurchase.replace_rows({k: {o: (float(v[0]), float(v[1])) for o, v in row.items()} for k, row in obj["rows"].items()})
        out.stats = ItemStats(dict(obj["baskets"]), dict(obj["buyers"]))
        out.pop_short = _pop_from(obj["pop_short"], rules.pop_short_half_life_s)
        out.pop_long = _pop_from(obj["pop_long"], rules.pop_long_half_life_s)
        return out


def basket_at(state: UserState, ts: float, item: str) -> tuple[list[str], bool]:
    """The lines of the shopper's kept basket at ``ts`` (``item`` left out), and whether ``item`` is one."""
    try:
        j = state.baskets.index(ts)
    except ValueError:
        return [], False
    bit = 1 << j
    lines = [other for other, bits in state.basket_bits.items() if bits & bit]
    in_it = item in lines
    return [x for x in lines if x != item], in_it


def _pop_dict(pop: Popularity) -> dict[str, Any]:
    return {"entries": {k: list(v) for k, v in pop.entries.items()}, "newest_ts": pop.newest_ts, "first_seen": pop.first_seen}


def _pop_from(obj: Mapping[str, Any], half_life_s: float) -> Popularity:
    entries = {k: (float(v[0]), float(v[1])) for k, v in obj["entries"].items()}
    return Popularity(half_life_s, entries, float(obj["newest_ts"]), dict(obj["first_seen"]))


def normalised(scores: Mapping[str, float]) -> dict[str, float]:
    """Scores over their maximum (as serving's popularity cache holds them); {} when none is positive."""
    top = max(scores.values(), default=0.0)
    if top <= 0:
        return {}
    return {k: v / top for k, v in scores.items() if v > 0}


# -- nearest shoppers' signals ---------------------------------------------------------------


class ItemCodes:
    """Item ids as small ints, for the life of the process: one code per id, never reused.

    Lets per-shopper summaries that are cached across requests (:class:`NeighbourSummary`)
    hold numpy arrays of items that stay valid whatever else is added. Appends only, so
    memory is one entry per distinct item ever coded (the catalog).
    """

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.names: list[str] = []
        self._lock = threading.Lock()

    def encode(self, items: Sequence[str]) -> np.ndarray:
        codes = self.codes
        missing = [i for i in items if i not in codes]
        if missing:
            with self._lock:  # serving's threads code new items concurrently
                for item in missing:
                    if item not in codes:
                        self.names.append(item)
                        codes[item] = len(self.names) - 1
        return np.fromiter(map(codes.__getitem__, items), dtype=np.int64, count=len(items))

    def decode(self, codes: np.ndarray) -> list[str]:
        return list(map(self.names.__getitem__, codes.tolist()))


ITEM_CODES = ItemCodes()


@dataclass(frozen=True, slots=True)
class NeighbourSummary:
    """What :func:`neighbour_signals` reads of one neighbour's state, computed once per state.

    ``codes``/``scores``: the basket counts (``UserState.basket_scores``) as arrays, items
    coded by :data:`ITEM_CODES`, in the dict's order; ``top`` their maximum (0 without a
    basket); ``purchases``: (item, ts) of the purchases in the history, newest first.
    Serving keeps these per stored state (its decode cache), so a popular neighbour's
    summary is computed once, not once per request that finds them.
    """

    user_id: str
    codes: np.ndarray
    scores: np.ndarray
    top: float
    purchases: tuple[tuple[str, float], ...]
    # ``purchases`` as arrays (items coded by ITEM_CODES), for the vectorised recent sum
    purchase_codes: np.ndarray
    purchase_ts: np.ndarray


def neighbour_summary(state: UserState, basket_decay: float) -> NeighbourSummary:
    """The summary of one neighbour's state (``basket_decay``: ``Settings.repeat_basket_decay``)."""
    scores = state.basket_scores(basket_decay)
    purchases = tuple((it.item_id, it.ts) for it in state.history if it.kind == "purchase")
    return NeighbourSummary(
        user_id=state.user_id,
        codes=ITEM_CODES.encode(list(scores)),
        scores=np.fromiter(scores.values(), dtype=np.float64, count=len(scores)),
        top=max(scores.values(), default=0.0),
        purchases=purchases,
        purchase_codes=ITEM_CODES.encode([item for item, _ in purchases]),
        purchase_ts=np.fromiter((ts for _, ts in purchases), dtype=np.float64, count=len(purchases)),
    )


def neighbour_signals(
    neighbours: Iterable[tuple[float, UserState | NeighbourSummary]],
    now_ts: float,
    basket_decay: float,
    recent_s: float,
    recent_half_life_s: float,
) -> tuple[dict[str, float], dict[str, float]]:
    """(neighbours' basket counts, their recent purchases) per item, similarity-weighted, each scaled to max 1.

    Each neighbour's basket counts are first scaled by their own maximum, so a heavy
    buyer does not drown the others; recent purchases are those within ``recent_s``
    before ``now_ts``, weighted ``2 ** -(age / recent_half_life_s)`` (the study's
    30 days and 7-day half-life). A neighbour is a state or its :func:`neighbour_summary`
    (the same result).

    The sums run neighbour by neighbour in the given order (``np.bincount`` adds in array
    order), so every value is the very float a per-item loop over the neighbours gives:
    the recent weights are ``math.exp2`` of the same quotients (numpy's ``exp2`` differs
    from it in the last bit for ~5 % of arguments), and a history is newest first, so the
    purchases within the window are the ones a loop that skips future purchases and stops
    at the first too old one would visit.
    """
    codes: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    r_codes: list[np.ndarray] = []
    r_ts: list[np.ndarray] = []
    r_sims: list[float] = []
    for sim, nb in neighbours:
        if sim <= 0:
            continue
        summary = nb if isinstance(nb, NeighbourSummary) else neighbour_summary(nb, basket_decay)
        if summary.top > 0:
            codes.append(summary.codes)
            weights.append(sim * summary.scores / summary.top)  # (sim * v) / top, as the scalar rule
        if summary.purchase_ts.size:
            r_codes.append(summary.purchase_codes)
            r_ts.append(summary.purchase_ts)
            r_sims.append(sim)
    return _normalised_sums(codes, weights), _recent_sums(r_codes, r_ts, r_sims, now_ts, recent_s, recent_half_life_s)


def _recent_sums(
    codes: list[np.ndarray], ts: list[np.ndarray], sims: list[float], now_ts: float, recent_s: float, half_life_s: float
) -> dict[str, float]:
    """``normalised`` of sum over neighbours of ``sim * decay_factor(age, half_life_s)`` per item bought
    within ``recent_s`` before ``now_ts`` (neighbour by neighbour, each newest first)."""
    if not ts:
        return {}
    age = now_ts - np.concatenate(ts)
    keep = (age >= 0.0) & (age <= recent_s)
    if not keep.any():
        return {}
    sim = np.repeat(np.asarray(sims, dtype=np.float64), [len(t) for t in ts])[keep]
    decay = np.fromiter(map(math.exp2, (-age[keep] / half_life_s).tolist()), dtype=np.float64, count=int(keep.sum()))
    return _normalised_sums([np.concatenate(codes)[keep]], [sim * decay])


def code_sums(codes: list[np.ndarray], weights: list[np.ndarray]) -> dict[str, float]:
    """Per item, the sum of its ``weights`` (items as ITEM_CODES), added in array order: the
    floats of ``out[item] = out.get(item, 0.0) + w`` over the arrays in turn."""
    if not codes:
        return {}
    uniq, where = np.unique(np.concatenate(codes), return_inverse=True)
    sums = np.bincount(where, weights=np.concatenate(weights), minlength=uniq.size)
    return dict(zip(ITEM_CODES.decode(uniq), sums.tolist(), strict=True))


def _normalised_sums(codes: list[np.ndarray], weights: list[np.ndarray]) -> dict[str, float]:
    """``normalised`` of the per-item sums of ``weights`` (summed in the given order)."""
    if not codes:
        return {}
    uniq, where = np.unique(np.concatenate(codes), return_inverse=True)
    sums = np.bincount(where, weights=np.concatenate(weights), minlength=uniq.size)
    top = float(sums.max())
    if top <= 0:
        return {}
    keep = sums > 0
    return dict(zip(ITEM_CODES.decode(uniq[keep]), (sums[keep] / top).tolist(), strict=True))
