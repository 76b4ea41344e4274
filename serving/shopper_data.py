"""What serving reads from Redis, guarded so a Redis outage degrades instead of stalling.

Invariant 4: serving never blocks on a dependency. Two measures:

* :class:`RedisGate`: request-path reads go through a client with a short timeout
  (``settings.redis_timeout_s``); after a failure the gate stays *open* for
  ``retry_after_s`` and fails calls at once, so a dead Redis costs one timeout per
  second, not one per request.
* :class:`PopularityCache`: fresh popularity is read by a background thread every
  ``settings.popularity_refresh_s`` and kept in memory, ranked. Requests never read
  it from Redis, and when Redis goes away the last ranking keeps answering.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger("freshrec.serving.redis")

T = TypeVar("T")


class RedisUnavailable(Exception):
    """Redis could not answer in time; the message says why (shown as the degraded reason)."""


class RedisGate:
    """Calls into Redis that fail fast while Redis is known to be down."""

    def __init__(self, retry_after_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._open_until = 0.0
        self.last_error: str | None = None
        self.failures = 0

    @property
    def healthy(self) -> bool:
        return self._clock() >= self._open_until

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._clock() < self._open_until:
            raise RedisUnavailable(f"redis unavailable ({self.last_error}); retrying within {self.retry_after_s:.0f} s")
        try:
            return fn(*args)
        except Exception as exc:
            import redis

            if not isinstance(exc, (redis.RedisError, OSError)):
                raise
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._open_until = self._clock() + self.retry_after_s
            raise RedisUnavailable(f"redis unavailable ({self.last_error})") from None


@dataclass(frozen=True)
class PopularityView:
    """One ranking of fresh popularity: normalised scores (max 1) and the ids best first."""

    scores: dict[str, float] = field(default_factory=dict)
    ranked: tuple[str, ...] = ()
    read_at: float = 0.0

    @classmethod
    def of(cls, raw: dict[str, float], read_at: float | None = None) -> PopularityView:
        top = max((v for v in raw.values() if v > 0), default=0.0)
        if top <= 0:
            return cls(read_at=time.time() if read_at is None else read_at)
        scores = {k: v / top for k, v in raw.items() if v > 0}
        ranked = tuple(sorted(scores, key=lambda i: (-scores[i], i)))
        return cls(scores, ranked, time.time() if read_at is None else read_at)


class PopularityCache:
    """Keeps the latest :class:`PopularityView`, refreshed in the background."""

    def __init__(self, read: Callable[[], dict[str, float]], every_s: float) -> None:
        self._read = read
        self.every_s = every_s
        self.view = PopularityView()
        self.last_error: str | None = None
        self.loaded = threading.Event()  # a ranking was read
        self.attempted = threading.Event()  # the first read finished, well or not
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        try:
            self.view = PopularityView.of(self._read())
            self.last_error = None
            self.loaded.set()
            return True
        except Exception as exc:  # keep the last ranking; say why in /admin/status
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
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
