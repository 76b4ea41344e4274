"""The recommend and search blends, as pure functions over plain data.

Serving and the evaluation both call these, so what is measured offline is exactly what
is served. Nothing here touches Redis, FAISS, ONNX or HTTP: the item vectors come in
through the small :class:`ItemSpace` protocol (serving adapts its live index to it,
evaluation a numpy matrix).

The /recommend score of a candidate item is one of two blends (setting ``blend_mode``).
``"log"``, the default (:func:`log_blend`, weights :class:`LogBlendWeights`)::

    w.repeat * log(repeat / max(repeat) + f_r)  +  w.popularity * log(pop / max(pop) + f_p)
      +  w.similarity * max(cos(user, item), 0)  +  w.new * is_new(item)

and ``"linear"`` (:func:`blend`, weights :class:`BlendWeights`)::

    w.repeat * repeat / max(repeat)  +  w.similarity * max(cos(user, item), 0)  +  w.popularity * pop / max(pop)

The repeat term is the shopper's own purchase count in their recent baskets, each basket
weighted ``repeat_basket_decay ** (baskets since)`` (``UserState.basket_scores``),
normalised per user to [0, 1]: measured on online_retail_ii it is the strongest single
signal (wholesale shoppers re-order the same items), and counting in baskets rather than
days ranked re-orders better than a 180-day half-life (docs/eval_online_retail_ii.md).
Adding logs multiplies repeat and popularity, which ranks a shopper's own items by how
popular they are *right now* (the shop is seasonal); the linear blend cannot do that. ``is_new`` is 1 for an item first seen within
``blend_new_days`` (:func:`new_arrivals`): new lines sell to existing customers, and
the bonus plus their place in the candidate pool is what finds them. The log blend won
the evaluation (docs/eval_online_retail_ii.md, base vectors: +6.7 % Recall@10 over the
best baseline on all baskets and +39 % on never-bought items; the linear blend trailed
the co-occurrence baseline on the validation window).

Example (the test suite runs it)::

    >>> import numpy as np
    >>> w = BlendWeights(repeat=1.0, similarity=0.5, popularity=0.1)
    >>> s = blend({"a": 4.0, "b": 1.0}, {"b": 0.9, "c": 0.8}, {"c": 1.0}, w)
    >>> [item for item, _ in top_k(s, 3)]
    ['a', 'b', 'c']
    >>> s = log_blend({"a": 4.0, "b": 1.0}, {"b": 0.9}, {"a": 0.1, "b": 1.0, "c": 1.0}, {"c"}, LogBlendWeights())
    >>> [item for item, _ in top_k(s, 3)]  # b: bought less, but popular now and similar
    ['b', 'a', 'c']
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
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


@dataclass(frozen=True, slots=True)
class LogBlendWeights:
    """Weights of the log-space blend (settings ``blend_log_*``); the floors are constants.

    Chosen on the evaluation's validation window (history < 2011-03-01, baskets
    2011-03..05) and then run once on the report window; ``repeat`` 1.5 (was 1.0 with
    the 180-day repeat signal) was chosen with the basket signal on baskets of
    2010-09..2011-02 and checked on that validation window. The floors keep ``log`` finite
    and set how much a never-bought (repeat 0) or never-sold (popularity 0) item is held
    back: with ``repeat_floor`` 0.005 an item never bought needs similarity, popularity
    or newness to climb over the shopper's own items.
    """

    repeat: float = 1.5
    similarity: float = 2.0
    popularity: float = 0.8
    new: float = 0.5
    repeat_floor: float = 0.005
    popularity_floor: float = 1e-3

    @classmethod
    def from_settings(cls, settings: Any) -> LogBlendWeights:
        return cls(
            repeat=settings.blend_log_repeat,
            similarity=settings.blend_log_similarity,
            popularity=settings.blend_log_popularity,
            new=settings.blend_log_new,
        )


@dataclass(frozen=True, slots=True)
class SimilarityScale:
    """An affine map of one adapter version's cosines onto the spread the blend was tuned on.

    The blend's similarity weight means "this much score per unit of cosine *as the base
    model spreads cosines*". A trained adapter can change that spread a lot (measured:
    mean user-to-item cosine 0.42 -> 0.74-0.89, standard deviation 0.12 -> 0.04-0.05),
    which silently re-weights the term. Each version's cosines are therefore mapped so
    that its item-to-item cosines have the reference mean and standard deviation
    (settings ``blend_similarity_mean``/``_std``: the base model's, measured on both
    bundled catalogs, so the base version maps to itself up to sampling noise). The map
    is increasing, so it never changes which items are nearest, only how much nearness
    weighs against repeat, popularity and newness; and it is a function of the version's
    own vectors alone (invariant 1).
    """

    shift: float = 0.0
    scale: float = 1.0

    def apply(self, cosine: Any) -> Any:
        """The mapped cosine: a float, or a numpy array elementwise."""
        return self.shift + self.scale * cosine


IDENTITY_SCALE = SimilarityScale()


def fit_similarity_scale(
    vectors: np.ndarray, target_mean: float, target_std: float, pairs: int = 8192, seed: int = 0
) -> SimilarityScale:
    """The :class:`SimilarityScale` of one version from its item vectors (unit rows, any order).

    Item-to-item cosines of ``pairs`` random pairs (a fixed ``seed``: the same vectors
    always give the same map) are matched to ``target_mean`` and ``target_std``. Fewer
    than two items, or a degenerate spread, give the identity.
    """
    n = int(vectors.shape[0])
    if n < 2:
        return IDENTITY_SCALE
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, n, pairs), rng.integers(0, n, pairs)
    keep = i != j
    cos = np.einsum("ij,ij->i", vectors[i[keep]], vectors[j[keep]]).astype(np.float64)
    std = float(cos.std())
    if cos.size < 2 or not math.isfinite(std) or std < 1e-6:
        return IDENTITY_SCALE
    scale = target_std / std
    return SimilarityScale(target_mean - scale * float(cos.mean()), scale)


def scale_from_settings(vectors: np.ndarray, settings: Any) -> SimilarityScale:
    """:func:`fit_similarity_scale` with the settings' reference, or the identity when calibration is off."""
    if not settings.blend_calibrate_similarity:
        return IDENTITY_SCALE
    return fit_similarity_scale(vectors, settings.blend_similarity_mean, settings.blend_similarity_std)


