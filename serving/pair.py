"""The serving pair: one encoder and one index of one adapter version, behind one reference.

Invariant 1 (every vector serving compares was made by one adapter version) is kept by
construction rather than by checks: a request reads :attr:`ActivePair.pair` exactly once,
at its start, and from then on touches only that :class:`ServingPair`, whose encoder and
index were built for the same version. A swap replaces the whole pair with one
attribute store, which CPython makes atomic for readers, so a request sees the old pair
or the new one, never the encoder of one and the index of the other. A request in
flight keeps its pair alive by holding a reference; when the last one finishes, the old
pair is garbage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.encoder import TextEncoder

from ranking.scoring import IDENTITY_SCALE, SimilarityScale


@dataclass(frozen=True, eq=False)
class ServingPair:
    """An encoder and a complete index made with the same adapter version.

    ``index_version`` names this particular index build (``<adapter>@<n>``, n counting
    the builds of this process), so two builds of one adapter are distinguishable.
    The index keeps receiving item-vector upserts of its own version while active.
    """

    encoder: TextEncoder
    index: Any  # models.live_index.LiveIndex (Any: tests pass a numpy twin)
    adapter_version: str
    index_version: str
    built_at: float = field(default_factory=time.time)
    build_seconds: float = 0.0
    # hash of each item's encoder text as encoded into this index: lets the follower
    # tell a real catalog change from a re-publication of unchanged items.
    texts: dict[str, int] = field(default_factory=dict, repr=False)
    # how this version's cosines weigh in the blend (ranking.scoring.SimilarityScale)
    similarity: SimilarityScale = IDENTITY_SCALE

    def space(self) -> PairSpace:
        return PairSpace(self.index)


class PairSpace:
    """:class:`ranking.scoring.ItemSpace` over one pair's live index."""

    __slots__ = ("index",)

    def __init__(self, index: Any) -> None:
        self.index = index

    def vectors(self, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        return self.index.reconstruct_many(item_ids)

    def nearest(self, vector: np.ndarray, k: int, exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
        return self.index.search(vector, k, exclude=frozenset(exclude))[0]

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.index


class ActivePair:
    """The one reference to the pair that answers requests.

    Readers use :attr:`pair` (no lock: one attribute read). Writers (the swap, the
    item-vector follower) serialise on :attr:`write_lock`, so a swap can first apply
    the last changes to the new index and then publish it with nothing slipping in
    between.
    """

    def __init__(self, pair: ServingPair | None = None) -> None:
        self._pair = pair
        self.write_lock = threading.RLock()
        self._swaps = 0

    @property
    def pair(self) -> ServingPair | None:
        return self._pair

    @property
    def swaps(self) -> int:
        return self._swaps

    def swap(self, new: ServingPair) -> ServingPair | None:
        """Publish ``new``; return the pair it replaced (the caller drops it)."""
        with self.write_lock:
            old, self._pair = self._pair, new
            self._swaps += 1
            return old
