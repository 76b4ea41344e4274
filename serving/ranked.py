"""/recommend with the learned ranker: gather the inputs, compute the features, score, take the top k.

Everything that decides *what* a row holds is ``ranking.features`` (the one feature
module, invariant 5); this module only gathers the inputs the way serving keeps them:

* the shop-wide :class:`~ranking.features.ShopView` from memory (:mod:`serving.shop_view`),
  its "now" moved up to the shopper's newest event when that is newer (the stream
  computes a basket's features at the basket's own time, which is the shopper's newest);
* the shopper's :class:`~ranking.features.ShopperView`: their state (already read by the
  route), the co-purchase rows of ``rows_needed`` and their nearest shoppers' states in
  one Redis round trip (:func:`serving.collab_data.read_shopper_inputs`), the nearest
  shoppers found in memory (:mod:`serving.shoppers`) from the shopper's own vector;
* ANN candidates: the active pair's index nearest to the user vector, as the blend takes
  them, and the ``sim`` column from the same index's vectors and similarity scale, so
  every vector a request compares is of one adapter version (invariant 1).

Candidates missing from the index are dropped (a deleted item never comes back through
Redis history, as with the blend); a row does not depend on the other candidates, so
the drop leaves every other row as the stream would compute it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.ranker_registry import LoadedRanker
from ranking.collab import CollabRules, NeighbourSummary, shopper_vector
from ranking.features import (
    FEATURE_SCHEMA,
    SOURCE_NAMES,
    Candidates,
    FeatureRules,
    ShopperView,
    ShopView,
    candidates,
    feature_matrix,
    rows_needed,
    shopper_signals,
    similarity_column,
)
from ranking.scoring import SimilarityScale, history_weights, user_vector
from ranking.user_state import UserState

# (row items, neighbour ids, now) -> (decayed co-purchase rows, neighbour states or their summaries)
ReadInputs = Callable[
    [Sequence[str], Sequence[str], float], tuple[dict[str, dict[str, float]], Mapping[str, UserState | NeighbourSummary]]
]
# (shopper vector, k, exclude) -> [(user, similarity)], best first
FindNeighbours = Callable[[np.ndarray, int, str], list[tuple[str, float]]]


@dataclass(frozen=True)
class RankerAnswer:
    """The top ``k`` and what produced them (the bench and the tests read the rest).

    ``scored`` holds every scored candidate with its source flags (``ranking.features``:
    OWN, COPURCHASE, ...); :meth:`sources` names them for one item ("why recommended").
    """

    ranked: list[tuple[str, float]]
    candidates: int  # candidates scored (present in the index)
    proposed: int  # candidates proposed before the index filter
    scored: Candidates | None = None

    def sources(self, item: str) -> list[str]:
        """The names of the sources that proposed ``item`` ([] if it was not scored)."""
        if self.scored is None or item not in self.scored.items:
            return []
        flags = int(self.scored.sources[self.scored.items.index(item)])
        return [name for flag, name in SOURCE_NAMES.items() if flags & flag]


def gather_shopper(
    state: UserState,
    now_ts: float,
    rules: FeatureRules,
    collab_rules: CollabRules,
    neighbours_k: int,
    find_neighbours: FindNeighbours,
    read_inputs: ReadInputs,
) -> ShopperView:
    """The contract's ShopperView for one request (one Redis round trip)."""
    vec = shopper_vector(state, collab_rules)
    found = [] if vec is None else find_neighbours(vec, neighbours_k, state.user_id)
    rows, states = read_inputs(rows_needed(state, rules), [u for u, _ in found], now_ts)
    neighbours = [(sim, states[u]) for u, sim in found if u in states]
    return ShopperView(state, rows, neighbours)


def shop_at(shop: ShopView, state: UserState) -> ShopView:
    """The shop view with "now" no earlier than the shopper's newest event."""
    if state.last_ts > shop.now_ts:
        return dataclasses.replace(shop, now_ts=state.last_ts)
    return shop


