"""The recommend and search blends, as pure functions over plain data.

Serving and the evaluation both call these, so what is measured offline is exactly what
is served. Nothing here touches Redis, FAISS, ONNX or HTTP: the item vectors come in
through the small :class:`ItemSpace` protocol (serving adapts its live index to it,
evaluation a numpy matrix).

The /recommend score of a candidate item is one line (:func:`blend`)::

    w.repeat * repeat / max(repeat)  +  w.similarity * max(cos(user, item), 0)  +  w.popularity * pop / max(pop)

The repeat term is the shopper's own decayed purchase frequency. Measured on
online_retail_ii it is the strongest single signal (wholesale shoppers re-order the
same items), so it is normalised per user to [0, 1] and gets the largest default
weight; similarity and popularity then rank what the shopper has not bought before and
break ties among what they have.

Example (the test suite runs it)::

    >>> import numpy as np
    >>> w = BlendWeights(repeat=1.0, similarity=0.5, popularity=0.1)
    >>> s = blend({"a": 4.0, "b": 1.0}, {"b": 0.9, "c": 0.8}, {"c": 1.0}, w)
    >>> [item for item, _ in top_k(s, 3)]
    ['a', 'b', 'c']
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from freshrec.contracts import KIND_WEIGHT

DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class BlendWeights:
    """Weights of the three /recommend signals (settings ``blend_*``)."""

    repeat: float = 1.0
    similarity: float = 0.3
    popularity: float = 0.1

    @classmethod
    def from_settings(cls, settings: Any) -> BlendWeights:
        return cls(settings.blend_repeat, settings.blend_similarity, settings.blend_popularity)


class HistoryItem(Protocol):
    """What scoring needs of one interaction (``streams.user_state.Interaction`` has it)."""

    item_id: str
    kind: str
    ts: float


class ItemSpace(Protocol):
    """Item vectors of one adapter version; every vector a request compares comes from one space."""

    def vectors(self, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The vectors of the ids that are present (absent and deleted ids are left out)."""
        ...

    def nearest(self, vector: np.ndarray, k: int, exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
        """The k items most similar (inner product) to ``vector``, best first."""
        ...


# -- building blocks ---------------------------------------------------------------------


def history_weights(
    history: Iterable[HistoryItem],
    now_ts: float,
    half_life_s: float,
    kind_weight: Mapping[str, float] = KIND_WEIGHT,
) -> dict[str, float]:
    """Weight of each item in a user's history: kind weight times recency decay, summed.

    ``now_ts`` is the user's own newest event time, not the wall clock: a replayed
    dataset is years old, and only the relative age of interactions matters here.
    Kinds weighted 0 (cancel) and unknown kinds contribute nothing.
    """
    out: dict[str, float] = {}
    for it in history:
        w = kind_weight.get(it.kind, 0.0)
        if w <= 0.0:
            continue
        age = max(now_ts - it.ts, 0.0)
        w *= 0.5 ** (age / half_life_s)
        out[it.item_id] = out.get(it.item_id, 0.0) + w
    return out


def user_vector(weights: Mapping[str, float], vectors: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Weighted mean of the known item vectors, L2-normalised; None if none is known.

    Only vectors of one space may be passed (invariant 1): the caller takes them from
    the same index it then searches.
    """
    ids = [i for i in weights if i in vectors and weights[i] > 0]
    if not ids:
        return None
    mat = np.stack([vectors[i] for i in ids]).astype(np.float32, copy=False)
    w = np.asarray([weights[i] for i in ids], dtype=np.float32)
    vec = w @ mat
    norm = float(np.linalg.norm(vec))
    if not math.isfinite(norm) or norm < 1e-12:
        return None
    return (vec / norm).astype(np.float32)


def normalise_by_max(scores: Mapping[str, float]) -> dict[str, float]:
    """Scores divided by their maximum (non-positive scores dropped); {} when none is positive."""
    top = max((v for v in scores.values() if v > 0), default=0.0)
    if top <= 0:
        return {}
    return {k: v / top for k, v in scores.items() if v > 0}


def blend(
    repeat: Mapping[str, float],
    similarity: Mapping[str, float],
    popularity: Mapping[str, float],
    weights: BlendWeights,
    candidates: Iterable[str] | None = None,
) -> dict[str, float]:
    """The /recommend score of each candidate (the formula in the module docstring).

    ``repeat`` is raw (any scale; normalised here by the user's own maximum),
    ``similarity`` is cosine (negative values count as 0, missing as 0), ``popularity``
    is already normalised to [0, 1] (by the catalog-wide maximum, which only the
    caller knows). Candidates default to the union of repeat and similarity keys; a
    popular item enters only through ``candidates``, so the caller decides how many.
    """
    rep = normalise_by_max(repeat)
    pool = set(rep) | set(similarity) if candidates is None else set(candidates)
    out: dict[str, float] = {}
    for item in pool:
        sim = similarity.get(item, 0.0)
        out[item] = (
            weights.repeat * rep.get(item, 0.0)
            + weights.similarity * (sim if sim > 0.0 else 0.0)
            + weights.popularity * popularity.get(item, 0.0)
        )
    return out


def top_k(scores: Mapping[str, float], k: int, exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
    """The k best (item, score), ties broken by item id so results are reproducible."""
    skip = set(exclude)
    ranked = sorted(((i, s) for i, s in scores.items() if i not in skip), key=lambda p: (-p[1], p[0]))
    return ranked[:k]


def search_vector(query: np.ndarray, user: np.ndarray | None, user_weight: float) -> np.ndarray:
    """The /search vector: the query, pulled toward the user's taste by ``user_weight``.

    Both inputs are unit vectors of one adapter version; the result is unit length, so
    scores stay cosines.
    """
    if user is None or user_weight <= 0.0:
        return query
    vec = (1.0 - user_weight) * query + user_weight * user
    norm = float(np.linalg.norm(vec))
    return query if norm < 1e-12 else (vec / norm).astype(np.float32)


# -- the whole /recommend ranking --------------------------------------------------------


def recommend(
    history: Sequence[HistoryItem],
    repeat: Mapping[str, float],
    space: ItemSpace,
    popularity: Mapping[str, float],
    popular_top: Sequence[str],
    weights: BlendWeights,
    k: int,
    *,
    now_ts: float,
    half_life_s: float,
    candidates: int = 200,
) -> list[tuple[str, float]]:
    """Rank items for one user; a cold user (no history, no repeats) gets popularity.

    Candidates are the user's repeat items, the ``candidates`` nearest items to the
    user vector and the ``candidates`` most popular items (``popular_top``, best
    first). Every candidate is scored on all three signals, with similarity computed
    from the same ``space`` the neighbours came from, and only items present in that
    space are returned, so a deleted item never comes back through Redis history.
    """
    hw = history_weights(history, now_ts, half_life_s)
    wanted = list(dict.fromkeys([*hw, *repeat, *popular_top[:candidates]]))
    vecs = space.vectors(wanted)
    uvec = user_vector(hw, vecs)
    sims: dict[str, float] = {}
    if uvec is not None:
        for item, score in space.nearest(uvec, candidates):
            sims[item] = score
            vecs.setdefault(item, _NO_VECTOR)
        for item, vec in vecs.items():
            if item not in sims and vec is not _NO_VECTOR:
                sims[item] = float(vec @ uvec)
    pool = [i for i in vecs]  # present in the space: repeats, history, neighbours, popular
    return top_k(blend(repeat, sims, popularity, weights, candidates=pool), k)


def popular(popularity: Mapping[str, float], popular_top: Sequence[str], k: int, present: Any) -> list[tuple[str, float]]:
    """The k most popular items that ``present`` (a container) holds, with normalised scores."""
    out: list[tuple[str, float]] = []
    for item in popular_top:
        if item in present:
            out.append((item, popularity.get(item, 0.0)))
            if len(out) == k:
                break
    return out


_NO_VECTOR = np.zeros(0, dtype=np.float32)
