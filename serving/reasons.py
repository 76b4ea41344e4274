"""Why an item is recommended: a few short phrases per item, from what the ranking already knows.

Nothing here ranks or scores; it only names the signals that put an item in the answer,
so a shopper (or the demo page) can read "bought before", "bought together with WHITE
HANGING HEART T-LIGHT HOLDER", "shoppers like you bought it", "similar to what you
viewed", "popular now" or "new arrival" next to it.

* The ranker path: each candidate carries the bit flags of the sources that proposed it
  (``ranking.features.OWN``, ``COPURCHASE``, ...); :func:`ranker_reasons` names them.
  The co-purchase reason names the shopper's item it was bought together with when the
  co-purchase rows are at hand (:func:`copurchase_anchors`), else it stays generic.
* The blend path: :func:`blend_reasons` names the terms of ``ranking.scoring``'s blend that
  lifted the item (repeat above 0, a high similarity, popularity, newness).

Pure functions over plain data: serving gathers the inputs (see ``serving.app``).

Example::

    >>> from ranking.features import COPURCHASE, POPULAR
    >>> ranker_reasons(COPURCHASE | POPULAR, anchor="Red mug")
    ['bought together with Red mug', 'popular now']
    >>> blend_reasons(repeat=0.0, similarity=0.8, popular=False, new=True)
    ['similar to what you viewed', 'new arrival']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ranking.features import ANN, COPURCHASE, NEIGHBOURS, NEW, OWN, POPULAR, ShopperView
from ranking.scoring import SimilarityScale, history_weights, user_vector
from ranking.user_state import UserState

BOUGHT_BEFORE = "bought before"
LOOKED_AT = "you looked at it"
BOUGHT_TOGETHER = "often bought together with your items"
SHOPPERS_LIKE_YOU = "shoppers like you bought it"
SIMILAR = "similar to what you viewed"
POPULAR_NOW = "popular now"
NEW_ARRIVAL = "new arrival"

# The blend's similarity counts as a reason from this mapped cosine up: the base model's
# user-to-item cosines average 0.42 with a spread of 0.12 (ranking.scoring.SimilarityScale
# maps every version onto that spread), so 0.5 is clearly nearer than usual.
SIMILAR_MIN = 0.5
# "Popular now" in the blend: among this many best sellers of fresh popularity.
POPULAR_TOP = 50
MAX_TITLE = 60  # a reason quotes at most this much of an item's title


def ranker_reasons(
    flags: int,
    *,
    bought: bool = False,
    anchor: str | None = None,
) -> list[str]:
    """The reasons of one ranker candidate from its source bit flags, strongest kind first.

    ``bought``: the shopper bought it (the ``OWN`` flag then reads "bought before", else
    "you looked at it"). ``anchor``: the title (or id) of the shopper's item it is most
    bought together with, named by the ``COPURCHASE`` reason when given.
    """
    out: list[str] = []
    if flags & OWN:
        out.append(BOUGHT_BEFORE if bought else LOOKED_AT)
    if flags & COPURCHASE:
        out.append(f"bought together with {_short(anchor)}" if anchor else BOUGHT_TOGETHER)
    if flags & NEIGHBOURS:
        out.append(SHOPPERS_LIKE_YOU)
    if flags & ANN:
        out.append(SIMILAR)
    if flags & POPULAR:
        out.append(POPULAR_NOW)
    if flags & NEW:
        out.append(NEW_ARRIVAL)
    return out


def blend_reasons(*, repeat: float, similarity: float | None, popular: bool, new: bool) -> list[str]:
    """The reasons of one blend answer from its terms (``ranking.scoring.recommend``'s inputs).

    ``repeat`` is the shopper's basket score of the item (above 0: bought before);
    ``similarity`` the mapped cosine to the user vector (None: no vector); ``popular``
    whether it is among the best sellers; ``new`` whether it is a new arrival. An item
    the blend ranked on weaker signals alone still gets one reason: the stronger of
    similarity and popularity.
    """
    out: list[str] = []
    if repeat > 0:
        out.append(BOUGHT_BEFORE)
    if similarity is not None and similarity >= SIMILAR_MIN:
        out.append(SIMILAR)
    if popular:
        out.append(POPULAR_NOW)
    if new:
        out.append(NEW_ARRIVAL)
    if not out:
        out.append(SIMILAR if similarity is not None and similarity > 0 else POPULAR_NOW)
    return out


def copurchase_anchors(
    items: Iterable[str],
    rows: Mapping[str, Mapping[str, float]],
    shrink: float = 10.0,
) -> dict[str, str]:
    """For each of ``items``, the shopper's item whose co-purchase row holds it most strongly.

    ``rows`` are the decayed co-purchase rows of the shopper's profile and last basket
    (``ranking.features.ShopperView.copurchase``), judged by the same shrunk confidence
    the ``cooc`` features use (``ranking.collab.confidence``); ties go to the smaller id.
    Items no row holds are left out.
    """
    wanted = list(dict.fromkeys(items))
    best: dict[str, tuple[float, str]] = {}
    for anchor in sorted(rows):
        row = rows[anchor]
        denom = row.get(anchor, 0.0) + shrink  # ranking.collab.confidence's, looked up for the answer's items only
        for other in wanted:
            v = row.get(other)
            if v is None or other == anchor:
                continue
            c = v / denom
            if c > best.get(other, (0.0, ""))[0]:
                best[other] = (c, anchor)
    return {item: anchor for item, (_, anchor) in best.items()}


def sources_from_view(
    items: Sequence[str],
    *,
    own: Iterable[str],
    copurchase: Mapping[str, Mapping[str, float]],
    neighbour_items: Iterable[str],
    popular_top: Sequence[str],
    new_items: Iterable[str],
) -> list[int]:
    """Source flags for items ranked without them, rebuilt from the shopper's inputs.

    An approximation for when the ranked answer does not carry the candidates' own flags
    (``serving.ranked.RankerAnswer.scored``, :func:`ranked_flags`): an item is ``OWN`` if it is in ``own``
    (the shopper's baskets and history), ``COPURCHASE`` if a profile row holds it,
    ``NEIGHBOURS`` if a nearest shopper bought it, ``POPULAR`` if in ``popular_top``
    (the candidates' share of it), ``NEW`` if in ``new_items``; an item none of these
    explain came from the index's nearest items (``ANN``).
    """
    own_set, nb, top, fresh = set(own), set(neighbour_items), set(popular_top), set(new_items)
    co: set[str] = set()
    for anchor, row in copurchase.items():
        co.update(i for i in row if i != anchor)
    out: list[int] = []
    for item in items:
        flags = (
            (OWN if item in own_set else 0)
            | (COPURCHASE if item in co else 0)
            | (NEIGHBOURS if item in nb else 0)
            | (POPULAR if item in top else 0)
            | (NEW if item in fresh else 0)
        )
        out.append(flags or ANN)
    return out


def _short(title: str | None) -> str:
    text = (title or "").strip()
    return text if len(text) <= MAX_TITLE else text[: MAX_TITLE - 1].rstrip() + "…"


# -- the two paths of /recommend, over the data serving already holds --------------------------


def explain_ranked(
    items: Sequence[str],
    state: UserState,
    view: ShopperView | None,
    *,
    sources: Sequence[int] | None,
    popular_top: Sequence[str],
    new_items: Sequence[str],
    titles: Mapping[str, str],
    shrink: float = 10.0,
) -> list[list[str]]:
    """Reasons for the ranker's answer ``items`` (best first), one list per item.

    ``sources`` are the candidates' own flags aligned with ``items`` when the ranked
    answer carries them; None rebuilds them from ``view`` (:func:`sources_from_view`).
    ``view`` is the :class:`~ranking.features.ShopperView` the ranker was given (its
    co-purchase rows name the anchor of "bought together with"; None: generic reasons).
    """
    rows = view.copurchase if view is not None else {}
    if sources is None or len(sources) != len(items):
        nb: set[str] = set()
        for _, other in view.neighbours if view is not None else ():
            # a UserState, or the ranking.collab.NeighbourSummary serving caches in its place
            bits = getattr(other, "basket_bits", None)
            nb.update(bits if bits is not None else (item for item, _ in getattr(other, "purchases", ())))
        sources = sources_from_view(
            items,
            own=[*state.basket_bits, *(h.item_id for h in state.history if h.kind != "cancel")],
            copurchase=rows,
            neighbour_items=nb,
            popular_top=popular_top,
            new_items=new_items,
        )
    anchors = copurchase_anchors(items, rows, shrink)
    return [
        ranker_reasons(
            int(flags),
            bought=item in state.basket_bits,
            anchor=(titles.get(anchors[item]) or anchors[item]) if item in anchors else None,
        )
        for item, flags in zip(items, sources, strict=True)
    ]


def ranked_flags(items: Sequence[str], scored: Any) -> list[int] | None:
    """The source flags of ``items`` from the scored candidates (``serving.ranked.RankerAnswer.scored``,
    a :class:`~ranking.features.Candidates`), or None when the answer carries none."""
    if scored is None:
        return None
    flags = dict(zip(scored.items, np.asarray(scored.sources).tolist(), strict=True))
    return [int(flags.get(item, 0)) for item in items]


def explain_blend(
    items: Sequence[str],
    state: UserState,
    *,
    vectors: Mapping[str, np.ndarray],
    half_life_s: float,
    scale: SimilarityScale,
    basket_decay: float,
    popular_top: Sequence[str],
    new_items: Iterable[str],
) -> list[list[str]]:
    """Reasons for the blend's answer ``items``, one list per item.

    ``vectors`` are one pair's vectors of the shopper's history and of ``items`` (the
    user vector is rebuilt from them as ``ranking.scoring.recommend`` builds it);
    ``new_items`` is empty when the blend gives no new-arrival bonus (the linear blend).
    """
    repeat = state.basket_scores(basket_decay)
    hw = history_weights(state.history, state.last_ts, half_life_s)
    uvec = user_vector(hw, vectors)
    top = set(popular_top[:POPULAR_TOP])
    fresh = set(new_items)
    out: list[list[str]] = []
    for item in items:
        vec = vectors.get(item)
        sim = None if uvec is None or vec is None else float(scale.apply(float(vec @ uvec)))
        out.append(blend_reasons(repeat=repeat.get(item, 0.0), similarity=sim, popular=item in top, new=item in fresh))
    return out
