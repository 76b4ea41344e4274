"""The baselines the system must beat, each a small stateful replayable method.

- ``popularity``: fresh popularity, purchase counts decayed with a 14-day half-life.
- ``repeat``: the shopper's own decayed purchase frequency; popularity breaks ties
  (and ranks everything the shopper never bought).
- ``cooccurrence``: item-to-item co-purchase similarity from past baskets, seeded by the
  shopper's decayed frequency, blended with that frequency and fresh popularity.

They are made strong on purpose (half-lives and blend weights chosen on the validation
window, as the system's were): a weak baseline would make the system's margin a
flattering fiction. Returns (cancels) are ignored by popularity and co-purchase counts
and subtract one decayed purchase from the shopper's frequency, as the system's user
state does.
"""

from __future__ import annotations

import math

import numpy as np

from .data import CANCEL, PURCHASE, EventLog

DAY_S = 86400.0
# The issue fixes the baselines' fresh popularity at a 14-day half-life.
POPULARITY_HALF_LIFE_DAYS = 14.0


def decay_factor(dt_s: float, half_life_days: float) -> float:
    """Weight left after ``dt_s`` seconds at the given half-life."""
    return math.pow(0.5, max(dt_s, 0.0) / (half_life_days * DAY_S))


class DecayedCounts:
    """Per-item purchase counts decayed to the newest event time (fresh popularity)."""

    def __init__(self, n_items: int, half_life_days: float) -> None:
        self.values = np.zeros(n_items, dtype=np.float64)
        self.half_life_days = half_life_days
        self.ts: float | None = None

    def add(self, items: np.ndarray, now: float) -> None:
        if self.ts is not None and now > self.ts:
            self.values *= decay_factor(now - self.ts, self.half_life_days)
        self.ts = now if self.ts is None else max(self.ts, now)
        np.add.at(self.values, items, 1.0)

    def normalised(self) -> np.ndarray:
        """Values scaled into [0, 1]; the common decay factor never changes a ranking."""
        top = self.values.max(initial=0.0)
        return self.values / top if top > 0 else self.values.copy()