def rank(
    ranker: LoadedRanker,
    view: ShopperView,
    shop: ShopView,
    index: Any,
    similarity: SimilarityScale,
    rules: FeatureRules,
    k: int,
) -> RankerAnswer:
    """Candidates, features and the ranker's top ``k`` for one shopper over one pair's ``index``.

    Raises whatever the ranker raises (``RankerMismatch``, ``RankerFailed``): the route
    falls back to the blend and says so.
    """
    state = view.state
    sig = shopper_signals(view, shop.now_ts, rules, shop)
    hw = history_weights(state.history, state.last_ts, rules.user_half_life_s)
    vectors = index.reconstruct_many(list(hw))
    uvec = user_vector(hw, vectors)
    ann = [] if uvec is None or rules.ann <= 0 else [i for i, _ in index.search(uvec, rules.ann)[0]]
    cands = candidates(sig, shop, rules, ann)
    proposed = len(cands)
    vectors.update(index.reconstruct_many([i for i in cands.items if i not in vectors]))
    present = np.fromiter((i in vectors for i in cands.items), dtype=bool, count=proposed)
    if not present.all():
        cands = cands.keep(present)
    if not cands.items:
        return RankerAnswer([], 0, proposed)
    sim = similarity_column(state, cands.items, vectors, rules, similarity)
    x = feature_matrix(sig, shop, cands.items, sim, rules)
    scores = ranker.model.score(x, schema=FEATURE_SCHEMA)
    return RankerAnswer(top(cands.items, scores, k), len(cands), proposed, cands)


def top(items: Sequence[str], scores: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The ``k`` best (item, score), ties by item id (reproducible, as ``scoring.top_k``)."""
    n = len(items)
    if n > 4 * k:
        cut = np.partition(scores, n - k)[n - k]  # the k-th largest score: all ties with it are kept
        pool = np.flatnonzero(scores >= cut).tolist()
    else:
        pool = range(n)
    best = sorted(pool, key=lambda r: (-float(scores[r]), items[r]))[:k]
    return [(items[r], float(scores[r])) for r in best]


# Why an answer was not ordered by the ranker (``ranker_fallback`` of a /recommend answer;
# the label set of ``freshrec_ranker_fallbacks``, fixed so it cannot grow).
FALLBACKS = {
    "no_ranker": "no ranker is active in the registry",
    "schema_mismatch": "the active ranker was trained on other features than serving computes",
    "ranker_refused": "the registry's active ranker did not verify (corrupt or missing files)",
    "ranker_error": "the ranker, its features or their inputs failed for this request",
    "redis": "the collaborative state could not be read in time",
    "no_shop_view": "the shop-wide state has not been read yet",
    "no_baskets": "the shopper has no purchase basket yet (the ranker learns on shoppers with one)",
    "cold": "an unknown shopper or one without history: popularity answers",
    "unavailable": "Redis could not be read: popularity answers",
}


def blocked_reason(code: str | None) -> str:
    """The fallback for an empty slot: why the registry's active ranker is not serving, if it is not."""
    if code == "schema_mismatch":
        return "schema_mismatch"
    if code is not None:
        return "ranker_refused"
    return "no_ranker"


def try_ranker(
    ranker: LoadedRanker | None,
    blocked_code: str | None,
    state: UserState,
    shop: ShopView | None,
    gather: Callable[[UserState, float], ShopperView],
    index: Any,
    similarity: SimilarityScale,
    rules: FeatureRules,
    k: int,
    on_error: Callable[[str, BaseException], None] | None = None,
) -> tuple[RankerAnswer | None, str | None]:
    """(the ranker's answer, None) or (None, the fallback code of :data:`FALLBACKS`).

    ``ranker`` is the slot's version read once by the caller, so the answer was made by
    exactly the version the response names. Nothing raises out of here: any failure of
    the ranker path is a fallback to the blend (DESIGN.md invariant 4).
    """
    from models.ranker import RankerMismatch

    from .shopper_data import RedisUnavailable

    if ranker is None:
        return None, blocked_reason(blocked_code)
    if not state.baskets:
        return None, "no_baskets"
    if shop is None:
        return None, "no_shop_view"
    try:
        shop_now = shop_at(shop, state)
        view = gather(state, shop_now.now_ts)
        return rank(ranker, view, shop_now, index, similarity, rules, k), None
    except RedisUnavailable as exc:
        code, err = "redis", exc
    except RankerMismatch as exc:
        code, err = "schema_mismatch", exc
    except Exception as exc:
        code, err = "ranker_error", exc
    if on_error is not None:
        on_error(code, err)
    return None, code
