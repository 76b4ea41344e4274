"""Serving's /recommend blends over the whole catalog at once (numpy, one row per basket).

``ranking.scoring.blend`` and ``ranking.scoring.log_blend`` score a dict of candidates,
which is right for one request but would cost minutes over ten thousand baskets x 4,400
items. These functions compute the very same numbers as arrays indexed by item: the log
blend's formula itself is ``ranking.scoring.log_blend_terms`` (shared, not copied), and
the unit tests check :func:`dense_blend` and :func:`log_blend` against serving's
per-request functions on the same inputs, so the evaluation measures what serving serves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ranking.scoring import BlendWeights, LogBlendWeights, log_blend_terms

__all__ = ["LogBlendWeights", "candidate_pool", "dense_blend", "log_blend"]


def dense_blend(
    repeat: np.ndarray,
    similarity: np.ndarray,
    popularity: np.ndarray,
    weights: BlendWeights,
    pool: np.ndarray | None = None,
) -> np.ndarray:
    """``ranking.scoring.blend`` per item index; items outside ``pool`` get -inf.

    ``repeat`` raw (normalised here by its positive maximum), ``similarity`` cosine
    (negatives count as 0), ``popularity`` already in [0, 1].
    """
    top = float(repeat.max(initial=0.0))
    rep = np.where(repeat > 0, repeat / top, 0.0) if top > 0 else np.zeros_like(repeat)
    s = weights.repeat * rep + weights.similarity * np.maximum(similarity, 0.0) + weights.popularity * popularity
    if pool is not None:
        s = np.where(pool, s, -np.inf)
    return s


def _top(values: np.ndarray, n: int) -> np.ndarray:
    if n >= values.size:
        return np.arange(values.size)
    return np.argpartition(-values, n - 1)[:n]


def candidate_pool(
    repeat: np.ndarray,
    similarity: np.ndarray,
    popularity: np.ndarray,
    history: Sequence[int],
    candidates: int,
    is_new: np.ndarray | None = None,
) -> np.ndarray:
    """Serving's candidates as a mask: repeats, history, nearest and most popular items.

    ``ranking.scoring.recommend`` asks the index for the ``candidates`` nearest items
    and takes the ``candidates`` most popular (those with any popularity); a shopper
    without a user vector (all similarities 0) gets no neighbours. ``is_new`` (the log
    blend's new arrivals, at most a few hundred here) joins the pool when given.
    """
    pool = repeat > 0
    if is_new is not None:
        pool |= is_new > 0
    if len(history):
        pool[np.asarray(history, dtype=np.int64)] = True
    pop_top = _top(popularity, candidates)
    pool[pop_top[popularity[pop_top] > 0]] = True
    if np.any(similarity != 0):
        pool[_top(similarity, candidates)] = True
    return pool


# -- the log-space blend (serving's default) -----------------------------------------------


def log_blend(
    repeat: np.ndarray,
    similarity: np.ndarray,
    popularity: np.ndarray,
    is_new: np.ndarray,
    weights: LogBlendWeights,
    pool: np.ndarray | None = None,
) -> np.ndarray:
    """``ranking.scoring.log_blend`` per item index; items outside ``pool`` get -inf.

    ``repeat`` raw (normalised here by the shopper's maximum; 0 for never bought),
    ``popularity`` in [0, 1], ``is_new`` 0/1 per item (``ranking.scoring.new_arrivals``
    as a mask).
    """
    top = float(repeat.max(initial=0.0))
    rep = np.where(repeat > 0, repeat / top, 0.0) if top > 0 else np.zeros_like(repeat)
    s = log_blend_terms(rep, similarity, popularity, is_new, weights)
    if pool is not None:
        s = np.where(pool, s, -np.inf)
    return s
