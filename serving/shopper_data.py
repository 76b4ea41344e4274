"""What serving reads from Redis, guarded so a Redis outage degrades instead of stalling.

Invariant 4: serving never blocks on a dependency. Two measures:

* :class:`RedisGate`: request-path reads go through a client with a short timeout
  (``settings.redis_timeout_s``); after ``failure_threshold`` consecutive failures the
  gate stays *open* for ``retry_after_s`` and fails calls at once, so a dead Redis costs
  a few timeouts per second, not one per request. One failure alone does not open it:
  in the demo a single read that waited for the GIL behind an index build (Redis itself
  was fine) used to turn every request degraded for a second.
* :class:`PopularityCache`: fresh popularity is read by a background thread every
  ``settings.popularity_refresh_s`` and kept in memory, ranked, together with the
  items that are new arrivals (first seen within ``blend_new_days`` of the newest event
  time, for the log blend). Requests never read them from Redis, and when Redis goes
  away the last ranking keeps answering. The same refresh counts the partitions whose
  events Redis holds (the users flow's applied offsets), which is how serving knows a
  reachable Redis is empty (new, restarted without persistence, being rebuilt) without
  a read per request; :func:`state_gap` turns that into the reason a response gives.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from ranking.scoring import new_arrivals

log = logging.getLogger("freshrec.serving.redis")

T = TypeVar("T")


class RedisUnavailable(Exception):
    """Redis could not answer in time; the message says why (shown as the degraded reason)."""


class RedisGate:
    """Calls into Redis that fail fast while Redis is known to be down."""

    def __init__(
        self, retry_after_s: float = 1.0, clock: Callable[[], float] = time.monotonic, failure_threshold: int = 3
    ) -> None:
        self.retry_after_s = retry_after_s
        self.failure_threshold = failure_threshold
        self._clock = clock
        self._open_until = 0.0
        self._consecutive = 0
        self.last_error: str | None = None
        self.failures = 0

    @property
    def healthy(self) -> bool:
        return self._clock() >= self._open_until

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._clock() < self._open_until:
            raise RedisUnavailable(f"redis unavailable ({self.last_error}); retrying within {self.retry_after_s:.0f} s")
        try:
            result = fn(*args)
        except Exception as exc:
            import redis

            if not isinstance(exc, (redis.RedisError, OSError)):
                raise
            self.failures += 1
            self._consecutive += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self._consecutive >= self.failure_threshold:
                self._open_until = self._clock() + self.retry_after_s
            raise RedisUnavailable(f"redis unavailable ({self.last_error})") from None
        self._consecutive = 0
        return result


class PopularityReading(Protocol):
    """What the cache reads (``stores.user_store.FreshPopularity`` has it)."""

    @property
    def scores(self) -> Mapping[str, float]: ...

    @property
    def first_seen(self) -> Mapping[str, float]: ...

    @property
    def newest_ts(self) -> float: ...


@dataclass(frozen=True)
class PopularityView:
    """One ranking of fresh popularity: normalised scores (max 1), the ids best first, and
    the new arrivals (``scoring.new_arrivals`` as of the newest event time seen)."""

    scores: dict[str, float] = field(default_factory=dict)
    ranked: tuple[str, ...] = ()
    read_at: float = 0.0
    new_items: frozenset[str] = frozenset()
    # Partitions with applied events in Redis (stores.user_store.read_applied_offsets);
    # None: not read (no reader given, or nothing read yet).
    applied_partitions: int | None = None

    @classmethod
    def of(
        cls,
        raw: Mapping[str, float],
        read_at: float | None = None,
        *,
        first_seen: Mapping[str, float] | None = None,
        now_ts: float = 0.0,
        new_s: float = 0.0,
        applied_partitions: int | None = None,
    ) -> PopularityView:
        at = time.time() if read_at is None else read_at
        new = new_arrivals(first_seen, now_ts, new_s) if first_seen else frozenset()
        top = max((v for v in raw.values() if v > 0), default=0.0)
        if top <= 0:
            return cls(read_at=at, new_items=new, applied_partitions=applied_partitions)
        scores = {k: v / top for k, v in raw.items() if v > 0}
        ranked = tuple(sorted(scores, key=lambda i: (-scores[i], i)))
        return cls(scores, ranked, at, new, applied_partitions)


EMPTY_STATE = "state is empty or being rebuilt"


def state_gap(view: PopularityView, index_items: int, cold: bool) -> str | None:
    """Why an answer from this state is hollow (the ``reason`` of a degraded response), or None.

    Redis answering is not enough: a new Redis, one restarted without persistence, or one
    the users flow is still rewriting from its snapshots answers every read with "nothing",
    and a recommendation from that looks like a real one. ``cold``: the answer is
    popularity alone, so an empty popularity ranking makes it empty too.
    """
    if index_items == 0:
        return f"{EMPTY_STATE}: the catalog is empty (no items indexed yet; is `freshrec stream catalog` running?)"
    if view.applied_partitions == 0:
        return f"{EMPTY_STATE}: Redis holds no applied events (a new or emptied Redis, or no events yet)"
    if cold and not view.ranked and view.applied_partitions is not None:
        return f"{EMPTY_STATE}: no popularity in Redis yet (no purchases applied)"
    return None


class PopularityCache:
    """Keeps the latest :class:`PopularityView`, refreshed in the background.

    ``new_s`` is the log blend's "new" window (``blend_new_days`` in seconds), judged
    against the reading's newest event time, the same "now" popularity is decayed to.
    """

    def __init__(
        self,
        read: Callable[[], PopularityReading],
        every_s: float,
        new_s: float = 0.0,
        read_applied: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self._read = read
        # The users flow's applied offsets (``<topic>:<partition>`` -> offset), read with
        # popularity so that "Redis is empty" costs no request a Redis read.
        self.read_applied = read_applied
        self.every_s = every_s
        self.new_s = new_s
        self._generations = itertools.count()
        self._stamped: tuple[int, PopularityView] = (next(self._generations), PopularityView())
        self.last_error: str | None = None
        self.loaded = threading.Event()  # a ranking was read
        self.attempted = threading.Event()  # the first read finished, well or not
        # called with each new view, on the refreshing thread (the ranker's shop view
        # rebuilds from it, so the two never serve different popularity for long)
        self.listeners: list[Callable[[PopularityView], None]] = []
        self._offsets_read: dict[str, int] | None = None  # the applied offsets the view was read at
        self.unchanged = 0  # refreshes skipped because nothing was applied since
        self.checked_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def view(self) -> PopularityView:
        """The latest ranking (one attribute read; requests never wait for a refresh)."""
        return self._stamped[1]

    @view.setter
    def view(self, view: PopularityView) -> None:
        # a number of its own for every view published: serving.result_cache keys on it
        self._stamped = (next(self._generations), view)

    @property
    def stamped(self) -> tuple[int, PopularityView]:
        """``(generation, view)`` read together: each generation names exactly one view."""
        return self._stamped

    def refresh(self) -> bool:
        """Re-read popularity, unless the users flow has applied nothing since the last read.

        Popularity and first-seen times change only in the users flow's batch writes, which
        set the applied offsets in the same atomic call: unchanged offsets mean unchanged
        hashes, so an idle shop costs one small read per interval instead of every hash,
        and the view (and the ranker's shop view built from it) stays the same object.
        The offsets are read first, so a write landing between the two reads is seen as a
        change next time, never missed.
        """
        try:
            applied = None if self.read_applied is None else dict(self.read_applied())
            self.checked_at = time.time()
            if applied is not None and applied == self._offsets_read and self.loaded.is_set():
                self.unchanged += 1
                self.last_error = None
                return True
            got = self._read()
            self.view = PopularityView.of(
                got.scores, first_seen=got.first_seen, now_ts=got.newest_ts, new_s=self.new_s,
                applied_partitions=None if applied is None else len(applied),
            )
            self._offsets_read = applied
            self.last_error = None
            self.loaded.set()
        except Exception as exc:  # keep the last ranking; say why in /admin/status
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.attempted.set()
            return False
        try:
            for listener in self.listeners:
                listener(self.view)
            return True
        except Exception:
            log.exception("popularity listener failed")
            return True
        finally:
            self.attempted.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="popularity", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.refresh():
                log.debug("popularity refresh failed: %s", self.last_error)
            self._stop.wait(self.every_s)
