"""Serving's /recommend blend over the whole catalog at once (numpy, one row per basket).

``serving.scoring.blend`` scores a dict of candidates in Python, which is right for one
request but would cost minutes over ten thousand baskets x 4,400 items. These functions
compute the very same numbers as arrays indexed by item: the unit tests check
:func:`dense_blend` against ``serving.scoring.blend`` on the same inputs, so the
evaluation measures what serving serves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serving.scoring import BlendWeights


def dense_blend(
    repeat: np.ndarray,
    similarity: np.ndarray,
    popularity: np.ndarray,
    weights: BlendWeights,
    pool: np.ndarray | None = None,
) -> np.ndarray:
    """``serving.scoring.blend`` per item index; items outside ``pool`` get -inf.

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

    ``serving.scoring.recommend`` asks the index for the ``candidates`` nearest items
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


# -- the proposed /recommend blend (log-space) --------------------------------------------


@dataclass(frozen=True, slots=True)
class LogBlendWeights:
    """Weights of the log-space blend (settings ``eval_blend_*``; proposed for serving).

    Measured on the validation window (history < 2011-03-01, baskets 2011-03..05):
    multiplying the signals (adding logs) ranks a shopper's repeat items by how popular
    they are right now (this shop is seasonal), which the linear blend cannot do, and
    a small bonus for items that arrived recently finds what shoppers buy for the first
    time (new lines sell to existing customers).
    """

    repeat: float = 1.0
    similarity: float = 2.0
    popularity: float = 0.8
    new: float = 0.5
    repeat_floor: float = 0.005
    popularity_floor: float = 1e-3


def log_blend(
    repeat: np.ndarray,
    similarity: np.ndarray,
    popularity: np.ndarray,
    is_new: np.ndarray,
    weights: LogBlendWeights,
    pool: np.ndarray | None = None,
) -> np.ndarray:
    """``w.repeat*log(rep/max + f_r) + w.pop*log(pop + f_p) + w.sim*max(cos, 0) + w.new*is_new``.

    ``repeat`` raw (normalised by the shopper's maximum; 0 for never bought, which then
    scores log(f_r): a never-bought item needs similarity, popularity or newness to
    climb over bought ones), ``popularity`` in [0, 1], ``is_new`` 0/1 per item.
    Items outside ``pool`` get -inf.
    """
    top = float(repeat.max(initial=0.0))
    rep = np.where(repeat > 0, repeat / top, 0.0) if top > 0 else np.zeros_like(repeat)
    s = (
        weights.repeat * np.log(rep + weights.repeat_floor)
        + weights.popularity * np.log(np.maximum(popularity, 0.0) + weights.popularity_floor)
        + weights.similarity * np.maximum(similarity, 0.0)
        + weights.new * is_new
    )
    if pool is not None:
        s = np.where(pool, s, -np.inf)
    return s
