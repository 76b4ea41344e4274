"""The collector's HTTP API: ``POST /events``, ``/healthz``, ``/metrics``.

``POST /events`` takes a JSON array of events (``Content-Type: application/json``) or one
event per line (``application/x-ndjson``) and answers per record, in request order::

    {"accepted": 2, "rejected": 1, "unconfirmed": 0, "results": [
        {"index": 0, "status": "accepted", "event_id": "web-1-000042"},
        {"index": 1, "status": "rejected", "field": "user_id", "reason": "is required", "dead_lettered": true},
        {"index": 2, "status": "accepted", "event_id": "web-1-000044"}]}

(``line`` too, for JSON lines.) What the statuses promise is :mod:`collector.batch`'s
rule: ``accepted`` only once the broker confirmed the event on the events topic, and a
200 only when every record is accepted or rejected with its dead letter confirmed. A
broker that cannot be reached, or does not confirm in time, makes a 503 with
``Retry-After`` (``collector_retry_after_s``) and the unconfirmed records marked so; with
the broker unreachable nothing is sent and nothing is accepted.

The other answers, each ``{"error": "..."}``: 401 without ``Authorization: Bearer
<collector_token>`` or with another token; 413 for a body over
``collector_max_body_bytes`` or more than ``collector_max_records`` records (nothing
sent); 415 for another Content-Type; 400 for a body that is not a batch (JSON that does
not parse, or is not an array).

A collector without a token would let anyone on the network write shoppers' behaviour,
so :func:`create_app` refuses to build one unless the caller says ``insecure_no_token``
(``freshrec collect --insecure-no-token``, for a local demo).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import orjson
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from freshrec.api_docs import mount_offline_docs
from freshrec.settings import Settings

from .batch import JSON_TYPES, LINES_TYPES, BodyError, answer, check_batch, media_type, split_body
from .metrics import CollectorMetrics
from .sink import BrokerUnavailable, EventSink

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """Settings the collector must not start with; the message says the fix."""


def check_config(settings: Settings, insecure_no_token: bool) -> None:
    """Refuse a collector anyone could write to, unless explicitly asked for one."""
    if not settings.collector_token and not insecure_no_token:
        raise ConfigError(
            "no producer token: set FRESHREC_COLLECTOR_TOKEN (clients send 'Authorization: Bearer <token>'), "
            "or pass --insecure-no-token to accept events from anyone (a local demo only)"
        )


@dataclass
class Reply:
    status: int
    body: dict[str, object]
    headers: dict[str, str] = field(default_factory=dict)


class Collector:
    """What ``POST /events`` does once the request is authorised and its body read: no HTTP inside."""

    def __init__(self, settings: Settings, sink: EventSink, metrics: CollectorMetrics, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.sink = sink
        self.metrics = metrics
        self.clock = clock

    def handle(self, body: bytes, content_type: str) -> Reply:
        """Split, check, send and answer one batch (blocking: run it in a worker thread)."""
        try:
            records = split_body(body, content_type)
        except BodyError as exc:
            return Reply(400, {"error": str(exc)})
        limit = self.settings.collector_max_records
        if len(records) > limit:
            return Reply(413, {"error": f"{len(records)} records in one request, the limit is {limit}; split the batch"})
        checked = check_batch(records, now=self.clock())
        t0 = time.perf_counter()
        unavailable: str | None = None
        try:
            confirmed = self.sink.send_batch(checked)
        except BrokerUnavailable as exc:
            unavailable = str(exc)
            confirmed = [False] * len(checked)
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        self.metrics.count(checked, confirmed)
        status, out = answer(checked, confirmed)
        if status != 503:
            return Reply(status, out)
        retry = self.settings.collector_retry_after_s
        out["error"] = (
            f"the broker is unreachable ({unavailable}); nothing was accepted, resend after {retry} s"
            if unavailable
            else f"the broker did not confirm every record; resend the unconfirmed ones after {retry} s"
        )
        return Reply(503, out, {"Retry-After": str(retry)})


def _json(reply: Reply) -> Response:
    return Response(orjson.dumps(reply.body), status_code=reply.status, headers=reply.headers, media_type="application/json")


def _authorised(request: Request, token: str | None) -> bool:
    if not token:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to be over ``limit`` (never read past it)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    settings: Settings,
    sink: EventSink | None = None,
    insecure_no_token: bool = False,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The ASGI app; its lifespan connects the producer (a broker away at start is not fatal:
    ``POST /events`` answers 503 until it is back) and closes it, flushing, at shutdown."""
    check_config(settings, insecure_no_token)
    sink = sink or EventSink(settings)
    metrics = CollectorMetrics()
    collector = Collector(settings, sink, metrics, clock)
    if not settings.collector_token:
        log.warning("collector: no token configured (--insecure-no-token): anyone who can reach it can send events")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await anyio.to_thread.run_sync(sink.connect)
        except BrokerUnavailable as exc:
            log.warning("collector: %s; answering 503 until it is reachable", exc)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(sink.close)

    app = FastAPI(title="freshrec collector", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.collector = collector
    mount_offline_docs(app, "freshrec collector")

    @app.post("/events", summary="Send a batch of events; the answer is per record")
    async def post_events(request: Request) -> Response:
        reply = await _events(request)
        metrics.answered(reply.status)
        return _json(reply)

    async def _events(request: Request) -> Reply:
        if not _authorised(request, settings.collector_token):
            return Reply(401, {"error": "needs 'Authorization: Bearer <token>' (settings.collector_token)"},
                         {"WWW-Authenticate": "Bearer"})
        kind = media_type(request.headers.get("content-type"))
        if kind not in JSON_TYPES | LINES_TYPES:
            return Reply(415, {"error": f"Content-Type {kind or 'missing'!r}: send application/json (an array of events) "
                                        "or application/x-ndjson (one event per line)"})
        limit = settings.collector_max_body_bytes
        body = await _read_body(request, limit)
        if body is None:
            return Reply(413, {"error": f"the body is over the {limit}-byte limit (collector_max_body_bytes); "
                                        "send smaller batches"})
        return await anyio.to_thread.run_sync(collector.handle, body, kind)

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        return {"status": "ok", "producer_connected": sink.connected}

    @app.get("/metrics", response_class=Response)
    async def metrics_page() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
