"""Evaluating an encoder on the held-out window: Recall@10 and NDCG@10 among the catalog.

The protocol: encode every catalog item's text with the encoder under test, build each
window pair's context vector the way serving builds a user vector from that version's
item vectors (the normalised mean of its context items' rows; a search query is
encoded), rank all items by dot product, and find the pair's target. Pairs whose target
is not (or no longer) in the catalog are left out and counted.

Encoding the catalog dominates the cost (2.7k items take seconds on two cores), so an
:class:`ItemMatrix` is cached per (encoder version, catalog content): the active
adapter's matrix is computed once per version, and only the candidate, whose weights
change every step, is re-encoded at each evaluation.

The publish gate compares versions example by example, so the figures are also exposed
per example: :func:`window_ranks` and :func:`rank_gains` per window pair, and
:func:`basket_gains` per held-back basket for rankers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from freshrec.contracts import CatalogItem, TrainPair
from models.encoder import TextEncoder
from ranking.scoring import DAY_S, LogBlendWeights, SimilarityScale, log_blend_terms, scale_from_settings
from ranking.user_state import decay_factor, decayed_add

from .metrics import ndcg_from_ranks, ranks_from_scores, recall_from_ranks, target_ranks


@dataclass(frozen=True)
class ItemMatrix:
    """Item vectors of one encoder version over one catalog snapshot."""

    version: str
    fingerprint: str
    item_ids: list[str]
    vectors: np.ndarray  # (len(item_ids), dim) float32, L2-normalised
    index: dict[str, int]


def catalog_fingerprint(items: Mapping[str, CatalogItem]) -> str:
    """Changes whenever an item is added, removed, or its encoder text changes."""
    h = hashlib.blake2b(digest_size=12)
    for item_id in sorted(items):
        h.update(item_id.encode() + b"\0" + items[item_id].text().encode() + b"\0")
    return h.hexdigest()


def encode_items(encoder: TextEncoder, items: Mapping[str, CatalogItem], fingerprint: str | None = None) -> ItemMatrix:
    ids = sorted(items)
    texts = [items[i].text() for i in ids]
    # Encoding in length order pads each batch to similar lengths: titles vary from 2 to 60+
    # tokens, and a batch costs as much as its longest text.
    order = sorted(range(len(texts)), key=lambda n: len(texts[n]))
    encoded = encoder.encode([texts[n] for n in order], batch_size=128)
    vectors = np.empty_like(encoded)
    vectors[np.asarray(order, dtype=np.int64)] = encoded
    return ItemMatrix(
        encoder.version, fingerprint or catalog_fingerprint(items), ids, vectors, {i: n for n, i in enumerate(ids)}
    )


@dataclass(frozen=True)
class WindowBlend:
    """The item side of serving's log blend, for judging a version as serving will use it.

    A window pair has no repeat signal to offer (its target is never in its context), so
    what serving would rank it by is ``ranking.scoring.log_blend_terms`` with repeat 0:
    popularity plus the version's scaled similarity. ``popularity`` is one value per row
    of the matrix being judged (normalised to max 1); ``scale`` is that version's
    :class:`SimilarityScale`.
    """

    popularity: np.ndarray
    weights: LogBlendWeights
    scale: SimilarityScale

    @classmethod
    def for_matrix(cls, matrix: ItemMatrix, popularity: TargetPopularity, settings: Any) -> WindowBlend:
        """The blend the publish gate ranks ``matrix`` by: its own scale, the learner's popularity."""
        return cls(
            popularity.normalised(matrix.item_ids),
            LogBlendWeights.from_settings(settings),
            scale_from_settings(matrix.vectors, settings),
        )


def window_metrics(
    encoder: TextEncoder, matrix: ItemMatrix, pairs: Sequence[TrainPair], k: int = 10, blend: WindowBlend | None = None
) -> dict[str, float]:
    """``recall@k``, ``ndcg@k``, ``n`` (pairs evaluated) and ``unknown`` (targets not in the catalog).

    Items are ranked by cosine to the context, or, with ``blend``, by the blend's item side.
    """
    return metrics_from_ranks(window_ranks(encoder, matrix, pairs, blend), k)


