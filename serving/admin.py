"""The admin API under /admin: list, activate and roll back adapter and ranker versions; status.

Every route needs ``Authorization: Bearer <settings.admin_token>``: no (or a non-Bearer)
header is 401, a wrong token 403. The router exists only when admin is enabled
(:func:`serving.runtime.admin_enabled`: on when a token is set; enabling it without a
token refuses to start).

A version name is checked against the registry's format
(:func:`models.registry.is_version_name`, or ``base``) before anything touches the file
system: ``../etc``, a 10,000-character name or one with a NUL is a 422 naming the
format, never a file-system error. Answers carry no filesystem path
(:func:`serving.app.public_body`); the full messages go to the log.

Activation is asynchronous: ``POST /admin/adapters/{version}/activate`` verifies the
version at once (a corrupt or unknown adapter is refused with 422/404 and the active
pair keeps serving), queues the build and answers 202 with the job; ``?wait=true``
answers when the new pair is live (200) or the build failed (422), up to ``timeout_s``.

Rankers (``/admin/rankers``) swap on their own, synchronously (loading one is
milliseconds): ``POST /admin/rankers/{version}/activate`` verifies the version
(checksum, model, and that it was trained on the feature schema serving computes),
records it active in the ranker registry (every replica follows that record) and
installs it, answering 200 once it serves; a corrupt one is 422, an unknown one 404,
and the active ranker keeps serving. ``POST /admin/rankers/rollback`` re-activates the
version before it in the registry's record (409 when there is none).

Examples::

    curl -H "Authorization: Bearer $TOKEN" localhost:8000/admin/adapters
    curl -X POST -H "Authorization: Bearer $TOKEN" "localhost:8000/admin/adapters/v000002-1a2b3c4d/activate?wait=true"
    curl -X POST -H "Authorization: Bearer $TOKEN" localhost:8000/admin/rollback
    curl -H "Authorization: Bearer $TOKEN" localhost:8000/admin/status
    curl -H "Authorization: Bearer $TOKEN" localhost:8000/admin/rankers
    curl -X POST -H "Authorization: Bearer $TOKEN" localhost:8000/admin/rankers/v000002-1a2b3c4d/activate
    curl -X POST -H "Authorization: Bearer $TOKEN" localhost:8000/admin/rankers/rollback
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Path, Query

from models.encoder import BASE_VERSION
from models.registry import VERSION_FORMAT, is_version_name

from .app import JSON, ApiError, bearer_guard, error_responses, public_body
from .ranker_slot import RankerRefused
from .runtime import ServingRuntime
from .swap import ActivationRefused, BuildJob

log = logging.getLogger("freshrec.serving.admin")

# The names check_version_name accepts, for the schema (documented, not enforced by
# FastAPI: the check's own message names the format and the fix).
VERSION_PATTERN = rf"^({BASE_VERSION}|v[0-9]{{6}}-[0-9a-f]{{8}})$"

LEARNER_LAG_CACHE_S = 5.0
LEARNER_LAG_WAIT_S = 1.0  # /admin/status waits this long for a fresh figure, then shows the last one


class _LearnerLag:
    """The learner-lag figure, computed on a thread (it asks Kafka) and cached briefly."""

    def __init__(self, runtime: ServingRuntime) -> None:
        self.runtime = runtime
        self.value: dict[str, Any] | None = None
        self._at = 0.0
        self._running: threading.Event | None = None
        self._lock = threading.Lock()

    def refresh(self) -> threading.Event | None:
        """Start a refresh if the figure is stale; return its completion event (None: fresh)."""
        with self._lock:
            if self._running is not None:
                return self._running
            if self.value is not None and time.monotonic() - self._at < LEARNER_LAG_CACHE_S:
                return None
            done = self._running = threading.Event()
        threading.Thread(target=self._compute, args=(done,), name="learner-lag", daemon=True).start()
        return done

    def _compute(self, done: threading.Event) -> None:
        try:
            self.value = _learner_lag(self.runtime)
        finally:
            self._at = time.monotonic()
            with self._lock:
                self._running = None
            done.set()


def check_version_name(version: str) -> None:
    """Refuse (422) a name that is not ``base`` or a registry version, before any file is touched."""
    if version == BASE_VERSION or is_version_name(version):
        return
    shown = repr(version[:40]) + (f"... ({len(version):,} characters)" if len(version) > 40 else "")
    raise ApiError(
        422, f"version: {shown} is not an adapter version; expected {BASE_VERSION!r} or {VERSION_FORMAT} (see GET /admin/adapters)"
    )


def check_ranker_name(version: str) -> None:
    """Refuse (422) a name that is not a registry version (rankers have no ``base``), before any file is touched."""
    if is_version_name(version):
        return
    shown = repr(version[:40]) + (f"... ({len(version):,} characters)" if len(version) > 40 else "")
    raise ApiError(422, f"version: {shown} is not a ranker version; expected {VERSION_FORMAT} (see GET /admin/rankers)")


RANKER_PATTERN = r"^v[0-9]{6}-[0-9a-f]{8}$"


def admin_router(runtime: ServingRuntime) -> APIRouter:
    state_dir = runtime.settings.state_dir
    guard = bearer_guard(runtime.settings.admin_token, "AdminToken", "admin", "admin_token")
    router = APIRouter(prefix="/admin", dependencies=[Depends(guard)], responses=error_responses(401, 403))
    learner = _LearnerLag(runtime)

    async def _finish(job: BuildJob, wait: bool, timeout_s: float) -> JSON:
        if wait:
            await anyio.to_thread.run_sync(job.done.wait, timeout_s)
        body = public_body(job.summary(), state_dir)
        if job.state == "failed":
            return JSON({"error": body["error"], "job": body}, status_code=422)
        return JSON(body, status_code=200 if job.state == "live" else 202)

    @router.get("/adapters")
    async def adapters() -> JSON:
        return JSON(public_body(await anyio.to_thread.run_sync(_adapters, runtime), state_dir))

    @router.post(
        "/adapters/{version}/activate",
        responses={**error_responses(404, 422), 202: {"description": "queued (without wait=true)"}},
    )
    async def activate(
        version: str = Path(..., json_schema_extra={"pattern": VERSION_PATTERN}, examples=["v000003-1a2b3c4d"]),
        wait: bool = False,
        timeout_s: float = Query(120.0, gt=0, le=600),
    ) -> JSON:
        check_version_name(version)
        try:
            await anyio.to_thread.run_sync(runtime.builder.check, version)
        except ActivationRefused as exc:
            log.warning("admin activation of %s refused: %s", version, exc)
            status = 404 if "no such version" in str(exc) else 422
            raise ApiError(status, f"{exc}; still serving {runtime.active_version()}") from None
        return await _finish(runtime.builder.activate(version, reason="admin"), wait, timeout_s)

    @router.post("/rollback", responses={**error_responses(409, 422), 202: {"description": "queued (without wait=true)"}})
    async def rollback(wait: bool = False, timeout_s: float = Query(120.0, gt=0, le=600)) -> JSON:
        try:
            job = runtime.builder.rollback()
        except ActivationRefused as exc:
            raise ApiError(409, str(exc)) from None
        return await _finish(job, wait, timeout_s)

    @router.get("/rankers")
    async def rankers() -> JSON:
        return JSON(public_body(await anyio.to_thread.run_sync(_rankers, runtime), state_dir))

    @router.post("/rankers/rollback", responses=error_responses(409, 422))
    async def ranker_rollback() -> JSON:
        before = runtime.ranker.version
        try:
            loaded = await anyio.to_thread.run_sync(runtime.ranker.rollback)
        except LookupError as exc:
            raise ApiError(409, f"{exc}; still serving ranker {before}") from None
        except RankerRefused as exc:
            raise ApiError(422, f"{exc}; still serving ranker {before}") from None
        return JSON({"version": loaded.version, "previous": before, "state": "live"})

    @router.post("/rankers/{version}/activate", responses=error_responses(404, 422))
    async def ranker_activate(
        version: str = Path(..., json_schema_extra={"pattern": RANKER_PATTERN}, examples=["v000003-1a2b3c4d"]),
    ) -> JSON:
        check_ranker_name(version)
        before = runtime.ranker.version
        try:
            loaded = await anyio.to_thread.run_sync(runtime.ranker.activate, version)
        except RankerRefused as exc:
            log.warning("admin activation of ranker %s refused: %s", version, exc)
            status = 404 if "no such version" in str(exc) else 422
            raise ApiError(status, f"{exc}; still serving ranker {before}") from None
        return JSON({"version": loaded.version, "previous": before, "state": "live"})

    @router.get("/status")
    async def status() -> JSON:
        refreshing = learner.refresh()
        if refreshing is not None:
            await anyio.to_thread.run_sync(refreshing.wait, LEARNER_LAG_WAIT_S)
        return JSON(public_body(_status(runtime, learner.value), state_dir))

    return router


def _adapters(runtime: ServingRuntime) -> dict[str, Any]:
    from models.registry import AdapterRegistry, AdapterRejected

    registry = AdapterRegistry(runtime.settings.state_dir / "adapters")
    active = runtime.active_version()
    building = runtime.builder.current.version if runtime.builder.current else None
    out = []
    for version in registry.versions():
        entry: dict[str, Any] = {"version": version, "active": version == active, "building": version == building}
        try:
            m = registry.manifest(version)
            entry.update(parent=m.parent, created=m.created, pairs_seen=m.pairs_seen, metrics=m.metrics)
        except AdapterRejected as exc:
            entry["error"] = str(exc)
        out.append(entry)
    return {"active": active, "building": building, "history": list(runtime.builder.history), "versions": out}


def _rankers(runtime: ServingRuntime) -> dict[str, Any]:
    """Published rankers with their manifests, the registry's record and what this process serves."""
    from models.ranker_registry import RankerRejected

    slot = runtime.ranker
    registry = slot.registry
    serving = slot.version
    try:
        history = registry.history()
    except RankerRejected as exc:
        history = []
        log.warning("ranker activation record unreadable: %s", exc)
    out = []
    for version in registry.versions():
        entry: dict[str, Any] = {"version": version, "serving": version == serving,
                                 "active": bool(history) and history[-1] == version}
        try:
            m = registry.manifest(version)
            entry.update(
                family=m.family, parent=m.parent, created=m.created, examples_seen=m.examples_seen, size=m.size,
                metrics=m.metrics, feature_schema=m.feature_schema, schema_ok=m.feature_schema == slot.schema,
            )
        except RankerRejected as exc:
            entry["error"] = str(exc)
        out.append(entry)
    return {
        "serving": serving,
        "active": history[-1] if history else None,
        "history": history,
        "schema": slot.schema,
        "slot": slot.summary(),
        "versions": out,
    }


