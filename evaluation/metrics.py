"""Next-basket ranking metrics, exactly as the protocol defines them.

- Recall@k = |top k ∩ basket| / min(k, |basket|): a basket larger than k can still
  score 1, so big wholesale invoices do not cap the figure.
- NDCG@k with binary gains; the ideal DCG places min(k, |basket|) hits at the top.

Basket items that could not be ranked (never seen before the basket's time) stay in
``basket``: they count in the denominators, which is what makes cold start visible.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
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
