"""Ranking metrics with binary gains: Recall@k and NDCG@k, plain functions over numpy.

Two shapes of the same metrics:

- **one target per query** (the learner's evaluation window: a context and the item that
  followed it): :func:`target_ranks` turns scores into the target's 0-based rank, and
  :func:`recall_from_ranks` / :func:`ndcg_from_ranks` average over queries. With a single
  relevant item the ideal DCG is 1, so NDCG@k is ``1 / log2(rank + 2)`` inside the top k.
- **a ranked list against a set of relevant items** (next-basket evaluation):
  :func:`recall_at_k` and :func:`ndcg_at_k`, where recall divides by
  ``min(len(relevant), k)`` (``evaluation.metrics``' definition: a basket larger than k
  can still reach 1) and the ideal DCG puts ``min(len(relevant), k)`` hits on top.

For one relevant item the two shapes agree, which a unit test checks.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np


def target_ranks(query_vecs: np.ndarray, item_vecs: np.ndarray, target_idx: np.ndarray) -> np.ndarray:
    """0-based rank of each query's target among all items by dot product (higher is better).

    ``query_vecs`` (n, d), ``item_vecs`` (m, d), ``target_idx`` (n,) row indices into
    ``item_vecs``. Ties count in the target's favour (only strictly higher scores rank
    above it); with float embeddings ties are rare enough not to matter.
    """
    query_vecs = np.asarray(query_vecs, dtype=np.float32)
    item_vecs = np.asarray(item_vecs, dtype=np.float32)
    target_idx = np.asarray(target_idx, dtype=np.int64)
    if query_vecs.shape[0] != target_idx.shape[0]:
        raise ValueError(f"{query_vecs.shape[0]} queries but {target_idx.shape[0]} targets")
    if len(target_idx) == 0:
        return np.zeros(0, dtype=np.int64)
    if target_idx.min() < 0 or target_idx.max() >= item_vecs.shape[0]:
        raise ValueError(f"target index out of range for {item_vecs.shape[0]} items")
    return ranks_from_scores(query_vecs @ item_vecs.T, target_idx)  # (n, m): a window x a catalog


def ranks_from_scores(scores: np.ndarray, target_idx: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target column in ``scores`` (n, m); ties favour the target."""
    target_idx = np.asarray(target_idx, dtype=np.int64)
    target_scores = scores[np.arange(len(target_idx)), target_idx]
    return (scores > target_scores[:, None]).sum(axis=1).astype(np.int64)


def recall_from_ranks(ranks: np.ndarray, k: int = 10) -> float:
    """Share of queries whose target is in the top k; 0.0 for no queries."""
    ranks = np.asarray(ranks)
    return float((ranks < k).mean()) if ranks.size else 0.0


def ndcg_from_ranks(ranks: np.ndarray, k: int = 10) -> float:
    """Mean NDCG@k with one relevant item per query (ideal DCG = 1); 0.0 for no queries."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if not ranks.size:
        return 0.0
    gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(gains.mean())


def retrieval_metrics(
    query_vecs: np.ndarray, item_vecs: np.ndarray, target_idx: np.ndarray, k: int = 10
) -> dict[str, float]:
    """``{"recall@k", "ndcg@k", "n"}`` of each query's target among all items."""
    ranks = target_ranks(query_vecs, item_vecs, target_idx)
    return {f"recall@{k}": recall_from_ranks(ranks, k), f"ndcg@{k}": ndcg_from_ranks(ranks, k), "n": float(len(ranks))}


def recall_at_k(ranked: Sequence[str], relevant: Collection[str], k: int = 10) -> float:
    """Relevant items found in the top k, over ``min(len(relevant), k)`` (0.0 if none)."""
    if not relevant:
        return 0.0
    rel = set(relevant)
    hits = sum(1 for item in _dedup(ranked)[:k] if item in rel)
    return hits / min(len(rel), k)