def window_ranks(
    encoder: TextEncoder, matrix: ItemMatrix, pairs: Sequence[TrainPair], blend: WindowBlend | None = None
) -> np.ndarray:
    """Each pair's target's 0-based rank among the catalog (-1 where the target is not in it).

    Per pair, not averaged: the publish gate compares two versions pair by pair
    (``learner.publish.paired_comparison``), which tells a gain from the window's noise.
    """
    ranks = np.full(len(pairs), -1, dtype=np.int64)
    rows = [n for n, p in enumerate(pairs) if p.target_item in matrix.index]
    if not rows:
        return ranks
    known = [pairs[n] for n in rows]
    contexts = context_matrix(encoder, matrix, known)
    targets = np.array([matrix.index[p.target_item] for p in known], dtype=np.int64)
    if blend is None:
        ranks[rows] = target_ranks(contexts, matrix.vectors, targets)
    else:
        none = np.zeros(1)  # no repeat, no new-arrival flag: constants that change no rank
        scores = log_blend_terms(
            none, blend.scale.apply(contexts @ matrix.vectors.T), blend.popularity[None, :], none, blend.weights
        )
        ranks[rows] = ranks_from_scores(scores, targets)
    return ranks


def metrics_from_ranks(ranks: np.ndarray, k: int = 10) -> dict[str, float]:
    """``recall@k``, ``ndcg@k``, ``n`` and ``unknown`` of :func:`window_ranks`' output."""
    known = ranks[ranks >= 0]
    return {
        f"recall@{k}": recall_from_ranks(known, k),
        f"ndcg@{k}": ndcg_from_ranks(known, k),
        "n": float(len(known)),
        "unknown": float(len(ranks) - len(known)),
    }


def _metric_k(metric: str) -> tuple[str, int]:
    """``"recall@10"`` -> ``("recall", 10)``; ValueError for any other shape."""
    name, _, k = metric.partition("@")
    if name not in ("recall", "ndcg") or not k.isdigit() or int(k) < 1:
        raise ValueError(f"metric must be recall@K or ndcg@K, got {metric!r}")
    return name, int(k)