def weights_from_settings(settings: Any) -> BlendWeights | LogBlendWeights:
    """The weights of the blend ``settings.blend_mode`` selects; their type selects the formula."""
    if settings.blend_mode == "log":
        return LogBlendWeights.from_settings(settings)
    if settings.blend_mode == "linear":
        return BlendWeights.from_settings(settings)
    raise ValueError(f"blend_mode is {settings.blend_mode!r}; expected 'log' or 'linear'")


class HistoryItem(Protocol):
    """What scoring needs of one interaction (``ranking.user_state.Interaction`` has it)."""

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


def log_blend_terms(
    repeat: np.ndarray, similarity: np.ndarray, popularity: np.ndarray, is_new: np.ndarray, weights: LogBlendWeights
) -> np.ndarray:
    """The log blend per element, on arrays: the one place its formula is written.

    ``repeat`` is already normalised to [0, 1] by the shopper's maximum (0 = never
    bought), ``similarity`` is cosine (negatives count as 0), ``popularity`` is in
    [0, 1], ``is_new`` is 0/1. :func:`log_blend` (serving and the evaluation, a few
    hundred candidates) and the ranker's fallback over feature rows both call it, so
    they cannot drift apart.
    """
    return (
        weights.repeat * np.log(repeat + weights.repeat_floor)
        + weights.popularity * np.log(np.maximum(popularity, 0.0) + weights.popularity_floor)
        + weights.similarity * np.maximum(similarity, 0.0)
        + weights.new * is_new
    )


