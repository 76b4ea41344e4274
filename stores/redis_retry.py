"""Retry a flow's Redis calls through an outage: capped exponential backoff, forever.

Why forever: the flows hold every bit of state Redis should have (their snapshots), and
Kafka keeps the events, so the right response to an unreachable Redis is to stall and
resume, never to crash (a crash of a flow without a supervisor stops the whole pipeline,
and a restart would only meet the same outage). The wait starts at 0.1 s and doubles up
to ``stream_redis_backoff_max_s``; one log line when an outage starts and one when Redis
answers again, not one per attempt.

Only connection-level failures are retried (refused, reset, timed out, Redis still
loading its data): an error reply from Redis is a bug and raises. A call whose reply was
lost may have been executed; every call retried here is safe to repeat (the guarded
writes refuse an offset already held, reads have no effect).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

T = TypeVar("T")

RETRIED = (ConnectionError, TimeoutError, BusyLoadingError)


@dataclass
class Backoff:
    """Delays 0.1, 0.2, 0.4, ... seconds, capped at ``cap``; :meth:`reset` after a success."""

    cap: float = 5.0
    first: float = 0.1
    _next: float = 0.0

    def delay(self) -> float:
        self._next = self.first if self._next == 0.0 else min(self._next * 2, self.cap)
        return self._next

    def reset(self) -> None:
        self._next = 0.0


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def with_retry(
    call: Callable[[], T],
    what: str,
    cap: float = 5.0,
    log: Callable[[str], None] = _log,
    sleep: Callable[[float], None] | None = None,
) -> T:
    """``call()``, retried while Redis is unreachable; ``what`` names it in the log lines."""
    sleep = sleep or time.sleep
    backoff = Backoff(cap)
    started: float | None = None
    attempts = 0
    while True:
        try:
            result = call()
        except RETRIED as err:
            attempts += 1
            if started is None:
                started = time.monotonic()
                log(f"{what}: Redis unavailable ({type(err).__name__}: {err}); retrying with backoff up to {cap:g} s, "
                    "the flow waits and loses nothing")
            sleep(backoff.delay())
            continue
        if started is not None:
            log(f"{what}: Redis answers again after {time.monotonic() - started:.1f} s ({attempts} failed attempts); resuming")
        return result