def rank_gains(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per pair with a known target (rank >= 0): its ``metric`` (``recall@K`` hit or ``ndcg@K`` gain)."""
    name, k = _metric_k(metric)
    r = np.asarray(ranks, dtype=np.float64)
    inside = (r >= 0) & (r < k)
    if name == "recall":
        return inside.astype(np.float64)
    return np.where(inside, 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0)


def basket_gains(
    scores: np.ndarray, labels: np.ndarray, groups: Sequence[int], metric: str, relevant: Sequence[int] | None = None
) -> np.ndarray:
    """Per basket (group of candidate rows): ``metric`` of the candidates ranked by ``scores``.

    ``labels`` marks the bought candidates; ``relevant`` is each basket's count of bought
    items, candidates or not (default: the bought candidates), so Recall@K is measured
    against the whole basket as the evaluation measures it. Ties keep row order.
    """
    name, k = _metric_k(metric)
    counts = np.asarray(groups, dtype=np.int64)
    rel = counts * 0 if relevant is None else np.asarray(relevant, dtype=np.int64)
    if len(rel) != len(counts) or int(counts.sum()) != len(scores) or len(labels) != len(scores):
        raise ValueError(f"{len(scores)} scores, {len(labels)} labels, groups summing to {int(counts.sum())}, "
                         f"{len(rel)} relevant counts for {len(counts)} groups")
    discounts = 1.0 / np.log2(np.arange(k) + 2.0)
    out = np.zeros(len(counts))
    start = 0
    for g, size in enumerate(counts):
        s, lab = scores[start:start + size], np.asarray(labels[start:start + size]) > 0
        start += size
        n_rel = int(rel[g]) if relevant is not None else int(lab.sum())
        if n_rel <= 0:
            continue
        hits = lab[np.argsort(-s, kind="stable")[:k]]
        if name == "recall":
            out[g] = hits.sum() / min(n_rel, k)
        else:
            out[g] = float(discounts[: len(hits)][hits].sum() / discounts[: min(n_rel, k)].sum())
    return out


@dataclass
class TargetPopularity:
    """Decayed counts of trained pairs' targets: the learner's view of fresh popularity.

    Serving reads popularity from the users flow; the learner sees only pairs, and their
    targets (purchases, carts, clicks) are popularity's own events. Each entry is
    ``[count, as_of_ts]`` in event time, so the counts survive a checkpoint as plain JSON.
    """

    half_life_s: float
    entries: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def days(cls, half_life_days: float, entries: dict[str, list[float]] | None = None) -> TargetPopularity:
        return cls(half_life_days * DAY_S, {} if entries is None else entries)

    def add(self, item_id: str, ts: float, weight: float = 1.0) -> None:
        value, as_of = self.entries.get(item_id, (0.0, ts))
        self.entries[item_id] = list(decayed_add(value, as_of, weight, ts, self.half_life_s))

    def normalised(self, item_ids: Sequence[str]) -> np.ndarray:
        """Each id's count decayed to the newest time seen, divided by the largest (0 if unseen)."""
        if not self.entries:
            return np.zeros(len(item_ids))
        now = max(as_of for _, as_of in self.entries.values())
        decayed = {i: v * decay_factor(now - t, self.half_life_s) for i, (v, t) in self.entries.items()}
        top = max(decayed.values())
        out = np.array([decayed.get(i, 0.0) for i in item_ids], dtype=np.float64)
        return out / top if top > 0 else out


def context_matrix(encoder: TextEncoder, matrix: ItemMatrix, pairs: Sequence[TrainPair]) -> np.ndarray:
    """One context vector per pair, from ``matrix``'s own item vectors where it can be.

    Item contexts average the rows of their items present in the matrix, as
    ``ranking.scoring.user_vector`` does (uniform weights: a pair carries no times or
    kinds for its context); a query, or a context with no item in the matrix, is
    encoded as text by ``encoder``, which must be the encoder that made ``matrix``.
    """
    out = np.empty((len(pairs), matrix.vectors.shape[1]), dtype=np.float32)
    as_text: list[int] = []
    for n, p in enumerate(pairs):
        rows = [matrix.index[i] for i in p.context_items if i in matrix.index]
        if not rows:
            as_text.append(n)
            continue
        vec = matrix.vectors[rows].mean(axis=0)
        out[n] = vec / max(float(np.linalg.norm(vec)), 1e-12)
    if as_text:
        out[as_text] = encoder.encode([pairs[n].context_text for n in as_text], batch_size=128)
    return out


class ActiveEncoder:
    """The active adapter's encoder and its cached item matrix.

    "base" is the frozen encoder; any other version is loaded from the registry (which
    verifies it) on top of a fresh copy of the base model.
    """

    def __init__(self, version: str, encoder: TextEncoder) -> None:
        self.version = version
        self.encoder = encoder
        self._matrix: ItemMatrix | None = None

    @classmethod
    def load(cls, version: str, registry_root: Path, device: str) -> ActiveEncoder:
        from models.encoder import BASE_VERSION, TorchEncoder, load_base_model

        if version == BASE_VERSION:
            return cls(version, TorchEncoder(device=device))
        from peft import PeftModel

        from models.registry import AdapterRegistry

        _, path = AdapterRegistry(registry_root).load(version)
        model = PeftModel.from_pretrained(load_base_model(device), str(path)).eval()
        return cls(version, TorchEncoder(model, device=device, version=version))

    def matrix(self, items: Mapping[str, CatalogItem], fingerprint: str) -> ItemMatrix:
        if self._matrix is None or self._matrix.fingerprint != fingerprint:
            self._matrix = encode_items(self.encoder, items, fingerprint)
        return self._matrix

    def adopt_matrix(self, matrix: ItemMatrix) -> None:
        """Reuse a matrix computed by the same weights (the candidate just published)."""
        self._matrix = ItemMatrix(self.version, matrix.fingerprint, matrix.item_ids, matrix.vectors, matrix.index)
