"""The shop-wide half of the ranker's inputs, kept in memory and refreshed in the background.

``ranking.features.ShopView`` holds catalog-sized maps (popularity at three horizons,
first-seen times, basket and buyer counts): reading them per request would cost more
than the whole ranking budget (issue 14 item 4: +1 ms p50). As
:class:`serving.shopper_data.PopularityCache` does for served popularity, a thread
re-reads them every ``popularity_refresh_s`` and publishes one frozen view with one
attribute store; requests read :attr:`ShopCache.view` and never wait on Redis for it.
When Redis goes away the last view keeps answering (``last_error`` says why it is old).

Served popularity (``popularity``, ``popular_top``) is the popularity cache's own
reading, so the ranker's popularity column and the blend's are the same numbers.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

from ranking.features import FeatureRules, ShopView, new_items_order, with_columns

from .collab_data import CollabShop
from .shopper_data import PopularityCache, PopularityView

log = logging.getLogger("freshrec.serving.shop")


def shop_view(collab: CollabShop, popularity: PopularityView, rules: FeatureRules) -> ShopView:
    """The contract's ShopView from the collaborative reading and served popularity.

    "Now" is the newest event time the collaborative flow has applied (event time, never
    the wall clock: a replayed shop is years old); without one yet, the newest first-seen
    time. The view carries its :class:`~ranking.features.ShopColumns` (built here, once
    per reading, off the request path).
    """
    now = collab.newest_ts or max(collab.first_seen.values(), default=0.0)
    return with_columns(ShopView(
        now_ts=now,
        popularity=popularity.scores,
        pop_short=collab.pop_short,
        pop_long=collab.pop_long,
        first_seen=collab.first_seen,
        baskets=collab.baskets,
        buyers=collab.buyers,
        popular_top=popularity.ranked[: rules.popular],
        new_items=new_items_order(collab.first_seen, now, rules.new_s, rules.new),
    ))


class ShopCache:
    """Keeps the latest :class:`~ranking.features.ShopView`, rebuilt when either input moved."""

    def __init__(
        self,
        read: Callable[[CollabShop | None], CollabShop],
        popularity: PopularityCache,
        rules: FeatureRules,
        every_s: float,
    ) -> None:
        self._read = read
        self.popularity = popularity
        self.rules = rules
        self.every_s = every_s
        self.collab: CollabShop | None = None
        self._generations = itertools.count()
        # None until the first reading: the ranker path falls back
        self._stamped: tuple[int, ShopView | None] = (next(self._generations), None)
        self.last_error: str | None = None
        self.refreshes = 0
        self._built_from: tuple[Any, Any] = (None, None)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        popularity.listeners.append(self.on_popularity)

    @property
    def view(self) -> ShopView | None:
        return self._stamped[1]

    @view.setter
    def view(self, view: ShopView | None) -> None:
        # a number of its own for every view published: serving.result_cache keys on it
        self._stamped = (next(self._generations), view)

    @property
    def stamped(self) -> tuple[int, ShopView | None]:
        """``(generation, view)`` read together: each generation names exactly one view."""
        return self._stamped

    def refresh(self) -> bool:
        """Re-read the collaborative state (unchanged state: no large read) and rebuild if anything moved."""
        try:
            collab = self._read(self.collab)
        except Exception as exc:  # keep the last view; say why in /admin/status
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        self.collab = collab
        self.last_error = None
        self._rebuild(collab, self.popularity.view)
        return True

    def on_popularity(self, view: PopularityView) -> None:
        """A new popularity reading: rebuild at once, so the ranker and the blend see the same one."""
        if self.collab is not None:
            self._rebuild(self.collab, view)

    def _rebuild(self, collab: CollabShop, pop: PopularityView) -> None:
        with self._lock:
            built_collab, built_pop = self._built_from
            if self.view is None or built_collab is not collab or built_pop is not pop:
                self.view = shop_view(collab, pop, self.rules)
                self._built_from = (collab, pop)
                self.refreshes += 1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shop-view", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.refresh():
                log.debug("shop view refresh failed: %s", self.last_error)
            self._stop.wait(self.every_s)