class UserFrequency:
    """Each shopper's decayed purchase count per item; a return subtracts one purchase."""

    def __init__(self, half_life_days: float) -> None:
        self.half_life_days = half_life_days
        self.freq: dict[int, dict[int, float]] = {}
        self.ts: dict[int, float] = {}

    def apply(self, user: int, item: int, kind: int, now: float) -> None:
        if kind not in (PURCHASE, CANCEL):
            return
        f = self.freq.setdefault(user, {})
        last = self.ts.get(user)
        if last is not None and now > last and f:
            d = decay_factor(now - last, self.half_life_days)
            for k in f:
                f[k] *= d
        self.ts[user] = now if last is None else max(last, now)
        if kind == PURCHASE:
            f[item] = f.get(item, 0.0) + 1.0
        elif item in f:
            v = f[item] - 1.0
            if v > 1e-9:
                f[item] = v
            else:
                del f[item]

    def observe(self, log: EventLog, start: int, stop: int) -> None:
        now = float(log.ts[start])
        for u, i, k in zip(log.user[start:stop].tolist(), log.item[start:stop].tolist(), log.kind[start:stop].tolist()):
            self.apply(u, i, k, now)

    def items(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """(item indices, frequencies) of one shopper; empty arrays for a new one."""
        f = self.freq.get(user)
        if not f:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        return np.fromiter(f.keys(), dtype=np.int64, count=len(f)), np.fromiter(f.values(), dtype=np.float64, count=len(f))


def _purchases(log: EventLog, start: int, stop: int) -> np.ndarray:
    return log.item[start:stop][log.kind[start:stop] == PURCHASE]


class PopularityMethod:
    """Fresh popularity: the same list for everyone."""

    name = "popularity"

    def __init__(self, n_items: int, half_life_days: float = 14.0) -> None:
        self.pop = DecayedCounts(n_items, half_life_days)

    def observe(self, log: EventLog, start: int, stop: int) -> None:
        items = _purchases(log, start, stop)
        if items.size:
            self.pop.add(items, float(log.ts[start]))

    def advance(self, now: float) -> None:
        pass

    def scores(self, user: int, now: float) -> np.ndarray:
        return self.pop.values


def repeat_scores(items: np.ndarray, freq: np.ndarray, pop_norm: np.ndarray) -> np.ndarray:
    """Own frequency first, popularity only as the tie-break and for the rest.

    Bought items score 2 + freq/max(freq) (> every unbought item's pop in [0, 1]); the
    1e-6 * pop term orders equal frequencies without ever overriding a real difference.
    """
    s = pop_norm.copy()
    if items.size:
        s[items] = 2.0 + freq / freq.max() + 1e-6 * pop_norm[items]
    return s


class _OwnFrequencyAndPopularity:
    """What the repeat and co-occurrence baselines both keep: each shopper's decayed
    purchase frequency and everyone's decayed purchase counts."""

    def __init__(self, n_items: int, half_life_days: float, popularity_half_life_days: float) -> None:
        self.freq = UserFrequency(half_life_days)
        self.pop = DecayedCounts(n_items, popularity_half_life_days)

    def observe(self, log: EventLog, start: int, stop: int) -> None:
        self.freq.observe(log, start, stop)
        items = _purchases(log, start, stop)
        if items.size:
            self.pop.add(items, float(log.ts[start]))

    def advance(self, now: float) -> None:
        pass


class RepeatMethod(_OwnFrequencyAndPopularity):
    """The shopper's own decayed purchase frequency, popularity as tie-break."""

    name = "repeat"

    def __init__(self, n_items: int, half_life_days: float = 365.0, popularity_half_life_days: float = 14.0) -> None:
        super().__init__(n_items, half_life_days, popularity_half_life_days)

    def scores(self, user: int, now: float) -> np.ndarray:
        items, freq = self.freq.items(user)
        return repeat_scores(items, freq, self.pop.normalised())


class CoPurchase:
    """Item-item co-purchase counts over baskets (a basket = one user's purchases at one time).

    Dense float32 (n_items²): at this shop's 4.4k items it is 78 MB and a row read is a
    contiguous slice, which is what makes per-basket scoring cheap.
    """

    def __init__(self, n_items: int) -> None:
        self.counts = np.zeros((n_items, n_items), dtype=np.float32)
        self.baskets = np.zeros(n_items, dtype=np.float64)

    def observe(self, log: EventLog, start: int, stop: int) -> None:
        sel = log.kind[start:stop] == PURCHASE
        if not sel.any():
            return
        users = log.user[start:stop][sel]
        items = log.item[start:stop][sel]
        for u in np.unique(users).tolist():
            self.add_basket(np.unique(items[users == u]))

    def add_basket(self, items: np.ndarray) -> None:
        self.baskets[items] += 1.0
        if items.size > 1:
            self.counts[np.ix_(items, items)] += 1.0
            self.counts[items, items] -= 1.0

    def similarity_rows(self, rows: np.ndarray, shrink: float = 10.0) -> np.ndarray:
        """Cosine co-purchase similarity of ``rows`` to every item, shrunk for rare items.

        sim(i, j) = C_ij / (sqrt(n_i n_j) + shrink): the shrink keeps a single shared
        basket of two rare items from outranking an established pairing.
        """
        c = self.counts[rows].astype(np.float64)
        denom = np.sqrt(self.baskets[rows][:, None] * self.baskets[None, :]) + shrink
        return np.divide(c, denom, out=np.zeros_like(c), where=denom > 0)


def strongest_profile(items: np.ndarray, weights: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """A shopper's ``limit`` heaviest items (ties: earlier first) and their weights over the maximum.

    Bounds the co-purchase rows read per basket for shoppers with thousands of items.
    ``items`` must be non-empty with positive weights.
    """
    if items.size > limit:
        keep = np.argsort(-weights, kind="stable")[:limit]
        items, weights = items[keep], weights[keep]
    return items, weights / weights.max()


class CooccurrenceMethod(_OwnFrequencyAndPopularity):
    """Co-purchase neighbours of the shopper's items, blended with own frequency and popularity.

    score = w_repeat * freq/max(freq) + w_cooc * cooc/max(cooc) + w_pop * pop/max(pop),
    cooc = sum over the shopper's items j of freq_j * sim(j, ·).
    """

    name = "cooccurrence"

    def __init__(
        self,
        n_items: int,
        w_repeat: float = 1.0,
        w_cooc: float = 0.1,
        w_pop: float = 0.5,
        half_life_days: float = 365.0,
        popularity_half_life_days: float = 14.0,
        shrink: float = 10.0,
        max_profile: int = 200,
    ) -> None:
        super().__init__(n_items, half_life_days, popularity_half_life_days)
        self.co = CoPurchase(n_items)
        self.w_repeat, self.w_cooc, self.w_pop = w_repeat, w_cooc, w_pop
        self.shrink = shrink
        self.max_profile = max_profile

    def observe(self, log: EventLog, start: int, stop: int) -> None:
        super().observe(log, start, stop)
        self.co.observe(log, start, stop)

    def scores(self, user: int, now: float) -> np.ndarray:
        pop = self.pop.normalised()
        items, freq = self.freq.items(user)
        s = self.w_pop * pop
        if items.size == 0:
            return s
        items, fn = strongest_profile(items, freq, self.max_profile)
        cooc = fn @ self.co.similarity_rows(items, self.shrink)
        top = cooc.max(initial=0.0)
        if top > 0:
            s = s + self.w_cooc * cooc / top
        s[items] += self.w_repeat * fn
        return s
