"""Candidates and ranking features: one module for the streams, the evaluation and serving.

The ranker learns on rows computed here and is served rows computed here (invariant 5 of
DESIGN.md: no feature is computed one way for training and another for serving). Each
caller only *gathers* the inputs, in plain data, from where it keeps state:

* the collaborative flow from its in-memory state, to label ranking examples;
* ``freshrec eval`` from its in-process replay;
* serving from Redis (user states, co-purchase rows, item statistics, popularity) and
  FAISS (nearest items, nearest shoppers).

The inputs are a :class:`ShopView` (shop-wide: popularity at three horizons, first-seen
times, basket and buyer counts) and a :class:`ShopperView` (the shopper's
:class:`~ranking.user_state.UserState`, the co-purchase rows of the items in their
profile, and their nearest shoppers' states). :func:`shopper_signals` turns a shopper
view into per-item signals once; :func:`candidates` picks the items to rank, each with
the sources that proposed it; :func:`feature_matrix` computes one row per candidate.
A row depends only on its item, the shopper and the shop, never on the other
candidates, so filtering the candidates (serving drops items missing from its index)
leaves every other row unchanged.

The columns (:data:`FEATURE_NAMES`) are the ones docs/ranker_study.md measured, less the
re-order timing group (it added nothing there). "Baskets" are those the shopper's state
keeps (``stream_baskets_kept``, 63 by default). ``sim`` is the active encoder's cosine to
the user vector, mapped by the version's similarity scale: :func:`similarity_column`
computes it where item vectors are (the evaluation, serving, the learner); the streams
have no vectors and leave it to the learner.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
import itertools
from typing import Any

import numpy as np

from .collab import (
    ITEM_CODES,
    CodedRow,
    CollabState,
    NeighbourSummary,
    code_sums,
    cosine,
    neighbour_signals,
    normalised,
    reorder_ratio,
)
from .scoring import IDENTITY_SCALE, SimilarityScale, history_weights, user_vector
from .user_state import DAY_S, Popularity, UserState

FEATURE_NAMES: tuple[str, ...] = (
    # what the blend uses
    "log_repeat",
    "log_pop",
    "sim",
    "new",
    # the shopper's own state
    "log_baskets_with",
    "log_share",
    "log_days_since_basket",
    "log_days_since_item",
    "log_pop_short",
    "log_pop_long",
    # co-purchase
    "log_cooc",
    "log_cooc_last",
    "in_last_basket",
    "log_buyers",
    # nearest shoppers and re-ordering
    "log_knn",
    "log_neighbour_recent",
    "log_reorder_ratio",
)
# Changes whenever the columns or their meaning change; a ranker trained on another schema
# is refused by serving (it falls back to the blend). f2: the co-purchase columns are cosines.
# f3: they read the rows of 200 strongest items and 200 last-basket lines, not 20 and 20
# (docs/ranker_study.md, "The gap is in the co-purchase columns"). The rules' sizes are not
# in the schema: the flows, the learner and serving must run with the same ranker_* settings.
FEATURE_SCHEMA = "f3-" + hashlib.sha1(",".join(FEATURE_NAMES).encode()).hexdigest()[:8]
COLUMN = {name: k for k, name in enumerate(FEATURE_NAMES)}

# Where a candidate came from: bit flags, several may be set.
OWN, COPURCHASE, NEIGHBOURS, ANN, POPULAR, NEW = 1, 2, 4, 8, 16, 32
SOURCE_NAMES = {OWN: "own", COPURCHASE: "copurchase", NEIGHBOURS: "neighbours", ANN: "ann", POPULAR: "popular", NEW: "new"}

REPEAT_FLOOR = 0.005  # as ranking.scoring.LogBlendWeights: a never-bought item's log repeat
POP_FLOOR = 1e-3
SIGNAL_FLOOR = 1e-3


@dataclass(frozen=True, slots=True)
class FeatureRules:
    """How many candidates each source proposes and the windows of the signals (settings ``ranker_*``)."""

    copurchase: int = 50
    neighbours: int = 50
    ann: int = 100
    popular: int = 100
    new: int = 100
    profile_items: int = 200  # own items whose co-purchase rows are read (Settings.ranker_profile_items)
    last_basket_items: int = 200  # lines of the last basket whose rows are read
    shrink: float = 10.0  # of the co-purchase cosine (ranking.collab.cosine), as CollabRules.shrink
    basket_decay: float = 0.9  # Settings.repeat_basket_decay
    new_s: float = 30 * DAY_S  # Settings.blend_new_days
    recent_s: float = 30 * DAY_S
    recent_half_life_s: float = 7 * DAY_S
    user_half_life_s: float = 30 * DAY_S  # Settings.user_vector_half_life_days

    @classmethod
    def from_settings(cls, settings: Any) -> FeatureRules:
        return cls(
            copurchase=settings.ranker_copurchase_candidates,
            neighbours=settings.ranker_neighbour_candidates,
            ann=settings.ranker_ann_candidates,
            popular=settings.ranker_popular_candidates,
            new=settings.ranker_new_candidates,
            profile_items=settings.ranker_profile_items,
            last_basket_items=settings.ranker_last_basket_items,
            basket_decay=settings.repeat_basket_decay,
            new_s=settings.blend_new_days * DAY_S,
            user_half_life_s=settings.user_vector_half_life_days * DAY_S,
        )


@dataclass(frozen=True, slots=True)
class ShopColumns:
    """A :class:`ShopView`'s per-item maps as arrays over one item index (:func:`with_columns`).

    Row ``len(index)`` holds what a missing item counts as (0, never seen). Built once per
    shop view by whoever ranks many shoppers against the same view (serving), so a
    request gathers six columns with one index lookup per candidate instead of six.
    """

    index: dict[str, int]
    popularity: np.ndarray
    pop_short: np.ndarray
    pop_long: np.ndarray
    first_seen: np.ndarray
    baskets: np.ndarray
    buyers: np.ndarray
    # ``baskets`` by ITEM_CODES code (codes given after the view was built: 0), for the
    # vectorised co-purchase cosines of serving's coded rows
    baskets_by_code: np.ndarray

    def rows(self, items: Sequence[str]) -> np.ndarray:
        return np.fromiter(map(self.index.get, items, itertools.repeat(len(self.index))), dtype=np.intp, count=len(items))


@dataclass(frozen=True, slots=True)
class ShopView:
    """Shop-wide inputs at ``now_ts`` (event time). Missing items count as 0 / never seen.

    ``popularity`` is served popularity, ``pop_short``/``pop_long`` the two horizons, all
    normalised to a maximum of 1 over the whole catalog (``ranking.collab.normalised``).
    ``popular_top`` is the served popularity order, best first; ``new_items`` the new
    arrivals in the order candidates take them (newest first, then by id). ``columns``,
    when set (:func:`with_columns`), holds the same maps as arrays; it does not depend
    on ``now_ts``, so a view moved to another "now" (``dataclasses.replace``) keeps it.
    """

    now_ts: float
    popularity: Mapping[str, float] = field(default_factory=dict)
    pop_short: Mapping[str, float] = field(default_factory=dict)
    pop_long: Mapping[str, float] = field(default_factory=dict)
    first_seen: Mapping[str, float] = field(default_factory=dict)
    baskets: Mapping[str, int] = field(default_factory=dict)
    buyers: Mapping[str, int] = field(default_factory=dict)
    popular_top: Sequence[str] = ()
    new_items: Sequence[str] = ()
    columns: ShopColumns | None = field(default=None, compare=False, repr=False)


def with_columns(shop: ShopView) -> ShopView:
    """The view with :class:`ShopColumns` built from its own maps (a catalog-sized pass: once per view)."""
    maps = (shop.popularity, shop.pop_short, shop.pop_long, shop.first_seen, shop.baskets, shop.buyers)
    defaults = (0.0, 0.0, 0.0, math.inf, 0.0, 0.0)
    index: dict[str, int] = {}
    for m in maps:
        index.update(dict.fromkeys(m))
    index = {item: k for k, item in enumerate(index)}
    arrays = []
    for m, default in zip(maps, defaults, strict=True):
        a = np.full(len(index) + 1, default, dtype=np.float64)
        if m:
            rows = np.fromiter(map(index.__getitem__, m), dtype=np.intp, count=len(m))
            a[rows] = np.fromiter(m.values(), dtype=np.float64, count=len(m))
        arrays.append(a)
    codes = ITEM_CODES.encode(list(shop.baskets))
    by_code = np.zeros(int(codes.max()) + 1 if len(codes) else 0, dtype=np.float64)
    by_code[codes] = np.fromiter(shop.baskets.values(), dtype=np.float64, count=len(codes))
    return dataclasses.replace(shop, columns=ShopColumns(index, *arrays, by_code))


def new_items_order(
    first_seen: Mapping[str, float], now_ts: float, new_s: float, limit: int | None = None
) -> list[str]:
    """New arrivals (first seen within ``new_s`` of ``now_ts``, not after it), newest first,
    then by id; only the first ``limit`` of that order when given.

    The window test runs in numpy (the same IEEE subtraction and comparisons as
    ``0.0 <= now_ts - ts <= new_s`` per item), and with a ``limit`` only the arrivals at or
    after the ``limit``-th newest time are sorted: this runs over every item for every
    basket in the collab flow and the evaluation.
    """
    if not first_seen or (limit is not None and limit <= 0):
        return []
    ts = np.fromiter(first_seen.values(), dtype=np.float64, count=len(first_seen))
    age = now_ts - ts
    hits = np.flatnonzero((age >= 0.0) & (age <= new_s))
    if not len(hits):
        return []
    if limit is not None and len(hits) > limit:
        times = ts[hits]
        cut = np.partition(times, len(times) - limit)[len(times) - limit]  # the limit-th newest: ties kept
        hits = hits[times >= cut]
    keys = list(first_seen)
    fresh = [(-float(ts[r]), keys[r]) for r in hits.tolist()]
    fresh.sort()
    return [item for _, item in fresh[:limit]]


def shop_view_at(collab: CollabState, served: Popularity, ts: float, rules: FeatureRules) -> ShopView:
    """The contract's ShopView the collab flow and the evaluation compute at a basket's time
    ``ts``: the three popularities normalised, item stats, the served order (its first
    ``rules.popular``, all that :func:`candidates` reads) and the new arrivals.

    One function for both paths (serving builds its view from what Redis holds,
    ``serving.shop_view``). It runs over every item per basket: the collab flow's largest
    cost at 20,000 items (docs/scale.md), hence :func:`top_items` and the numpy window of
    :func:`new_items_order`.
    """
    popularity = normalised(served.scores(ts))
    first_seen = collab.pop_long.first_seen
    return ShopView(
        now_ts=ts,
        popularity=popularity,
        pop_short=normalised(collab.pop_short.scores(ts)),
        pop_long=normalised(collab.pop_long.scores(ts)),
        first_seen=first_seen,
        baskets=collab.stats.baskets,
        buyers=collab.stats.buyers,
        popular_top=top_items(popularity, rules.popular),
        new_items=new_items_order(first_seen, ts, rules.new_s, rules.new),  # all that candidates() reads
    )


def top_items(scores: Mapping[str, float], n: int) -> list[str]:
    """The ``n`` items of largest score, best first, ties by id: ``heapq.nsmallest(n, ...,
    key=(-score, id))`` exactly, found by a numpy partition over the scores and a sort of
    only those at or above the ``n``-th largest (every tie with it kept)."""
    if n <= 0 or not scores:
        return []
    values = np.fromiter(scores.values(), dtype=np.float64, count=len(scores))
    keys = list(scores)
    if len(values) > n:
        cut = np.partition(values, len(values) - n)[len(values) - n]
        pool = [(-float(values[r]), keys[r]) for r in np.flatnonzero(values >= cut).tolist()]
    else:
        pool = [(-float(v), k) for v, k in zip(values.tolist(), keys, strict=True)]
    pool.sort()
    return [k for _, k in pool[:n]]


@dataclass(frozen=True, slots=True)
class ShopperView:
    """One shopper's inputs: their state, the co-purchase rows of :func:`rows_needed`, their neighbours.

    ``copurchase`` maps an item to its decayed row (``ranking.collab.decayed_row``: the
    items its stored row keeps, the most specific partners by cosine, and the item's own
    basket count under its own id).
    ``neighbours`` are (similarity, state) of the nearest shoppers, best first; a state
    may be given as its ``ranking.collab.neighbour_summary`` (serving caches those).
    """

    state: UserState
    copurchase: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    neighbours: Sequence[tuple[float, UserState | NeighbourSummary]] = ()


def profile(state: UserState, rules: FeatureRules) -> tuple[dict[str, float], list[str]]:
    """(the shopper's strongest items with weights in (0, 1], the lines of their last basket)."""
    return _profile(state, state.basket_scores(rules.basket_decay), rules)


def _profile(state: UserState, scores: Mapping[str, float], rules: FeatureRules) -> tuple[dict[str, float], list[str]]:
    top = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[: rules.profile_items]
    peak = top[0][1] if top else 0.0
    weights = {item: v / peak for item, v in top} if peak > 0 else {}
    last = sorted(item for item, bits in state.basket_bits.items() if bits & 1)[: rules.last_basket_items] if state.baskets else []
    return weights, last


def rows_needed(state: UserState, rules: FeatureRules) -> list[str]:
    """The items whose co-purchase rows a :class:`ShopperView` must carry (profile, then last basket)."""
    weights, last = profile(state, rules)
    return list(dict.fromkeys([*weights, *last]))


@dataclass(frozen=True, slots=True)
class ShopperSignals:
    """Per-item signals of one shopper, computed once (:func:`shopper_signals`)."""

    state: UserState
    repeat: dict[str, float]  # basket scores over their maximum
    baskets_with: dict[str, int]
    last_bought: dict[str, float]
    last_basket: frozenset[str]
    n_baskets: int
    last_basket_ts: float | None
    cooc: dict[str, float]
    cooc_last: dict[str, float]
    knn: dict[str, float]
    recent: dict[str, float]


def shopper_signals(view: ShopperView, now_ts: float, rules: FeatureRules, shop: ShopView) -> ShopperSignals:
    """Everything per item that the candidates and the features of one shopper read
    (``shop``: the items' basket counts, the co-purchase cosines' denominators)."""
    state = view.state
    scores = state.basket_scores(rules.basket_decay)
    peak = max(scores.values(), default=0.0)
    repeat = {item: v / peak for item, v in scores.items()} if peak > 0 else {}
    baskets_with: dict[str, int] = {}
    last_bought: dict[str, float] = {}
    for item, bits in state.basket_bits.items():
        baskets_with[item] = bits.bit_count()
        last_bought[item] = state.baskets[(bits & -bits).bit_length() - 1]
    weights, last = _profile(state, scores, rules)
    cooc = _weighted_cosine(((w, item) for item, w in weights.items()), view.copurchase, shop, rules.shrink)
    cooc_last = _weighted_cosine(((1.0, item) for item in last), view.copurchase, shop, rules.shrink)
    knn, recent = neighbour_signals(view.neighbours, now_ts, rules.basket_decay, rules.recent_s, rules.recent_half_life_s)
    return ShopperSignals(
        state=state,
        repeat=repeat,
        baskets_with=baskets_with,
        last_bought=last_bought,
        last_basket=frozenset(item for item, bits in state.basket_bits.items() if bits & 1) if state.baskets else frozenset(),
        n_baskets=len(state.baskets),
        last_basket_ts=state.baskets[0] if state.baskets else None,
        cooc=cooc,
        cooc_last=cooc_last,
        knn=knn,
        recent=recent,
    )


def _weighted_cosine(
    weighted: Iterable[tuple[float, str]], rows: Mapping[str, Mapping[str, float]], shop: ShopView, shrink: float
) -> dict[str, float]:
    """Sum over rows of ``w * ranking.collab.cosine(count, n_item, n_other)``, row by row in the
    given order, ``n`` the shop's basket counts (``ShopView.baskets``; 0 when missing).

    Rows that carry arrays (serving's :class:`~ranking.collab.CodedRow`) against a view with
    columns are summed with ``np.bincount`` in the same order and the same float operations
    (``sqrt(n_a * n_b) + shrink``, then the quotient), which gives the floats of the loop below.
    """
    weighted = list(weighted)
    baskets = shop.baskets
    used = [(w, item, row) for w, item in weighted if (row := rows.get(item))]
    cols = shop.columns
    if used and cols is not None and all(isinstance(row, CodedRow) for _, _, row in used):
        by_code = cols.baskets_by_code
        codes, terms = [], []
        for w, item, row in used:
            n_b = np.zeros(len(row.codes), dtype=np.float64)
            known = row.codes < len(by_code)
            n_b[known] = by_code[row.codes[known]]
            n_a = float(baskets.get(item, 0))
            codes.append(row.codes)
            terms.append(w * (row.values / (np.sqrt(n_a * n_b) + shrink)))
        return code_sums(codes, terms)
    out: dict[str, float] = {}
    get = out.get
    for w, item in weighted:
        row = rows.get(item)
        if not row:
            continue
        n_a = baskets.get(item, 0)
        for other, v in row.items():
            if other != item:
                out[other] = get(other, 0.0) + w * cosine(v, n_a, baskets.get(other, 0), shrink)
    return out


# -- candidates --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidates:
    """Items to rank, in a fixed order, with the sources that proposed each (bit flags)."""

    items: list[str]
    sources: np.ndarray  # uint8, one per item

    def __len__(self) -> int:
        return len(self.items)

    def keep(self, mask: np.ndarray) -> Candidates:
        """The candidates where ``mask`` is true (e.g. present in serving's index)."""
        return Candidates([i for i, k in zip(self.items, mask.tolist(), strict=True) if k], self.sources[mask])


def _strongest(scores: Mapping[str, float], n: int) -> list[str]:
    """The ``n`` largest, ties by id: ``sorted(scores.items(), key=(-value, id))[:n]``.

    A neighbour signal holds ~2,000 items for 50 candidates: only those at or above the
    ``n``-th largest value (every tie with it included) are sorted.
    """
    if n <= 0:
        return []
    pool: Iterable[tuple[str, float]] = scores.items()
    if len(scores) > 2 * n:
        keys = list(scores)
        values = np.fromiter(scores.values(), dtype=np.float64, count=len(keys))
        cut = np.partition(values, len(keys) - n)[len(keys) - n]
        pool = [(keys[k], scores[keys[k]]) for k in np.flatnonzero(values >= cut).tolist()]
    return [item for item, _ in sorted(pool, key=lambda kv: (-kv[1], kv[0]))[:n]]


def candidates(sig: ShopperSignals, shop: ShopView, rules: FeatureRules, ann: Sequence[str] = ()) -> Candidates:
    """Own items (baskets and history), co-purchase and neighbour items, ``ann`` (nearest to the
    user vector, from the caller's index), popular and new items; first proposal fixes the order."""
    order: dict[str, int] = {}

    def add(items: Iterable[str], flag: int) -> None:
        for item in items:
            order[item] = order.get(item, 0) | flag

    add(sorted(sig.repeat, key=lambda i: (-sig.repeat[i], i)), OWN)
    add((it.item_id for it in sig.state.history if it.kind != "cancel"), OWN)
    co = dict(sig.cooc)
    for item, v in sig.cooc_last.items():
        co[item] = co.get(item, 0.0) + v
    add(_strongest(co, rules.copurchase), COPURCHASE)
    nb = dict(sig.knn)
    for item, v in sig.recent.items():
        nb[item] = nb.get(item, 0.0) + v
    add(_strongest(nb, rules.neighbours), NEIGHBOURS)
    add(list(ann)[: rules.ann], ANN)
    add(list(shop.popular_top)[: rules.popular], POPULAR)
    add(list(shop.new_items)[: rules.new], NEW)
    items = list(order)
    return Candidates(items, np.fromiter(order.values(), dtype=np.uint8, count=len(items)))


# -- features ----------------------------------------------------------------------------------


def _column(items: Sequence[str], values: Mapping[str, float], default: float = 0.0) -> np.ndarray:
    return np.fromiter(map(values.get, items, itertools.repeat(default)), dtype=np.float64, count=len(items))


def _shop_columns(shop: ShopView, items: Sequence[str]) -> tuple[np.ndarray, ...]:
    """(popularity, pop_short, pop_long, first_seen, baskets, buyers) of ``items``."""
    cols = shop.columns
    if cols is None:
        return (_column(items, shop.popularity), _column(items, shop.pop_short), _column(items, shop.pop_long),
                _column(items, shop.first_seen, math.inf), _column(items, shop.baskets), _column(items, shop.buyers))
    rows = cols.rows(items)
    return (cols.popularity[rows], cols.pop_short[rows], cols.pop_long[rows], cols.first_seen[rows],
            cols.baskets[rows], cols.buyers[rows])


def feature_matrix(sig: ShopperSignals, shop: ShopView, items: Sequence[str], similarity: np.ndarray, rules: FeatureRules) -> np.ndarray:
    """One float32 row per item, columns :data:`FEATURE_NAMES`; ``similarity`` is :func:`similarity_column`."""
    n = len(items)
    now = shop.now_ts
    if similarity.shape != (n,):
        raise ValueError(f"similarity has shape {similarity.shape}, expected ({n},)")
    baskets_with = _column(items, sig.baskets_with)
    last_bought = _column(items, sig.last_bought, math.nan)
    bought = baskets_with > 0
    days_item = np.where(bought, np.log1p(np.maximum((now - np.nan_to_num(last_bought)) / DAY_S, 0.0)), 0.0)
    since_basket = 0.0 if sig.last_basket_ts is None else math.log1p(max(now - sig.last_basket_ts, 0.0) / DAY_S)
    popularity, pop_short, pop_long, first_seen, item_baskets, item_buyers = _shop_columns(shop, items)
    age = now - first_seen
    cols = {
        "log_repeat": np.log(_column(items, sig.repeat) + REPEAT_FLOOR),
        "log_pop": np.log(np.maximum(popularity, 0.0) + POP_FLOOR),
        "sim": np.maximum(similarity.astype(np.float64), 0.0),
        "new": ((age >= 0.0) & (age <= rules.new_s)).astype(np.float64),
        "log_baskets_with": np.log1p(baskets_with),
        "log_share": np.log(baskets_with / max(sig.n_baskets, 1) + 0.01),
        "log_days_since_basket": np.full(n, since_basket),
        "log_days_since_item": days_item,
        "log_pop_short": np.log(np.maximum(pop_short, 0.0) + POP_FLOOR),
        "log_pop_long": np.log(np.maximum(pop_long, 0.0) + POP_FLOOR),
        "log_cooc": np.log(_column(items, sig.cooc) + SIGNAL_FLOOR),
        "log_cooc_last": np.log(_column(items, sig.cooc_last) + SIGNAL_FLOOR),
        "in_last_basket": np.fromiter(map(sig.last_basket.__contains__, items), dtype=np.float64, count=n),
        "log_buyers": np.log1p(item_buyers),
        "log_knn": np.log(_column(items, sig.knn) + SIGNAL_FLOOR),
        "log_neighbour_recent": np.log(_column(items, sig.recent) + SIGNAL_FLOOR),
        "log_reorder_ratio": np.log(reorder_ratio(item_baskets, item_buyers)),
    }
    out = np.empty((n, len(FEATURE_NAMES)), dtype=np.float32)
    for k, name in enumerate(FEATURE_NAMES):
        out[:, k] = cols[name]
    return out


def similarity_column(
    state: UserState,
    items: Sequence[str],
    vectors: Mapping[str, np.ndarray],
    rules: FeatureRules,
    scale: SimilarityScale = IDENTITY_SCALE,
) -> np.ndarray:
    """The ``sim`` column: cosine of each item to the user vector, mapped by the version's scale.

    The user vector is ``ranking.scoring.user_vector(history_weights(...))``, as the blend
    builds it, over ``vectors`` (one adapter version's; items without a vector get 0, as
    does every item when the shopper has no user vector).
    """
    hw = history_weights(state.history, state.last_ts, rules.user_half_life_s)
    uvec = user_vector(hw, vectors)
    out = np.zeros(len(items), dtype=np.float64)
    if uvec is None:
        return out
    for k, item in enumerate(items):
        vec = vectors.get(item)
        if vec is not None:
            out[k] = scale.apply(float(vec @ uvec))
    return out


def labels(items: Sequence[str], basket: Iterable[str]) -> np.ndarray:
    """1.0 for the candidates the shopper bought in the basket, else 0.0."""
    bought = set(basket)
    return np.fromiter((1.0 if i in bought else 0.0 for i in items), dtype=np.float32, count=len(items))
