"""Next-basket ranking metrics, exactly as the protocol defines them.

- Recall@k = |top k ∩ basket| / min(k, |basket|): a basket larger than k can still
  score 1, so big wholesale invoices do not cap the figure.
- NDCG@k with binary gains; the ideal DCG places min(k, |basket|) hits at the top.

Basket items that could not be ranked (never seen before the basket's time) stay in
``basket``: they count in the denominators, which is what makes cold start visible.

A method that depends on a seed is run once per seed; :func:`seed_figures` reports the
mean with the spread (sample standard deviation, min, max, every seed's figure), so a
difference between methods can be told from seed noise.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

K = 10
_DISCOUNT = 1.0 / np.log2(np.arange(2, 2 + 1024))


def recall_at_k(ranked: Sequence[int], basket: Collection[int], k: int = K) -> float:
    """Share of the basket (capped at k items) found in the top k of ``ranked``."""
    if not basket:
        raise ValueError("basket must not be empty")
    hits = sum(1 for i in ranked[:k] if i in basket)
    return hits / min(k, len(basket))


def ndcg_at_k(ranked: Sequence[int], basket: Collection[int], k: int = K) -> float:
    """Binary-gain NDCG; ideal = min(k, |basket|) hits at ranks 1..n."""
    if not basket:
        raise ValueError("basket must not be empty")
    dcg = sum(_DISCOUNT[r] for r, i in enumerate(ranked[:k]) if i in basket)
    ideal = float(_DISCOUNT[: min(k, len(basket))].sum())
    return float(dcg) / ideal


@dataclass
class SliceStats:
    """Running sums for one (method, slice): the mean is taken over baskets."""

    recall: float = 0.0
    ndcg: float = 0.0
    baskets: int = 0

    def add(self, recall: float, ndcg: float) -> None:
        self.recall += recall
        self.ndcg += ndcg
        self.baskets += 1

    def as_dict(self) -> dict[str, float | int]:
        n = max(self.baskets, 1)
        return {"recall@10": self.recall / n, "ndcg@10": self.ndcg / n, "baskets": self.baskets}


@dataclass
class Timeline:
    """Per-period sums of Recall@10 on the ``all`` slice (the plot's series)."""

    recall: dict[int, float] = field(default_factory=dict)
    baskets: dict[int, int] = field(default_factory=dict)

    def add(self, period: int, recall: float) -> None:
        self.recall[period] = self.recall.get(period, 0.0) + recall
        self.baskets[period] = self.baskets.get(period, 0) + 1

    def means(self) -> dict[int, float]:
        return {p: self.recall[p] / self.baskets[p] for p in sorted(self.recall)}

    @classmethod
    def merged(cls, timelines: Sequence[Timeline]) -> Timeline:
        """One timeline over several runs (seeds): each period's mean is the mean over runs'
        baskets, which is the mean of the runs' means when they scored the same baskets."""
        out = cls()
        for t in timelines:
            for p, r in t.recall.items():
                out.recall[p] = out.recall.get(p, 0.0) + r
                out.baskets[p] = out.baskets.get(p, 0) + t.baskets[p]
        return out


METRICS = ("recall@10", "ndcg@10")


def spread(values: Sequence[float]) -> dict[str, float | list[float]]:
    """Sample standard deviation (0 for one value), min, max and the values themselves."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("spread of no values")
    return {
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "per_seed": [float(v) for v in a],
    }


def seed_figures(per_seed: Sequence[Mapping[str, float | int]], seeds: Sequence[int]) -> dict[str, object]:
    """One slice's figures over seeds: the means under the usual keys, plus ``seeds`` and ``spread``.

    ``{"recall@10": mean, "ndcg@10": mean, "baskets": n, "seeds": [...],
    "spread": {"recall@10": {"std", "min", "max", "per_seed"}, "ndcg@10": {...}}}``. Every
    seed scores the same baskets (the protocol does not depend on the seed); a differing
    count means the runs were not comparable, which is an error, not noise.
    """
    if len(per_seed) != len(seeds) or not seeds:
        raise ValueError("one figure set per seed, at least one")
    counts = {int(f["baskets"]) for f in per_seed}
    if len(counts) != 1:
        raise ValueError(f"seeds scored different basket counts {sorted(counts)}")
    out: dict[str, object] = {m: float(np.mean([f[m] for f in per_seed])) for m in METRICS}
    out["baskets"] = counts.pop()
    out["seeds"] = list(seeds)
    out["spread"] = {m: spread([float(f[m]) for f in per_seed]) for m in METRICS}
    return out