def _learner_lag(runtime: ServingRuntime) -> dict[str, Any]:
    """How far the newest adapter is behind the train pairs (pairs, seconds).

    ``train_pairs`` counts the topic by end offsets, which Tansu under-reports, so the
    pair lag is a lower bound there.
    """
    from models.registry import AdapterRegistry

    registry = AdapterRegistry(runtime.settings.state_dir / "adapters")
    latest = registry.latest()
    out: dict[str, Any] = {"latest_version": latest, "pairs_seen": 0, "latest_age_s": None}
    if latest is not None:
        try:
            m = registry.manifest(latest)
            out.update(pairs_seen=m.pairs_seen, latest_age_s=round(time.time() - m.created, 1))
        except Exception as exc:
            out["error"] = str(exc)
    if not runtime.follow_topics:
        return out
    try:
        from freshrec.consumer import topic_counts

        pairs = topic_counts(runtime.settings).get(runtime.settings.topics.train_pairs, 0)
        out["train_pairs"] = pairs
        out["lag_pairs"] = max(pairs - out["pairs_seen"], 0)
    except Exception as exc:
        out["train_pairs"] = None
        out["kafka_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _status(runtime: ServingRuntime, learner: dict[str, Any] | None) -> dict[str, Any]:
    pair = runtime.active.pair
    builder = runtime.builder
    vectors = runtime.vectors
    return {
        "active": None
        if pair is None
        else {
            "adapter_version": pair.adapter_version,
            "index_version": pair.index_version,
            "items": len(pair.index),
            "built_at": pair.built_at,
            "build_seconds": round(pair.build_seconds, 3),
        },
        "building": builder.current.summary() if builder.current else None,
        "last_swap": builder.last_swap.summary() if builder.last_swap else None,
        "last_job": builder.last.summary() if builder.last else None,
        "swaps": runtime.active.swaps,
        "history": list(builder.history),
        "auto_activate": runtime.settings.auto_activate,
        "announcements": runtime.announcements[-5:],
        "learner": learner,
        "item_vectors": None
        if vectors is None
        else {
            "received": vectors.received,
            "applied": runtime.applier.applied,
            "reencoded": runtime.applier.reencoded,
            "stashed": runtime.applier.stashed,
            "lag": vectors.lag,
            "errors": vectors.errors,
            "last_error": vectors.last_error,
        },
        "ranker": runtime.ranker.summary(),
        "shop_view": {
            "ready": runtime.shop.view is not None,
            "now_ts": None if runtime.shop.view is None else runtime.shop.view.now_ts,
            "refreshes": runtime.shop.refreshes,
            "last_error": runtime.shop.last_error,
        },
        "shoppers": runtime.shoppers.summary(),
        "result_cache": runtime.results.stats(),
        "redis": {"healthy": runtime.gate.healthy, "failures": runtime.gate.failures, "last_error": runtime.gate.last_error},
        "popularity": {
            "items": len(runtime.popularity.view.ranked),
            "read_at": runtime.popularity.view.read_at,  # when the hashes were last read (they had moved)
            "checked_at": runtime.popularity.checked_at,  # when the applied offsets were last compared
            "unchanged_checks": runtime.popularity.unchanged,
            "last_error": runtime.popularity.last_error,
        },
    }
