"""TIFU-KNN, the published next-basket baseline, replayed prequentially (``tifuknn``).

Hu, He, Gao, Zhang, "Modeling Personalized Item Frequency Information for Next-basket
Recommendation", SIGIR 2020. It is here because it is the strongest simple published
method for re-order-heavy shops: a baseline the system has to beat, not part of it.

The method, as implemented:

- A basket is one shopper's purchases at one timestamp (the protocol's basket), as a
  multi-hot vector (items de-duplicated). Returns are ignored: the paper has none.
- A shopper's ``n`` baskets (oldest first) are cut into groups of ``group_size`` (m)
  consecutive baskets counted back from the newest, so the newest group is full and the
  oldest holds the remainder. A group of ``l`` baskets is
  ``g = 1/l * sum_j r_b ** (l - j) * b_j`` (j = 1..l, the newest weighs 1); the shopper's
  vector is ``v = 1/G * sum_i r_g ** (G - i) * g_i`` over the ``G`` groups (the newest
  weighs 1). The paper's reference code instead splits a history into a fixed number of
  near-equal groups; a fixed group size keeps the newest baskets' weights stable as a
  history grows, which is what a stream needs.
- Neighbours: the ``k`` shoppers whose vectors are nearest by cosine similarity
  (``metric="cosine"``, the default) or Euclidean distance (``metric="euclidean"``, the
  paper's choice), the shopper excluded; ties go to the lower shopper index.
- Prediction: ``p = alpha * v_u + (1 - alpha) * mean of the neighbours' vectors``
  (divided by the neighbours found when fewer than ``k`` exist).
- Items with ``p > 0`` rank first by ``p``; the rest, and every item for a shopper with
  no basket yet, by fresh popularity (14-day half-life), as the other baselines do, so a
  cold shopper gets the same list as ``popularity``.

Streaming: the neighbour matrix (one sparse row per shopper with a basket) is rebuilt
at the first basket of each day of event time from the shoppers' current vectors, and a
query is one sparse matrix-vector product against it; the querying shopper's own vector
is always current. Neighbours are therefore as of the start of the basket's day (at
most one day stale), never later than the basket.

Parameters: chosen on the validation window only (history < 2011-03-01, scoring
2011-03-01 .. 2011-05-31, 3,991 baskets; ``python -m bench.tifuknn_grid``, all figures in
docs/bench/tifuknn_grid.json), by Recall@10 on ``all``, over 254 settings in three
stages: (1) cosine against Euclidean at the paper's common setting (m 7, r_b 0.9,
r_g 0.7, k in {100, 300, 900}, alpha in {0.7, 0.9}): cosine 0.2606, Euclidean 0.2603,
so cosine; (2) m in {3, 7, 14} x r_b in {0.9, 1.0} x r_g in {0.6, 0.7, 0.9} x k in
{100, 300, 900} x alpha in {0.5, 0.7, 0.8, 0.9}; (3) past stage 2's edge, m in {1, 2}
x r_b in {0.9, 1.0} x r_g in {0.6, 0.7} x k in {100, 300} x alpha in {0.7, 0.8}.
Chosen (the defaults below): m 3, r_b 1.0, r_g 0.7, k 300, alpha 0.8, cosine: 0.2662
on ``all`` (``repeat`` 0.2593 in the same run), 0.2829 ``warm``, 0.0611 ``explore``,
0.0007 ``new``. The best of each other group size: m 1 0.2566, m 2 0.2646, m 7 0.2633,
m 14 0.2618; the top dozen settings lie within 0.0015 of each other, so the optimum is
flat, not sharp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp

from .baselines import POPULARITY_HALF_LIFE_DAYS, DecayedCounts
from .data import PURCHASE, EventLog

DAY_S = 86400.0
Metric = Literal["cosine", "euclidean"]


@dataclass(frozen=True)
class TifuParams:
    """The five TIFU-KNN parameters and the neighbour metric (defaults: the validation grid's best)."""

    group_size: int = 3  # m
    r_b: float = 1.0  # within-group decay
    r_g: float = 0.7  # across-group decay
    k: int = 300  # neighbours
    alpha: float = 0.8  # weight of the shopper's own vector
    metric: Metric = "cosine"

    def vector_key(self) -> tuple[int, float, float, str]:
        """What the shopper vectors and the neighbour search depend on (k and alpha do not)."""
        return (self.group_size, self.r_b, self.r_g, self.metric)


def basket_weights(n: int, group_size: int, r_b: float, r_g: float) -> np.ndarray:
    """Weight of each of ``n`` baskets (oldest first) in the shopper's vector.

    weight(p) = 1/G * r_g ** q * 1/l_q * r_b ** ((n - 1 - p) mod m), where q is the
    basket's group counted from the newest (0) and l_q that group's size.
    """
    if n == 0:
        return np.zeros(0)
    m = group_size
    back = n - 1 - np.arange(n)  # 0 for the newest basket
    q = back // m
    n_groups = (n + m - 1) // m
    sizes = np.full(n_groups, m, dtype=np.float64)
    sizes[-1] = n - m * (n_groups - 1)
    return (r_g**q) * (r_b ** (back % m)) / sizes[q] / n_groups


def user_vector(baskets: list[np.ndarray], group_size: int, r_b: float, r_g: float) -> tuple[np.ndarray, np.ndarray]:
    """(item indices ascending, values) of the TIFU vector of ``baskets`` (oldest first, items unique)."""
    if not baskets:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    w = basket_weights(len(baskets), group_size, r_b, r_g)
    items = np.concatenate(baskets).astype(np.int64)
    weights = np.repeat(w, [b.size for b in baskets])
    idx, inv = np.unique(items, return_inverse=True)
    return idx, np.bincount(inv, weights=weights, minlength=idx.size)


class TifuState:
    """What every TIFU-KNN with the same vector parameters shares: baskets, vectors, neighbours.

    Several :class:`TifuKnnMethod` (different ``k`` or ``alpha``) may share one state; it
    ingests each log range once, however many methods pass it on, and answers a
    neighbour query for ``(user, now)`` once, sorted up to the largest ``k`` asked of it.
    """

    def __init__(
        self, n_users: int, n_items: int, group_size: int, r_b: float, r_g: float, metric: Metric = "cosine",
        popularity_half_life_days: float = POPULARITY_HALF_LIFE_DAYS,
    ) -> None:
        if group_size < 1 or not (0 < r_b <= 1 and 0 < r_g <= 1):
            raise ValueError("group_size must be >= 1 and the decays in (0, 1]")
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be cosine or euclidean, not {metric!r}")
        self.n_users, self.n_items = n_users, n_items
        self.group_size, self.r_b, self.r_g, self.metric = group_size, r_b, r_g, metric
        self.pop = DecayedCounts(n_items, popularity_half_life_days)
        self.baskets: dict[int, list[np.ndarray]] = {}
        self.vectors: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.dirty: set[int] = set()
        self.k_max = 1
        self._next = 0  # first log row not yet ingested
        self._day: int | None = None
        self._rows = np.zeros(0, dtype=np.int64)  # matrix row -> shopper
        self._row_of: dict[int, int] = {}
        self._matrix: sp.csr_matrix | None = None  # raw vectors, one row per shopper with a basket
        self._search: sp.csr_matrix | None = None  # the rows the metric multiplies (unit rows for cosine)
        self._sq_norms = np.zeros(0)
        self._query: tuple[int, float, int, np.ndarray] | None = None  # (user, now, k asked, rows)
        self._means: tuple[tuple[int, float], dict[int, np.ndarray]] | None = None  # (user, now) -> k -> mean
        self.rebuilds = 0

    def observe(self, log: EventLog, start: int, stop: int) -> None:
        """Ingest ``log[start:stop]`` (one timestamp) unless a sharing method already did."""
        if start < self._next:
            return
        self._next = stop
        sel = log.kind[start:stop] == PURCHASE
        if not sel.any():
            return
        users = log.user[start:stop][sel]
        items = log.item[start:stop][sel]
        self.pop.add(items, float(log.ts[start]))
        for u in np.unique(users).tolist():
            self.baskets.setdefault(u, []).append(np.unique(items[users == u]).astype(np.int64))
            self.dirty.add(u)

    def vector(self, user: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The shopper's current vector (recomputed when a basket arrived since); None without baskets."""
        if user in self.dirty:
            self.vectors[user] = user_vector(self.baskets[user], self.group_size, self.r_b, self.r_g)
            self.dirty.discard(user)
        return self.vectors.get(user)

    def _rebuild(self) -> None:
        for u in list(self.dirty):
            self.vector(u)
        users = np.fromiter(sorted(self.vectors), dtype=np.int64, count=len(self.vectors))
        self._rows = users
        self._row_of = {int(u): r for r, u in enumerate(users.tolist())}
        if users.size == 0:
            self._matrix = self._search = None
            return
        parts = [self.vectors[int(u)] for u in users]
        indptr = np.concatenate(([0], np.cumsum([idx.size for idx, _ in parts])))
        indices = np.concatenate([idx for idx, _ in parts])
        data = np.concatenate([val for _, val in parts])
        self._matrix = sp.csr_matrix((data, indices, indptr), shape=(users.size, self.n_items))
        self._sq_norms = np.asarray(self._matrix.multiply(self._matrix).sum(axis=1)).ravel()
        if self.metric == "cosine":
            inv = 1.0 / np.sqrt(np.maximum(self._sq_norms, 1e-300))
            self._search = sp.csr_matrix(sp.diags(inv) @ self._matrix)
        else:
            self._search = self._matrix
        self.rebuilds += 1

    def neighbours(self, user: int, now: float, k: int) -> np.ndarray:
        """Matrix rows of the ``k`` nearest other shoppers, nearest first (as of the start of ``now``'s day)."""
        day = int(now // DAY_S)
        if day != self._day:
            self._rebuild()
            self._day = day
            self._query = None
        if self._query is not None and self._query[:2] == (user, now) and k <= self._query[2]:
            return self._query[3][:k]
        own = self.vector(user)
        if own is None or self._search is None:
            return np.zeros(0, dtype=np.int64)
        idx, val = own
        q = np.zeros(self.n_items)
        q[idx] = val
        dot = self._search @ q
        if self.metric == "cosine":
            closeness = dot / np.sqrt(float(val @ val))
        else:  # smaller distance is closer: negate squared Euclidean distance
            closeness = -(self._sq_norms + float(val @ val) - 2.0 * dot)
        me = self._row_of.get(user)
        if me is not None:
            closeness[me] = -np.inf
        n_cand = closeness.size - (me is not None)
        asked = max(k, self.k_max)
        want = min(asked, n_cand)
        if want <= 0:
            return np.zeros(0, dtype=np.int64)
        if want < closeness.size:
            kth = np.partition(closeness, closeness.size - want)[closeness.size - want]
            cand = np.flatnonzero(closeness >= kth)
        else:
            cand = np.arange(closeness.size)
        cand = cand[np.isfinite(closeness[cand])]
        order = cand[np.lexsort((cand, -closeness[cand]))][:want]
        self._query = (user, now, asked, order)
        return order[:k]

    def neighbour_mean(self, rows: np.ndarray) -> np.ndarray:
        """Mean of the given matrix rows' raw vectors, dense over items."""
        if rows.size == 0 or self._matrix is None:
            return np.zeros(self.n_items)
        return np.asarray(self._matrix[rows].sum(axis=0)).ravel() / rows.size

    def neighbourhood(self, user: int, now: float, k: int) -> np.ndarray:
        """Mean vector of the ``k`` nearest shoppers; methods differing only in alpha share it."""
        if self._means is None or self._means[0] != (user, now):
            self._means = ((user, now), {})
        means = self._means[1]
        if k not in means:
            means[k] = self.neighbour_mean(self.neighbours(user, now, k))
        return means[k]

    def shopper_of(self, rows: np.ndarray) -> np.ndarray:
        """Shopper indices of matrix rows (for tests and studies)."""
        return self._rows[rows]


def rank_with_popularity(pred: np.ndarray, pop_norm: np.ndarray) -> np.ndarray:
    """Scores that rank items with ``pred > 0`` by ``pred`` and then everything else by popularity.

    Predicted items score 2 + pred/max(pred), above any popularity in [0, 1].
    """
    s = pop_norm.copy()
    hit = pred > 0
    if hit.any():
        s[hit] = 2.0 + pred[hit] / pred[hit].max()
    return s


class TifuKnnMethod:
    """``tifuknn`` for the protocol (see the module docstring); deterministic, so not seeded."""

    seeded = False

    def __init__(self, state: TifuState, k: int, alpha: float, name: str = "tifuknn") -> None:
        if k < 1 or not 0.0 <= alpha <= 1.0:
            raise ValueError("k must be >= 1 and alpha in [0, 1]")
        self.name, self.state, self.k, self.alpha = name, state, k, alpha
        state.k_max = max(state.k_max, k)

    def observe(self, log: EventLog, start: int, stop: int) -> None:
        self.state.observe(log, start, stop)

    def advance(self, now: float) -> None:
        pass

    def prediction(self, user: int, now: float) -> np.ndarray | None:
        """The TIFU-KNN prediction vector over items; None for a shopper with no basket."""
        own = self.state.vector(user)
        if own is None:
            return None
        pred = (1.0 - self.alpha) * self.state.neighbourhood(user, now, self.k)
        pred[own[0]] += self.alpha * own[1]
        return pred

    def scores(self, user: int, now: float) -> np.ndarray:
        pop = self.state.pop.normalised()
        pred = self.prediction(user, now)
        return pop if pred is None else rank_with_popularity(pred, pop)


def build_tifuknn(log: EventLog, params: TifuParams | None = None, name: str = "tifuknn") -> TifuKnnMethod:
    """A ``tifuknn`` method over ``log``'s id spaces with ``params`` (default: the chosen ones)."""
    p = params or TifuParams()
    state = TifuState(log.n_users, log.n_items, p.group_size, p.r_b, p.r_g, p.metric)
    return TifuKnnMethod(state, p.k, p.alpha, name)
