"""An open-loop request stream against ``/recommend`` for the whole fault run.

Open loop at a fixed rate (not closed loop as :mod:`bench._load`): an outage must not
slow the client down and so hide its own errors; every scheduled request is sent at its
time or, when ``max_in_flight`` requests already wait, recorded as ``skipped`` (the
bound keeps a dead server from piling up sockets). Each outcome is kept with its send
time, so errors can be split into those inside a fault's outage window and those outside.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from bench.report import percentile


@dataclass
class Outcome:
    t: float  # wall-clock send time
    status: int  # HTTP status; 0 = no answer (refused, reset, timed out)
    latency_s: float
    degraded: bool = False
    error: str = ""  # the error, or a degraded answer's reason


@dataclass
class RequestLoop:
    """Send ``GET /recommend?user_id=U&k=10`` at ``rate`` per second until :meth:`stop`."""

    port: int
    users: list[str]
    rate: float = 10.0
    timeout_s: float = 5.0
    max_in_flight: int = 16
    seed: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="fault-requests", daemon=True)

    def start(self) -> RequestLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s + 10)

    async def _one(self, client: httpx.AsyncClient, user: str) -> None:
        t, t0 = time.time(), time.perf_counter()
        try:
            r = await client.get("/recommend", params={"user_id": user, "k": 10})
            degraded, note = False, r.text[:200]
            if r.status_code == 200:
                body = r.json()
                degraded, note = bool(body.get("degraded")), str(body.get("reason") or "")[:200]
            self.outcomes.append(Outcome(t, r.status_code, time.perf_counter() - t0, degraded, note))
        except (httpx.HTTPError, OSError, ValueError) as exc:
            self.outcomes.append(Outcome(t, 0, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}"[:200]))

    async def _run(self) -> None:
        rng = random.Random(self.seed)
        limits = httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=self.timeout_s,
                                     limits=limits) as client:
            tasks: set[asyncio.Task[None]] = set()
            t0 = time.monotonic()
            i = 0
            while not self._stop.is_set():
                delay = t0 + i / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                i += 1
                if len(tasks) >= self.max_in_flight:
                    self.skipped += 1
                    continue
                task = asyncio.ensure_future(self._one(client, rng.choice(self.users)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=self.timeout_s + 1)


def split_errors(outcomes: list[Outcome], windows: list[tuple[float, float]]) -> dict[str, int]:
    """Errors (non-200 or no answer) inside and outside the outage windows, and degraded answers.

    A request is inside when its life (send to answer or give-up) overlaps a window: one
    sent just before a kill and cut by it belongs to the outage, not to the time outside.
    """
    def inside_span(o: Outcome) -> bool:
        return any(o.t <= b and o.t + o.latency_s >= a for a, b in windows)

    errs_in = sum(1 for o in outcomes if o.status != 200 and inside_span(o))
    errs_out = sum(1 for o in outcomes if o.status != 200 and not inside_span(o))
    kinds: dict[str, int] = {}
    for o in outcomes:
        if o.status != 200 and not inside_span(o):
            kind = f"http {o.status}" if o.status else o.error.split(":", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    answered = [o.latency_s for o in outcomes if o.status == 200 and not inside_span(o)]
    return {
        "requests": len(outcomes),
        "errors_in_window": errs_in,
        "errors_outside_window": errs_out,
        "errors_outside_by_kind": kinds,
        "degraded": sum(1 for o in outcomes if o.degraded),
        "degraded_in_window": sum(1 for o in outcomes if o.degraded and inside_span(o)),
        "degraded_reasons": dict(Counter(o.error[:80] for o in outcomes if o.degraded).most_common(5)),
        # Outside the windows, so the floor of this machine's load shows beside the errors.
        "p50_ms_outside": round(percentile(answered, 50) * 1000, 1),
        "p99_ms_outside": round(percentile(answered, 99) * 1000, 1),
    }