def log_blend(
    repeat: Mapping[str, float],
    similarity: Mapping[str, float],
    popularity: Mapping[str, float],
    new_items: Collection[str],
    weights: LogBlendWeights,
    candidates: Iterable[str] | None = None,
) -> dict[str, float]:
    """The /recommend score of each candidate under the log blend (module docstring).

    Inputs as for :func:`blend`, plus ``new_items`` (:func:`new_arrivals`). Candidates
    default to the union of repeat, similarity and new keys; as with :func:`blend` a
    popular item enters only through ``candidates``.
    """
    rep = normalise_by_max(repeat)
    pool = list(dict.fromkeys([*rep, *similarity, *new_items]) if candidates is None else dict.fromkeys(candidates))
    if not pool:
        return {}
    n = len(pool)
    scores = log_blend_terms(
        np.fromiter((rep.get(i, 0.0) for i in pool), dtype=np.float64, count=n),
        np.fromiter((similarity.get(i, 0.0) for i in pool), dtype=np.float64, count=n),
        np.fromiter((popularity.get(i, 0.0) for i in pool), dtype=np.float64, count=n),
        np.fromiter((1.0 if i in new_items else 0.0 for i in pool), dtype=np.float64, count=n),
        weights,
    )
    return dict(zip(pool, scores.tolist(), strict=True))


def new_arrivals(first_seen: Mapping[str, float], now_ts: float, new_s: float) -> frozenset[str]:
    """Items first seen at most ``new_s`` seconds before ``now_ts`` (the log blend's ``is_new``).

    ``now_ts`` is event time (serving: the newest event the flow has seen, as fresh
    popularity uses; the evaluation: the basket's time), never the wall clock, so a
    replayed dataset years old still has new arrivals.
    """
    return frozenset(item for item, ts in first_seen.items() if now_ts - ts <= new_s)


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
    weights: BlendWeights | LogBlendWeights,
    k: int,
    *,
    now_ts: float,
    half_life_s: float,
    candidates: int = 200,
    new_items: Collection[str] = frozenset(),
    similarity_scale: SimilarityScale = IDENTITY_SCALE,
) -> list[tuple[str, float]]:
    """Rank items for one user; a cold user (no history, no repeats) gets popularity.

    Candidates are the user's repeat items, the ``candidates`` nearest items to the
    user vector, the ``candidates`` most popular items (``popular_top``, best first)
    and, under the log blend (``LogBlendWeights``), every new arrival (``new_items``):
    a new line has little popularity yet and may not be near the user, and finding it
    is what the bonus is for. Every candidate is scored on all signals, with similarity
    computed from the same ``space`` the neighbours came from (and mapped by that
    space's ``similarity_scale``), and only items present in that space are returned, so
    a deleted item never comes back through Redis history.
    """
    new = new_items if isinstance(weights, LogBlendWeights) else ()
    hw = history_weights(history, now_ts, half_life_s)
    vecs = space.vectors(list(dict.fromkeys([*hw, *repeat, *popular_top[:candidates], *new])))
    uvec = user_vector(hw, vecs)
    sims: dict[str, float] = {}
    if uvec is not None:
        for item, score in space.nearest(uvec, candidates):
            sims[item] = score
            vecs.setdefault(item, _NO_VECTOR)
        for item, vec in vecs.items():
            if item not in sims and vec is not _NO_VECTOR:
                sims[item] = float(vec @ uvec)
        if similarity_scale != IDENTITY_SCALE:
            sims = {item: similarity_scale.apply(c) for item, c in sims.items()}
    pool = list(vecs)  # present in the space: repeats, history, neighbours, popular, new
    if isinstance(weights, LogBlendWeights):
        return top_k(log_blend(repeat, sims, popularity, new, weights, candidates=pool), k)
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