def ndcg_at_k(ranked: Sequence[str], relevant: Collection[str], k: int = 10) -> float:
    """NDCG@k with binary gains; the ideal list has ``min(len(relevant), k)`` hits on top."""
    if not relevant:
        return 0.0
    rel = set(relevant)
    dcg = sum(1.0 / np.log2(i + 2.0) for i, item in enumerate(_dedup(ranked)[:k]) if item in rel)
    ideal = sum(1.0 / np.log2(i + 2.0) for i in range(min(len(rel), k)))
    return float(dcg / ideal)


def _dedup(ranked: Sequence[str]) -> list[str]:
    """A ranked list may repeat an item; only its first position counts."""
    seen: set[str] = set()
    out = []
    for item in ranked:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


# -- the learner process's Prometheus figures ------------------------------------------------------


class LearnerMetrics:
    """What the learner process shows on ``/metrics`` (its own registry, so tests can run several).

    The ranker's figures are gauges set from its checkpointed counters, not counters
    incremented in memory: a restarted learner then shows the same totals it had, rather
    than starting again from 0 over a stream it resumed.
    """

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = CollectorRegistry()
        r = self.registry
        self.rank_examples = Gauge(
            "freshrec_learner_rank_examples", "Rank-examples records consumed, by outcome", ["outcome"], registry=r
        )
        self.ranker_updates = Gauge("freshrec_learner_ranker_updates", "Ranker candidates trained and judged", registry=r)
        self.ranker_published = Gauge("freshrec_learner_ranker_published", "Ranker versions published", registry=r)
        self.ranker_window = Gauge(
            "freshrec_learner_ranker_window_baskets", "Baskets held in memory, by part (held back, training)", ["part"],
            registry=r,
        )
        self.ranker_last = Gauge(
            "freshrec_learner_ranker_last", "Figures of the last ranker update (gate metrics, fit seconds)", ["figure"],
            registry=r,
        )

        # the adapter (learner.loop): set from its checkpointed state after each micro-batch
        self.adapter_pairs = Gauge("freshrec_learner_adapter_pairs_trained", "Train pairs the adapter has trained on", registry=r)
        self.adapter_steps = Gauge("freshrec_learner_adapter_steps", "Adapter micro-batches trained", registry=r)
        self.adapter_loss = Gauge(
            "freshrec_learner_adapter_loss", "Mean contrastive loss of the adapter's recent micro-batches", registry=r
        )
        self.adapter_active = Gauge(
            "freshrec_learner_adapter_info", "1 for the active adapter version the learner judges candidates against",
            ["version"], registry=r,
        )
        self._adapter_version: str | None = None

    def adapter(self, pairs_trained: int, steps: int, loss: float | None, active_version: str) -> None:
        """Set the adapter's figures (``loss`` None: no micro-batch trained by this process yet)."""
        self.adapter_pairs.set(pairs_trained)
        self.adapter_steps.set(steps)
        if loss is not None:
            self.adapter_loss.set(loss)
        if self._adapter_version is not None and self._adapter_version != active_version:
            self.adapter_active.remove(self._adapter_version)
        self.adapter_active.labels(active_version).set(1)
        self._adapter_version = active_version

    def ranker(self, counts: Mapping[str, int], windows: Mapping[str, int], figures: Mapping[str, float]) -> None:
        """Set the ranker's figures: ``counts`` (consumed, duplicates, skipped, updates, published)."""
        for outcome in ("consumed", "duplicates", "skipped"):
            self.rank_examples.labels(outcome).set(counts.get(outcome, 0))
        self.ranker_updates.set(counts.get("updates", 0))
        self.ranker_published.set(counts.get("published", 0))
        for part, n in windows.items():
            self.ranker_window.labels(part).set(n)
        for name, value in figures.items():
            self.ranker_last.labels(name).set(value)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class MetricsServer:
    """``/metrics`` of a :class:`LearnerMetrics` on a loopback port, in a thread that :meth:`close` ends."""

    def __init__(self, metrics: LearnerMetrics, port: int, host: str = "127.0.0.1") -> None:
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.port = int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
