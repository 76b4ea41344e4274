"""The demo's write path: the page acts as the shopper it follows (off unless ``settings.demo_actions``).

``serving.app`` mounts this router only when ``FRESHREC_DEMO_ACTIONS`` is true: it lets
anyone who reaches the API put events on the ``events`` topic, which a shop's API must not.

* ``POST /demo/act`` ``{"user_id": "17841", "item_id": "85123A", "kind": "click"}`` (kind
  ``click`` or ``purchase``) validates the event with freshrec's contracts, sends it keyed
  by ``user_id`` through :class:`freshrec.producer.RecordProducer` and answers once the
  broker confirmed it: ``{"event_id": "demo-...", "ts": 1291190400.0, "sent_ms": 3.1}``.
  The event then goes the way every event goes (Kafka, the flows, Redis), and the page
  polls ``/recommend`` until the answer changes. ``ts`` is event time: the shopper's
  newest event or the shop's, whichever is later (the replayed sample is years old, and an
  event stamped with the wall clock would make the whole history look years stale).
  422: an invalid event (the message names the field); 404: an item not in the catalog;
  503: the broker did not confirm it.
* ``GET /demo/applied?user_id=..&event_id=..`` ``{"applied": true}`` once the users flow
  has the event in the shopper's Redis state (its duplicate window holds the id).
* ``GET /demo/stats``: what the page charts besides its own requests. ``applied_events``
  is the sum over the events topic's partitions of the users flow's applied offsets
  (``stores.user_store.read_applied_offsets``; diffed over time it is events/s),
  ``recommend_ms`` the p50/p99 of serving's own recent /recommend latencies (its timing
  middleware, :mod:`serving.metrics`) over the last ``window_s`` seconds, plus the active
  adapter, index and ranker versions.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from freshrec.contracts import MAX_ID_CHARS, InvalidRecord, parse_event

from .runtime import ServingRuntime
from .shopper_data import RedisUnavailable

log = logging.getLogger("freshrec.serving.demo")

CONFIRM_S = 5.0  # longest an act waits for the broker's acknowledgement
STATS_WINDOW_S = 60.0


class Act(BaseModel):
    user_id: str = Field(..., min_length=1, max_length=MAX_ID_CHARS, examples=["17841"])
    item_id: str = Field(..., min_length=1, max_length=MAX_ID_CHARS, examples=["85123A"])
    kind: Literal["click", "purchase"] = "click"


class Acted(BaseModel):
    event_id: str
    ts: float
    sent_ms: float


class Applied(BaseModel):
    applied: bool
    events: int | None = None


class Quantiles(BaseModel):
    p50: float | None
    p99: float | None
    n: int


class DemoStats(BaseModel):
    at: float
    applied_events: int | None
    recommend_ms: Quantiles
    adapter_version: str | None
    index_version: str | None
    ranker_version: str | None


def recent_quantiles(
    samples: Iterable[tuple[float, float]], now: float, window_s: float, qs: tuple[float, ...] = (0.5, 0.99)
) -> tuple[list[float | None], int]:
    """Quantiles ``qs`` (in ms) of the ``(end time, seconds)`` samples within ``window_s`` of ``now``, and their count."""
    values = [s for t, s in samples if now - t <= window_s]
    if not values:
        return [None for _ in qs], 0
    got = np.quantile(np.asarray(values, dtype=np.float64) * 1000.0, qs)
    return [round(float(v), 3) for v in got], len(values)


def act_ts(user_last_ts: float | None, shop_now_ts: float | None, wall: float) -> float:
    """The event time of an act: the later of the shopper's and the shop's newest event, else ``wall``."""
    known = max(user_last_ts or 0.0, shop_now_ts or 0.0)
    return known if known > 0 else wall


class _Sender:
    """One producer for the process, made on first use; sends are serialised (one act at a time)."""

    def __init__(self, runtime: ServingRuntime) -> None:
        self._settings = runtime.settings
        self._lock = threading.Lock()
        self._producer: Any = None

    def send(self, event: dict[str, Any]) -> bool:
        """True once the broker confirmed ``event``; False if it failed or was not confirmed in time."""
        from freshrec.producer import RecordProducer

        with self._lock:
            if self._producer is None:
                self._producer = RecordProducer(self._settings, client_id="freshrec-demo", linger_ms=0)
            report = self._producer.report
            before = report.confirmed
            if self._producer.send_event(event) is None:
                return False
            self._producer.flush(timeout=CONFIRM_S)
            return report.confirmed > before

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.close(timeout=2.0)
                self._producer = None


def demo_router(runtime: ServingRuntime) -> tuple[APIRouter, Callable[[], None]]:
    """(the /demo routes over ``runtime``, a function that closes their producer at shutdown).

    The routes are plain functions: FastAPI runs them in its thread pool, so a Redis read
    or a wait for the broker's acknowledgement never holds the event loop.
    """
    from .app import ApiError, error_responses

    settings = runtime.settings
    router = APIRouter(prefix="/demo", tags=["demo"])
    sender = _Sender(runtime)

    def read_state(user_id: str) -> Any:
        from stores.user_store import read_user_state

        return runtime.gate.call(read_user_state, runtime.request_redis, settings, user_id)

    @router.post("/act", response_model=Acted, responses=error_responses(404, 422, 503))
    def act(body: Act) -> dict[str, Any]:
        """Send one click or purchase of ``user_id`` on ``item_id`` to the events topic (demo only)."""
        t0 = time.perf_counter()
        if body.item_id not in runtime.titles:
            pair = runtime.active.pair
            if pair is None or pair.index.reconstruct(body.item_id) is None:
                raise ApiError(404, f"unknown item {body.item_id!r}: not in the catalog")
        try:
            state = read_state(body.user_id)
        except RedisUnavailable as exc:
            raise ApiError(503, f"user state is unavailable: {exc}") from None
        shop = runtime.shop.view
        ts = act_ts(None if state is None else state.last_ts, None if shop is None else shop.now_ts, time.time())
        event = {"event_id": f"demo-{uuid.uuid4().hex[:16]}", "user_id": body.user_id, "item_id": body.item_id,
                 "kind": body.kind, "ts": ts}
        try:
            parse_event(event)  # the producer validates again; this gives the caller the reason
        except InvalidRecord as exc:
            raise ApiError(422, str(exc)) from None
        try:
            confirmed = sender.send(event)
        except Exception as exc:  # the client could not even be made: no broker at the bootstrap address
            log.warning("demo act not sent: %s: %s", type(exc).__name__, exc)
            confirmed = False
        if not confirmed:
            raise ApiError(503, f"the broker did not confirm the event within {CONFIRM_S:.0f} s; retry")
        return {"event_id": event["event_id"], "ts": ts, "sent_ms": round((time.perf_counter() - t0) * 1000.0, 3)}

    @router.get("/applied", response_model=Applied, responses=error_responses(422, 503))
    def applied(
        user_id: str = Query(..., min_length=1, max_length=MAX_ID_CHARS),
        event_id: str = Query(..., min_length=1, max_length=MAX_ID_CHARS),
    ) -> dict[str, Any]:
        """Whether the users flow has applied ``event_id`` to ``user_id``'s state in Redis."""
        try:
            state = read_state(user_id)
        except RedisUnavailable as exc:
            raise ApiError(503, f"user state is unavailable: {exc}") from None
        if state is None:
            return {"applied": False, "events": None}
        return {"applied": event_id in state.recent_ids, "events": state.events}

    @router.get("/stats", response_model=DemoStats)
    def stats(window_s: float = Query(STATS_WINDOW_S, gt=0, le=3600)) -> dict[str, Any]:
        """Events applied by the users flow, serving's recent /recommend latency, the active versions."""
        from stores.user_store import read_applied_offsets

        try:
            offsets = runtime.gate.call(read_applied_offsets, runtime.request_redis, settings)
            applied_events: int | None = sum(offsets.values())
        except RedisUnavailable:
            applied_events = None
        (p50, p99), n = recent_quantiles(list(runtime.metrics.recent.get("recommend", ())), time.monotonic(), window_s)
        pair = runtime.active.pair
        ranker = runtime.ranker.current
        return {
            "at": time.time(),
            "applied_events": applied_events,
            "recommend_ms": {"p50": p50, "p99": p99, "n": n},
            "adapter_version": None if pair is None else pair.adapter_version,
            "index_version": None if pair is None else pair.index_version,
            "ranker_version": None if ranker is None else ranker.version,
        }

    return router, sender.close
