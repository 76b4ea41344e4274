"""Everything a serving process holds besides HTTP: the active pair and the threads that feed it.

Threads (all daemons; none is on the request path):

* ``pair-builder``: builds and swaps pairs (:mod:`serving.swap`);
* ``item-vectors``: keeps the active index current (:mod:`serving.vectors`);
* ``adapters``: activates announced versions when ``settings.auto_activate``;
* ``popularity``: refreshes the in-memory popularity ranking (:mod:`serving.shopper_data`);
* ``shop-view``: refreshes the ranker's shop-wide inputs (:mod:`serving.shop_view`);
* ``shopper-vectors``: keeps the nearest-shopper index current (:mod:`serving.shoppers`);
* ``rankers`` and ``rankers-sync``: follow ranker announcements and the ranker registry's
  active version, and swap the ranker (:mod:`serving.ranker_slot`);
* ``startup``: positions the follower, then queues the first build, so the HTTP server
  answers ``/healthz`` at once and ``/readyz`` once the first pair is live.

Which version serving starts on: ``settings.serve_version`` if set, else the newest
registry version that verifies, else the base model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from freshrec.settings import Settings
from models.encoder import BASE_VERSION
from ranking.scoring import DAY_S, BlendWeights, LogBlendWeights, scale_from_settings, weights_from_settings

from .exporter import ExportWorker
from .metrics import ServingMetrics
from .collab_data import CollabShop, DecodeCache, read_shop, read_shopper_inputs, read_shopper_vectors
from .pair import ActivePair, ServingPair
from .ranker_slot import RankerSlot, RankerSync
from .result_cache import CachedAnswer, ResultCache
from .shop_view import ShopCache
from .shoppers import ShopperNeighbours
from .shopper_data import PopularityCache, PopularityReading, RedisGate
from .swap import ActivationRefused, BuildJob, BuildTools, PairBuilder, default_tools
from .vectors import VectorApplier, VectorFollower

log = logging.getLogger("freshrec.serving")

FOLLOWER_READY_WAIT_S = 10.0


class ConfigError(ValueError):
    """Settings that must not be served with (the message says which and how to fix it)."""


def admin_enabled(settings: Settings) -> bool:
    """Whether /admin is served; raises :class:`ConfigError` for admin on without a token.

    ``admin_enabled`` unset means "on exactly when a token is set", so a deployment
    that sets a token gets admin and one that does not is never left open.
    """
    if settings.admin_enabled is None:
        return bool(settings.admin_token)
    if settings.admin_enabled and not settings.admin_token:
        raise ConfigError(
            "admin is enabled (FRESHREC_ADMIN_ENABLED=true) but FRESHREC_ADMIN_TOKEN is not set: "
            "set a token, or disable admin"
        )
    return settings.admin_enabled


class ServingRuntime:
    """The in-process state of one serving process; :meth:`start` starts its threads."""

    def __init__(
        self,
        settings: Settings,
        tools: BuildTools | None = None,
        request_redis: Any | None = None,
        background_redis: Any | None = None,
        follow_topics: bool = True,
    ) -> None:
        self.settings = settings
        self.admin = admin_enabled(settings)  # refuse to start before any thread runs
        _limit_faiss_threads(settings.serving_faiss_threads)
        self.weights: BlendWeights | LogBlendWeights = weights_from_settings(settings)
        self.metrics = ServingMetrics()
        self.active = ActivePair()
        self.titles: dict[str, str] = {}
        self.gate = RedisGate()
        self.request_redis = request_redis if request_redis is not None else redis_client(settings, settings.redis_timeout_s)
        self.background_redis = background_redis if background_redis is not None else redis_client(settings, 5.0)
        self.exporter: ExportWorker | None = None
        if tools is None:
            self.exporter = ExportWorker(settings.serving_build_nice)
            tools = default_tools(settings, self.background_redis, self.exporter)
        self.tools = tools
        self.builder = PairBuilder(
            self.active, self.tools, on_swap=self._swapped, on_items=self._remember_titles, nice=settings.serving_build_nice,
            similarity=lambda vectors: scale_from_settings(vectors, settings),
        )
        # item vectors and titles changed in place since start (serving.result_cache keys on it);
        # bumped under a lock once a change is complete, so a reader of n sees the first n
        self.catalog_changes = 0
        self._catalog_lock = threading.Lock()
        self.applier = VectorApplier(
            self.active, self.builder, self._read_items_quietly, self._remember_titles, on_changed=self._catalog_changed
        )
        self.follow_topics = follow_topics
        self.vectors = VectorFollower(settings, self.applier) if follow_topics else None
        self.popularity = PopularityCache(
            self._read_popularity, settings.popularity_refresh_s, settings.blend_new_days * DAY_S
        )
        self.announcements: list[dict[str, Any]] = []  # the latest few, newest last
        # the ranking stage: the ranker (swapped on its own), its shop-wide inputs, nearest shoppers
        from models.ranker_registry import RankerRegistry
        from ranking.collab import CollabRules
        from ranking.features import FeatureRules

        self.feature_rules = FeatureRules.from_settings(settings)
        self.collab_rules = CollabRules.from_settings(settings)
        self.ranker = RankerSlot(
            RankerRegistry(settings.state_dir / "rankers"),
            on_swap=lambda loaded: self.metrics.set_ranker(None if loaded is None else loaded.version),
        )
        self.ranker_sync = RankerSync(self.ranker, settings, settings.ranker_poll_s, follow=follow_topics)
        self.shop = ShopCache(self._read_collab_shop, self.popularity, self.feature_rules, settings.popularity_refresh_s)
        self.results: ResultCache[CachedAnswer] = ResultCache(settings.result_cache_size, settings.result_cache_ttl_s)
        self.states_cache = DecodeCache(settings.ranker_decode_cache)
        self.rows_cache = DecodeCache(settings.ranker_decode_cache)
        self.shoppers = ShopperNeighbours(
            settings, settings.collab_shopper_dim, self._read_shopper_vectors, follow=follow_topics
        )
        self.started_at = time.time()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.metrics.bind(
            lambda: float(len(p.index)) if (p := self.active.pair) is not None else 0.0,
            lambda: float(self.vectors.lag) if self.vectors is not None and self.vectors.lag is not None else 0.0,
        )
        self.metrics.result_cache_entries.set_function(lambda: float(len(self.results)))
        from freshrec.consumer import AppliedPositions, Backoff

        self.adapter_backoff = Backoff()
        self.adapter_positions = AppliedPositions()
        self.adapter_errors = 0
        self._bind_follower_metrics()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self.exporter is not None and self.settings.auto_activate and self.follow_topics:
            self.exporter.warm()  # import torch in the export worker before the first announcement
        self.builder.start()
        self.popularity.start()
        self.ranker_sync.start()
        self.shop.start()
        self.shoppers.start()
        if self.vectors is not None:
            self.vectors.start()
        self._spawn(self._startup, "startup")
        if self.follow_topics:
            self._spawn(self._follow_announcements, "adapters")

    def stop(self) -> None:
        self._stop.set()
        self.builder.stop()
        self.popularity.stop()
        self.ranker_sync.stop()
        self.shop.stop()
        self.shoppers.stop()
        if self.vectors is not None:
            self.vectors.stop()
        for t in self._threads:
            t.join(5.0)
        if self.exporter is not None:
            self.exporter.close()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    @property
    def ready(self) -> bool:
        return self.active.pair is not None

    def wait_ready(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.ready:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # -- activation ----------------------------------------------------------------------

    def startup_version(self) -> str:
        if self.settings.serve_version:
            return self.settings.serve_version
        try:
            from models.registry import AdapterRegistry

            versions = AdapterRegistry(self.settings.state_dir / "adapters").versions()
        except Exception:
            versions = []
        for version in reversed(versions):
            try:
                self.builder.check(version)
                return version
            except ActivationRefused as exc:
                log.warning("not starting on %s: %s", version, exc)
        return BASE_VERSION

    def _startup(self) -> None:
        if self.vectors is not None and not self.vectors.ready.wait(FOLLOWER_READY_WAIT_S):
            log.warning("item-vectors follower not positioned after %.0f s; building anyway", FOLLOWER_READY_WAIT_S)
        self.popularity.attempted.wait(2.0)
        version = self.startup_version()
        while not self._stop.is_set():
            job = self.builder.activate(version, reason="startup")
            while not job.done.wait(0.5):
                if self._stop.is_set():
                    return
            if job.state in ("live", "superseded") or self.ready:
                return
            log.error("startup build of %s failed: %s", version, job.error)
            if version != BASE_VERSION and self.tools.rejected and job.error and "rejected" in job.error:
                version = BASE_VERSION  # a corrupt adapter: serve the base model instead
            else:
                self._stop.wait(2.0)  # Redis or the catalog not there yet: retry

    def on_announcement(self, version: str, announced_at: float | None = None) -> BuildJob | None:
        """An adapter was published: note it, and activate it when ``auto_activate``."""
        self.announcements.append({"version": version, "at": announced_at or time.time()})
        del self.announcements[:-20]
        if not self.settings.auto_activate:
            return None
        try:
            self.builder.check(version)
        except ActivationRefused as exc:
            log.error("announced adapter refused, keeping %s: %s", self.active_version(), exc)
            self.announcements[-1]["refused"] = str(exc)
            return None
        return self.builder.activate(version, reason="announcement")

    def _follow_announcements(self) -> None:
        """Follow ``adapters`` from its end; after any error (the broker away, an activation
        that raised) resume at the first announcement not yet handled, after a capped
        backoff, so an announcement is never skipped. Each one is marked handled on its own:
        a failure re-runs only the failed one and those after it (activating a version
        already live or on its way is a no-op anyway)."""
        from freshrec.consumer import Backoff, Message, TopicFollower, follow_resuming
        from freshrec.contracts import AdapterAnnouncement

        positions = self.adapter_positions

        def on_batch(_follower: TopicFollower, messages: list[Message]) -> None:
            for m in messages:
                try:
                    ann = AdapterAnnouncement.model_validate_json(m.value)
                except Exception as exc:  # retrying cannot make it readable: skip it, loudly
                    log.warning("undecodable adapter announcement at %s:%s: %s", m.partition, m.offset, exc)
                else:
                    self.on_announcement(ann.version)
                positions.applied([m])

        def on_error(exc: Exception, backoff: Backoff, pause_s: float) -> None:
            self.adapter_errors += 1
            log.warning(
                "adapters follower: %s: %s (failure %d); resuming from the last handled offsets %s in %.1f s",
                type(exc).__name__, exc, backoff.failures, positions.next, pause_s,
            )

        def on_recovered(outage_s: float, failures: int) -> None:
            log.warning("adapters follower: recovered after %.1f s and %d failures; nothing skipped", outage_s, failures)

        follow_resuming(
            self._stop,
            lambda start: TopicFollower(self.settings, self.settings.topics.adapters, start=start, client_id="freshrec-serving-adapters"),
            "end",
            on_batch,
            on_error,
            on_recovered,
            poll_s=0.5,
            backoff=self.adapter_backoff,
            positions=positions,
        )

    def _bind_follower_metrics(self) -> None:
        """Gauges of the topic followers' health, on the serving registry: how long each has
        been failing (0 when healthy: alert on it staying above a minute) and its errors."""
        from prometheus_client import Gauge

        outage = Gauge(
            "freshrec_follower_outage_seconds", "Seconds a topic follower has been failing to apply (0: healthy)",
            ["topic"], registry=self.metrics.registry,
        )
        errors = Gauge("freshrec_follower_errors", "Errors of a topic follower since start", ["topic"], registry=self.metrics.registry)
        now = time.monotonic
        outage.labels("adapters").set_function(lambda: self.adapter_backoff.outage_s(now()))
        errors.labels("adapters").set_function(lambda: float(self.adapter_errors))
        if self.vectors is not None:
            vectors = self.vectors
            outage.labels("item-vectors").set_function(lambda: vectors.outage_s)
            errors.labels("item-vectors").set_function(lambda: float(vectors.errors))

    def active_version(self) -> str | None:
        pair = self.active.pair
        return pair.adapter_version if pair is not None else None

    # -- callbacks -----------------------------------------------------------------------

    def _swapped(self, pair: ServingPair, job: BuildJob) -> None:
        self.metrics.swaps.inc()
        self.metrics.build_seconds.set(pair.build_seconds)
        self.metrics.set_adapter(pair.adapter_version)

    def _remember_titles(self, records: dict[str, Any]) -> None:
        for item_id, record in records.items():
            self.titles[item_id] = record.title
        self._catalog_changed()

    def _catalog_changed(self) -> None:
        with self._catalog_lock:
            self.catalog_changes += 1

    def _read_items_quietly(self, ids: Any) -> dict[str, Any]:
        return self.tools.read_items(ids)

    def _read_collab_shop(self, previous: CollabShop | None) -> CollabShop:
        return read_shop(self.background_redis, self.settings, self.collab_rules, previous)

    def _read_shopper_vectors(self) -> dict[str, Any]:
        return read_shopper_vectors(self.background_redis, self.settings, self.settings.collab_shopper_dim)

    def read_shopper_inputs(
        self, row_items: Any, neighbour_ids: Any, now_ts: float
    ) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
        """One request's co-purchase rows and neighbour states, through the gate (fails fast when Redis is down)."""
        return self.gate.call(
            read_shopper_inputs, self.request_redis, self.settings, row_items, neighbour_ids, now_ts, self.collab_rules,
            self.states_cache, self.rows_cache,
        )

    def _read_popularity(self) -> PopularityReading:
        from stores.user_store import read_fresh_popularity

        return read_fresh_popularity(self.background_redis, self.settings)


def redis_client(settings: Settings, timeout_s: float) -> Any:
    """A Redis client (one server or a cluster, :func:`stores.redis_client.connect`) that
    fails within ``timeout_s``: no retries.

    redis-py retries a failed command with backoff by default; against a dead Redis that
    took 4 s per call here, which would stall every request behind the gate's threshold.
    """
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from stores.redis_client import connect

    return connect(
        settings,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=0,
        retry=Retry(NoBackoff(), 0),
    )


def _limit_faiss_threads(n: int) -> None:
    """One OpenMP thread per FAISS search: measured here, a k=10 search over 4.4k items
    took 0.2 ms of CPU on one thread but 1.4 ms CPU and 8-12 ms wall on two threads of a
    busy 2-core box (OpenMP workers spin and wait for a core). Requests run side by
    side instead."""
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except Exception:  # pragma: no cover - faiss is a dependency; never fail startup on this
        pass
