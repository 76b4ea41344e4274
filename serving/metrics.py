"""Prometheus metrics of one serving process (its own registry, so tests can run several).

Latency is observed by a pure ASGI middleware around every request, labelled by
endpoint (the first path segment, from a fixed set, so a scan of random paths cannot
explode the label space). Gauges that mirror live state (index size, adapter version,
consumer lag) are read at scrape time through callbacks.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ENDPOINTS = frozenset({"recommend", "search", "similar", "users", "admin", "healthz", "readyz", "metrics"})
# Latencies kept per endpoint for exact recent percentiles (the demo's /demo/stats); the
# histogram's buckets are too coarse for a p99 of the last minute.
RECENT_REQUESTS = 1000
# Fine below 10 ms, where the targets are.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Ages of answers served from the result cache: up to its TTL (2 s by default), and past it
# for a cache configured longer.
STALENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


def endpoint_of(path: str) -> str:
    head = path.strip("/").split("/", 1)[0]
    return head if head in ENDPOINTS else ("root" if not head else "other")


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "freshrec_request_seconds", "Server-side request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.responses = Counter("freshrec_responses", "Responses by endpoint and status", ["endpoint", "status"], registry=r)
        self.degraded = Counter("freshrec_degraded_responses", "Responses flagged degraded: Redis unreachable, or its state empty", ["endpoint"], registry=r)
        self.swaps = Counter("freshrec_swaps", "Serving pairs swapped in", registry=r)
        self.build_seconds = Gauge("freshrec_last_build_seconds", "Seconds the last swapped-in pair took to build", registry=r)
        self.index_items = Gauge("freshrec_index_items", "Items in the active index", registry=r)
        self.consumer_lag = Gauge(
            "freshrec_item_vectors_lag", "item-vectors messages not yet read (a lower bound on Tansu)", registry=r
        )
        self.adapter = Gauge("freshrec_adapter_info", "1 for the active adapter version", ["version"], registry=r)
        self._adapter_version: str | None = None
        # the ranking stage: which ranking answered /recommend, and why the ranker did not
        self.ranked_by = Counter(
            "freshrec_recommend_ranked", "/recommend answers by what ordered them (ranker, blend, popularity)", ["by"], registry=r
        )
        self.ranker_fallbacks = Counter(
            "freshrec_ranker_fallbacks", "/recommend answers not ordered by the ranker, by reason", ["reason"], registry=r
        )
        self.ranker_swaps = Counter("freshrec_ranker_swaps", "Rankers swapped in (or out, to the blend)", registry=r)
        self.ranker = Gauge("freshrec_ranker_info", "1 for the active ranker version", ["version"], registry=r)
        self._ranker_version: str | None = None
        # the /recommend result cache (serving.result_cache): hit rate = hits / (hits + misses)
        self.result_cache_hits = Counter(
            "freshrec_result_cache_hits", "/recommend answers served from the result cache", registry=r
        )
        self.result_cache_misses = Counter(
            "freshrec_result_cache_misses",
            "/recommend look-ups of the result cache that found no entry (or one past its TTL); uncacheable answers "
            "(cold, degraded) are not looked up",
            registry=r,
        )
        self.result_cache_staleness = Histogram(
            "freshrec_result_cache_staleness_seconds", "Age of each /recommend answer served from the result cache",
            buckets=STALENESS_BUCKETS, registry=r,
        )
        self.result_cache_entries = Gauge("freshrec_result_cache_entries", "Answers held by the result cache", registry=r)
        # endpoint -> (monotonic end time, seconds) of its latest RECENT_REQUESTS requests
        self.recent: dict[str, deque[tuple[float, float]]] = {}

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.latency.labels(endpoint).observe(seconds)
        self.responses.labels(endpoint, str(status)).inc()
        recent = self.recent.get(endpoint)
        if recent is None:  # a fixed label set (endpoint_of), so this dict stays small
            recent = self.recent.setdefault(endpoint, deque(maxlen=RECENT_REQUESTS))
        recent.append((time.monotonic(), seconds))

    def result_cache_lookup(self, age_s: float | None) -> None:
        """Count one look-up: a hit with the age of the answer it served, or (None) a miss."""
        if age_s is None:
            self.result_cache_misses.inc()
        else:
            self.result_cache_hits.inc()
            self.result_cache_staleness.observe(age_s)

    def bind(self, index_items: Callable[[], float], consumer_lag: Callable[[], float]) -> None:
        self.index_items.set_function(index_items)
        self.consumer_lag.set_function(consumer_lag)

    def set_adapter(self, version: str) -> None:
        if self._adapter_version is not None and self._adapter_version != version:
            self.adapter.remove(self._adapter_version)
        self.adapter.labels(version).set(1)
        self._adapter_version = version

    def set_ranker(self, version: str | None) -> None:
        """Point ``freshrec_ranker_info`` at ``version`` (None: no ranker, the blend serves)."""
        if self._ranker_version is not None and self._ranker_version != version:
            self.ranker.remove(self._ranker_version)
        if version is not None:
            self.ranker.labels(version).set(1)
        self._ranker_version = version
        self.ranker_swaps.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class TimingMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware task hop): time each HTTP request, count its status."""

    def __init__(self, app: Any, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe(endpoint_of(scope["path"]), status, time.perf_counter() - t0)
