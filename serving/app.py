"""The HTTP API: /recommend, /search, /similar, health, metrics (and /admin, see serving.admin).

Every ranking endpoint takes the active pair once, at its start, and uses only that pair
(:mod:`serving.pair`), so a response's ``adapter_version`` and ``index_version`` name the
encoder and index that produced every score in it.

Response shape::

    {"items": [{"item_id": "85123A", "title": "WHITE HANGING HEART T-LIGHT HOLDER", "score": 0.93}, ...],
     "adapter_version": "v000003-1a2b3c4d", "index_version": "v000003-1a2b3c4d@4", "server_ms": 1.2}

On /recommend each item also has ``reasons``, short phrases saying why it is there
(:mod:`serving.reasons`): ``"bought before"``, ``"you looked at it"``, ``"bought together
with <title>"`` (or ``"often bought together with your items"``), ``"shoppers like you
bought it"``, ``"similar to what you viewed"``, ``"popular now"``, ``"new arrival"``; from
the ranker's candidate sources, or from the blend's terms, or ``["popular now"]`` for a
cold shopper::

    {"item_id": "22423", "title": "REGENCY CAKESTAND 3 TIER", "score": 0.41,
     "reasons": ["bought together with ROSES REGENCY TEACUP AND SAUCER", "popular now"]}

plus ``source`` on /recommend (``personal`` or ``popularity``), ``personalised`` on /search
(whether a user vector was blended in), and ``degraded: true`` with a ``reason`` when
Redis could not be read, or when it answered from an empty state (no applied events, an
empty catalog, no popularity for a cold user: see :func:`serving.shopper_data.state_gap`).
/recommend also names the ranker: ``ranker_version`` is the version whose scores ordered
the answer (the one read from :class:`serving.ranker_slot.RankerSlot` at the request's
start), or null when the blend or popularity did, and then ``ranker_fallback`` says why
(a code of :data:`serving.ranked.FALLBACKS`: ``no_ranker``, ``schema_mismatch``,
``ranker_refused``, ``ranker_error``, ``redis``, ``no_shop_view``, ``no_baskets``,
``cold``, ``unavailable``); ``ranker_fallback`` is null when the ranker answered.
A personal answer is kept in a result cache (:mod:`serving.result_cache`) keyed by the
shopper's state as read for the request and by the versions of everything else it was
made of, so a state change is reflected in the very next answer.
Errors are ``{"error": "..."}`` with a 4xx: a missing or bad parameter or k out of range
422, an empty query 422, a query over ``MAX_QUERY_CHARS`` or a body over
``MAX_BODY_BYTES`` 413, an unknown item in /similar 404, and 503 while the first index
is still loading. No error carries a filesystem path (:func:`public_message`); the
detail goes to the log.

``/users/{user_id}`` is a shopper's history, so it needs ``Authorization: Bearer
<settings.users_token>`` (401 without, 403 wrong) and is off (404) when no token is set.
It has its own token, not the admin one, because the demo page carries it into a browser.

With ``settings.demo_actions`` (``FRESHREC_DEMO_ACTIONS=1``; off by default) the demo's
write path is mounted too: ``POST /demo/act``, ``GET /demo/applied``, ``GET /demo/stats``
(:mod:`serving.demo_api`).

An unknown user is not an error: for /recommend they are a cold user (popularity,
``source: popularity``), for /search the query is used alone. A recommender cannot
tell a new shopper from a mistyped id, and a new shopper must get an answer.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path as FilePath
from typing import Any, Literal

import anyio
import orjson
from fastapi import Depends, FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from freshrec.api_docs import mount_offline_docs
from freshrec.contracts import MAX_ID_CHARS, MAX_QUERY_CHARS
from ranking import scoring

from .metrics import ENDPOINTS, TimingMiddleware
from .pair import ServingPair
from .ranked import gather_shopper, try_ranker
from .reasons import POPULAR_NOW, explain_blend, explain_ranked, ranked_flags
from .result_cache import AnswerKey, CachedAnswer, state_digest
from .runtime import ServingRuntime
from .shopper_data import RedisUnavailable, state_gap

log = logging.getLogger("freshrec.serving.app")

MAX_BODY_BYTES = 16 * 1024  # a /search body is a query of <= 1,000 characters and two short fields
STATIC_DIR = FilePath(__file__).resolve().parent / "static"
DAY_S = 86_400.0
# Ranker-path failures that may pass (a slow Redis, a model or input that fails now and
# then): their blend answer is not cached, so the next request tries the ranker again.
UNCACHED_FALLBACKS = frozenset({"redis", "ranker_error"})


class JSON(JSONResponse):
    """orjson (numpy-aware); a JSONResponse, so OpenAPI documents each route's model."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class ApiError(Exception):
    """A 4xx/5xx with a message for the caller (paths are stripped on the way out)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


# -- the documented shapes (OpenAPI, /docs; the fuzz test checks answers against them) -----


class Error(BaseModel):
    error: str


class RankedItem(BaseModel):
    item_id: str
    title: str
    score: float
    reasons: list[str] | None = None  # /recommend only (serving.reasons)


class Ranked(BaseModel):
    """A ranking; ``source`` is /recommend's, ``personalised`` /search's."""

    items: list[RankedItem]
    adapter_version: str
    index_version: str
    server_ms: float
    source: Literal["personal", "popularity"] | None = None
    personalised: bool | None = None
    degraded: bool | None = None
    reason: str | None = None
    ranker_version: str | None = None
    ranker_fallback: str | None = None


class Interaction(BaseModel):
    item_id: str
    title: str
    kind: str
    ts: float


class UserHistory(BaseModel):
    user_id: str
    items: list[Interaction]
    events: int
    last_ts: float
    server_ms: float


class Health(BaseModel):
    ok: bool
    uptime_s: float


class Readiness(BaseModel):
    ready: bool
    reason: str | None = None
    degraded: bool | None = None
    adapter_version: str | None = None
    index_version: str | None = None
    items: int | None = None
    build: dict[str, Any] | None = None
    # the answering worker process: with ``serving_workers`` > 1 each loads its own pair,
    # so a supervisor (or the fault harness) can tell when every worker is ready
    worker: int | None = None


_ERROR_MEANING = {
    401: "no 'Authorization: Bearer <token>' header",
    403: "wrong token",
    404: "not found (the message says what)",
    409: "the request conflicts with the current state",
    413: "query or body too large",
    422: "a bad parameter or body (the message names it)",
    503: "not ready (index loading) or a dependency is unavailable",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, all ``{"error": "..."}``."""
    return {code: {"model": Error, "description": _ERROR_MEANING[code]} for code in codes}


# An absolute path: a "/" that does not continue a word, a URL ("redis://h:p/0"), a
# relative path or "<state_dir>", up to a character no path in our messages contains.
_ABS_PATH = re.compile(r"(?<![\w.~:/>-])/[^\s'\"`,;:()<>\[\]{}]+")


_API_HEADS = ENDPOINTS | {"users", "docs", "openapi.json"}


def public_message(text: str, state_dir: FilePath | str | None = None) -> str:
    """``text`` without filesystem paths, for a response (the full text belongs in the log).

    Registry, export and load errors name the files they tripped on, which tells a
    caller how the host is laid out. A path under ``state_dir`` keeps its part below it
    (``<state_dir>/adapters/v000001-1a2b3c4d``: still useful to the operator); any other
    absolute path keeps its last component only.
    """
    roots: list[str] = []
    if state_dir is not None and str(state_dir) not in ("", ".", "/"):
        roots = [str(state_dir).rstrip("/")]
        try:
            absolute = str(FilePath(state_dir).resolve())
            if absolute not in roots:
                roots.insert(0, absolute)  # tried first: a relative root can occur inside it
        except OSError:
            pass
    for root in roots:
        text = re.sub(rf"(?<![\w.~/-]){re.escape(root)}(?![\w.-])", "<state_dir>", text)

    def shorten(m: re.Match[str]) -> str:
        path = m.group(0).rstrip(".")
        if path.split("/", 2)[1] in _API_HEADS:
            return m.group(0)  # a route of this API ("see GET /admin/adapters"), not a file
        return ".../" + path.rstrip("/").rsplit("/", 1)[-1] + m.group(0)[len(path) :]

    return _ABS_PATH.sub(shorten, text)


def public_body(obj: Any, state_dir: FilePath | str | None = None) -> Any:
    """:func:`public_message` over every string in a JSON-like value (admin status, jobs)."""
    if isinstance(obj, str):
        return public_message(obj, state_dir)
    if isinstance(obj, dict):
        return {k: public_body(v, state_dir) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [public_body(v, state_dir) for v in obj]
    return obj


def bearer_guard(token: str | None, scheme_name: str, what: str, setting: str) -> Any:
    """A dependency that lets through ``Authorization: Bearer <token>`` only.

    No (or a non-Bearer) header is 401 with ``WWW-Authenticate: Bearer``, a wrong token
    403; ``token`` None refuses everyone (callers that can be off check that first).
    Constant-time comparison, so the answer time does not leak the token.
    """
    scheme = HTTPBearer(auto_error=False, scheme_name=scheme_name, description=f"settings.{setting}")
    expected = (token or "").encode()

    async def check(credentials: HTTPAuthorizationCredentials | None = Security(scheme)) -> None:
        if credentials is None or not credentials.credentials.strip():
            raise ApiError(
                401, f"{what} needs 'Authorization: Bearer <token>' (settings.{setting})", {"WWW-Authenticate": "Bearer"}
            )
        if not expected or not hmac.compare_digest(credentials.credentials.strip().encode(), expected):
            raise ApiError(403, f"wrong {what} token")

    return check


def _items(pair_results: list[tuple[str, float]], titles: dict[str, str]) -> list[dict[str, Any]]:
    return [{"item_id": i, "title": titles.get(i, ""), "score": s} for i, s in pair_results]


def _with_reasons(items: list[dict[str, Any]], reasons: list[list[str]] | None) -> list[dict[str, Any]]:
    for item, why in zip(items, reasons or [[POPULAR_NOW]] * len(items), strict=True):
        item["reasons"] = why
    return items


def _body(pair: ServingPair, items: list[dict[str, Any]], t0: float, **extra: Any) -> dict[str, Any]:
    return {
        "items": items,
        "adapter_version": pair.adapter_version,
        "index_version": pair.index_version,
        "server_ms": round((time.perf_counter() - t0) * 1000.0, 3),
        **extra,
    }


def create_app(runtime: ServingRuntime, manage_runtime: bool = True) -> FastAPI:
    """The ASGI app over ``runtime``; with ``manage_runtime`` its lifespan starts and stops it."""
    settings = runtime.settings
    max_k = settings.max_k
    half_life_user_s = settings.user_vector_half_life_days * DAY_S
    basket_decay = settings.repeat_basket_decay

    closers: list[Any] = []  # run at shutdown (the demo router's producer)
    results = runtime.results  # finished /recommend answers (serving.result_cache)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        if manage_runtime:
            runtime.start()
        try:
            yield
        finally:
            for close in closers:
                close()
            if manage_runtime:
                runtime.stop()

    app = FastAPI(title="freshrec", default_response_class=JSON, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    mount_offline_docs(app, "freshrec")

    # -- errors --------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSON:
        message = public_message(exc.message, settings.state_dir)
        if message != exc.message:
            log.info("%s %s answered %d: %s", request.method, request.url.path, exc.status, exc.message)
        return JSON({"error": message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSON:
        return JSON({"error": "; ".join(_describe(e) for e in exc.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSON:
        return JSON({"error": str(exc.detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSON:
        log.exception("unexpected error on %s", request.url.path)
        return JSON({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    def _pair() -> ServingPair:
        pair = runtime.active.pair
        if pair is None:
            raise ApiError(503, "the index is still loading; retry shortly (see /readyz)")
        return pair

    # -- ranking -------------------------------------------------------------------------

    @app.get("/recommend", response_model=Ranked, responses=error_responses(422, 503))
    @_off_loop(settings.serving_threadpool)
    def recommend(
        user_id: str = Query(..., min_length=1, max_length=MAX_ID_CHARS, examples=["17841"]),
        k: int = Query(10, ge=1, le=max_k),
    ) -> JSON:
        t0 = time.perf_counter()
        # Everything the answer is made of is read once, here, each object with the
        # generation that names it (serving.result_cache); the catalog count before the pair.
        catalog = runtime.catalog_changes
        pair = _pair()
        ranker_gen, ranker = runtime.ranker.stamped  # read once: the version named is the one that scored
        blocked = runtime.ranker.blocked
        popularity_gen, popularity = runtime.popularity.stamped
        shop_gen, shop = runtime.shop.stamped
        space = pair.space()
        try:
            state = runtime.gate.call(_read_state, runtime, user_id)
        except RedisUnavailable as exc:
            runtime.metrics.degraded.labels("recommend").inc()
            ranked = scoring.popular(popularity.scores, popularity.ranked, k, space)
            reason = public_message(str(exc), settings.state_dir)
            _count(None, "unavailable")
            return JSON(_body(pair, _with_reasons(_items(ranked, runtime.titles), None), t0, source="popularity",
                              degraded=True, reason=reason, ranker_version=None, ranker_fallback="unavailable"))
        cold = state is None or (not state.history and not state.basket_bits)
        gap = state_gap(popularity, len(pair.index), cold)
        flag: dict[str, Any] = {}
        if gap is not None:
            runtime.metrics.degraded.labels("recommend").inc()
            flag = {"degraded": True, "reason": gap}
        if cold:
            ranked = scoring.popular(popularity.scores, popularity.ranked, k, space)
            _count(None, "cold")
            return JSON(_body(pair, _with_reasons(_items(ranked, runtime.titles), None), t0, source="popularity",
                              **flag, ranker_version=None, ranker_fallback="cold"))
        key: AnswerKey | None = None
        if results.enabled and not flag:
            key = AnswerKey(
                user_id, k, state_digest(state.to_bytes()), pair.index_version, catalog, ranker_gen,
                None if blocked is None else blocked.code, popularity_gen, shop_gen,
            )
            hit = results.get(key)
            runtime.metrics.result_cache_lookup(None if hit is None else hit.age_s)
            if hit is not None:
                cached = hit.value
                _count(cached.ranker_version, cached.fallback)
                return JSON(_body(pair, cached.items, t0, **cached.extra))

        def respond(items: list[dict[str, Any]], ranker_version: str | None, fallback: str | None) -> JSON:
            extra = {"source": "personal", **flag, "ranker_version": ranker_version, "ranker_fallback": fallback}
            if key is not None and fallback not in UNCACHED_FALLBACKS:
                results.put(key, CachedAnswer(items, extra, ranker_version, fallback))
            return JSON(_body(pair, items, t0, **extra))

        views: list[Any] = []  # the ShopperView the ranker was given: its co-purchase rows name reasons

        def gather_kept(st: Any, now_ts: float) -> Any:
            views.append(gather(st, now_ts))
            return views[-1]

        answer, fallback = try_ranker(
            ranker, None if blocked is None else blocked.code, state, shop, gather_kept,
            pair.index, pair.similarity, runtime.feature_rules, k, on_error=ranker_failed,
        )
        if answer is not None and ranker is not None:
            _count(ranker.version, None)
            items = _items(answer.ranked, runtime.titles)
            rules = runtime.feature_rules
            why = explain_ranked(
                [i for i, _ in answer.ranked], state, views[-1] if views else None,
                sources=ranked_flags([i for i, _ in answer.ranked], getattr(answer, "scored", None)),
                popular_top=[] if shop is None else list(shop.popular_top)[: rules.popular],
                new_items=[] if shop is None else list(shop.new_items)[: rules.new],
                titles=runtime.titles, shrink=rules.shrink,
            )
            return respond(_with_reasons(items, why), ranker.version, None)
        ranked = scoring.recommend(
            state.history,
            state.basket_scores(basket_decay),
            space,
            popularity.scores,
            popularity.ranked,
            runtime.weights,
            k,
            now_ts=state.last_ts,
            half_life_s=half_life_user_s,
            candidates=settings.recommend_candidates,
            new_items=popularity.new_items,
            similarity_scale=pair.similarity,
        )
        _count(None, fallback)
        ids = [i for i, _ in ranked]
        why = explain_blend(
            ids, state,
            vectors=pair.index.reconstruct_many(list(dict.fromkeys([*(h.item_id for h in state.history), *ids]))),
            half_life_s=half_life_user_s, scale=pair.similarity, basket_decay=basket_decay,
            popular_top=popularity.ranked,
            new_items=popularity.new_items if isinstance(runtime.weights, scoring.LogBlendWeights) else (),
        )
        return respond(_with_reasons(_items(ranked, runtime.titles), why), None, fallback)

    def gather(state: Any, now_ts: float) -> Any:
        return gather_shopper(
            state, now_ts, runtime.feature_rules, runtime.collab_rules, settings.collab_neighbours,
            runtime.shoppers.search, runtime.read_shopper_inputs,
        )

    last_logged: dict[str, float] = {}

    def ranker_failed(code: str, exc: BaseException) -> None:
        """Log a ranker-path failure with its traceback, at most once a minute per kind."""
        now = time.monotonic()
        if now - last_logged.get(code, -1e9) >= 60.0:
            last_logged[code] = now
            log.warning("ranker path failed (%s), the blend answers: %s: %s", code, type(exc).__name__, exc,
                        exc_info=code == "ranker_error")

    def _count(ranker_version: str | None, fallback: str | None) -> None:
        m = runtime.metrics
        if ranker_version is not None:
            m.ranked_by.labels("ranker").inc()
        else:
            m.ranked_by.labels("popularity" if fallback in ("cold", "unavailable") else "blend").inc()
            m.ranker_fallbacks.labels(fallback or "unknown").inc()

    @app.post(
        "/search",
        response_model=Ranked,
        responses=error_responses(413, 422, 503),
        openapi_extra={"requestBody": _search_body_schema(max_k)},
    )
    async def search(request: Request) -> JSON:
        t0 = time.perf_counter()
        query, user_id, k = await _search_request(request, max_k)
        pair = _pair()
        if settings.serving_threadpool:  # the encoder, Redis and FAISS in one hop to a worker thread
            return await anyio.to_thread.run_sync(lambda: _search_answer(pair, query, user_id, k, t0, None))
        qvec = (await anyio.to_thread.run_sync(pair.encoder.encode, [query]))[0]
        return _search_answer(pair, query, user_id, k, t0, qvec)

    def _search_answer(pair: ServingPair, query: str, user_id: str | None, k: int, t0: float, qvec: Any) -> JSON:
        if qvec is None:
            qvec = pair.encoder.encode([query])[0]
        extra: dict[str, Any] = {}
        uvec = None
        if user_id is not None and settings.search_user_weight > 0:
            try:
                state = runtime.gate.call(_read_state, runtime, user_id)
            except RedisUnavailable as exc:
                runtime.metrics.degraded.labels("search").inc()
                state, extra = None, {"degraded": True, "reason": public_message(str(exc), settings.state_dir)}
            if state is not None and state.history:
                hw = scoring.history_weights(state.history, state.last_ts, half_life_user_s)
                uvec = scoring.user_vector(hw, pair.index.reconstruct_many(list(hw)))
        if not extra and len(pair.index) == 0:
            runtime.metrics.degraded.labels("search").inc()
            extra = {"degraded": True, "reason": state_gap(runtime.popularity.view, 0, cold=False)}
        vec = scoring.search_vector(qvec, uvec, settings.search_user_weight)
        hits = pair.index.search(vec, k)[0]
        return JSON(_body(pair, _items(hits, runtime.titles), t0, personalised=uvec is not None, **extra))

    @app.get("/similar/{item_id}", response_model=Ranked, responses=error_responses(404, 422, 503))
    async def similar(item_id: str = Path(..., examples=["85123A"]), k: int = Query(10, ge=1, le=max_k)) -> JSON:
        t0 = time.perf_counter()
        if len(item_id) > MAX_ID_CHARS:
            raise ApiError(422, f"item_id is {len(item_id)} characters; the limit is {MAX_ID_CHARS}")
        pair = _pair()
        vec = pair.index.reconstruct(item_id)
        if vec is None:
            raise ApiError(404, f"unknown item {item_id!r}: not in the catalog (or deleted)")
        hits = pair.index.search(vec, k, exclude=frozenset((item_id,)))[0]
        return JSON(_body(pair, _items(hits, runtime.titles), t0))

    users_guard = bearer_guard(settings.users_token, "UsersToken", "/users", "users_token")

    async def users_allowed() -> None:
        if not settings.users_token:
            raise ApiError(
                404,
                "/users is off on this server: it serves shoppers' histories only to holders of a token; "
                "set FRESHREC_USERS_TOKEN to turn it on",
            )

    @app.get(
        "/users/{user_id}",
        response_model=UserHistory,
        responses=error_responses(401, 403, 404, 422, 503),
        dependencies=[Depends(users_allowed), Depends(users_guard)],
    )
    @_off_loop(settings.serving_threadpool)
    def user_history(user_id: str = Path(..., examples=["17841"]), n: int = Query(10, ge=1, le=max_k)) -> JSON:
        """A shopper's latest interactions, newest first (personal data: token only; see the module doc)."""
        t0 = time.perf_counter()
        if len(user_id) > MAX_ID_CHARS:
            raise ApiError(422, f"user_id is {len(user_id)} characters; the limit is {MAX_ID_CHARS}")
        try:
            state = runtime.gate.call(_read_state, runtime, user_id)
        except RedisUnavailable as exc:
            raise ApiError(503, f"user state is unavailable: {exc}") from None
        if state is None:
            raise ApiError(404, f"unknown user {user_id!r}: no events seen for them yet")
        items = [
            {"item_id": h.item_id, "title": runtime.titles.get(h.item_id, ""), "kind": h.kind, "ts": h.ts}
            for h in state.history[:n]
        ]
        return JSON(
            {
                "user_id": user_id,
                "items": items,
                "events": state.events,
                "last_ts": state.last_ts,
                "server_ms": round((time.perf_counter() - t0) * 1000.0, 3),
            }
        )

    # -- health and metrics ----------------------------------------------------------------

    @app.get("/healthz", response_model=Health)
    async def healthz() -> JSON:
        return JSON({"ok": True, "uptime_s": round(time.time() - runtime.started_at, 1)})

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}})
    async def readyz() -> JSON:
        """Ready once the first pair is live with a non-empty catalog; an empty user state
        is flagged (``degraded``) but does not hold readiness back: a new system has none."""
        pair = runtime.active.pair
        if pair is None:
            job = runtime.builder.current
            build = public_body(job.summary(), settings.state_dir) if job else None
            return JSON({"ready": False, "reason": "the first index is still building", "build": build,
                         "worker": os.getpid()}, status_code=503)
        n = len(pair.index)
        body: dict[str, Any] = {"adapter_version": pair.adapter_version, "index_version": pair.index_version, "items": n,
                                "worker": os.getpid()}
        gap = state_gap(runtime.popularity.view, n, cold=False)
        if n == 0:
            return JSON({"ready": False, "reason": gap, **body}, status_code=503)
        if gap is not None:
            body.update(degraded=True, reason=gap)
        return JSON({"ready": True, **body})

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if runtime.popularity.read_applied is None:
        # Belongs in ServingRuntime's constructor (read with popularity, off the request path);
        # wired here until runtime.py takes it.
        from stores.user_store import read_applied_offsets

        runtime.popularity.read_applied = lambda: read_applied_offsets(runtime.background_redis, settings)
    if not settings.users_token:
        log.info("GET /users is off: set FRESHREC_USERS_TOKEN to serve shoppers' histories to holders of it")

    if runtime.admin:
        from .admin import admin_router

        app.include_router(admin_router(runtime))

    if settings.demo_actions:
        # Before the static mount at "/", which would otherwise take these paths.
        from .demo_api import demo_router

        router, close_demo = demo_router(runtime)
        app.include_router(router)
        closers.append(close_demo)
        log.warning("demo actions are on (FRESHREC_DEMO_ACTIONS): POST /demo/act sends events for any shopper")

    if STATIC_DIR.is_dir() and any(STATIC_DIR.iterdir()):
        # The demo page lives here (the lead's); the API needs nothing from it.
        from starlette.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=str(STATIC_DIR), html=True), name="static")

    app.add_middleware(TimingMiddleware, metrics=runtime.metrics)
    return app


def _search_body_schema(max_k: int) -> dict[str, Any]:
    """/search's body as OpenAPI (the route reads it by hand: the size limit comes first)."""
    props = {
        "query": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS, "pattern": r"\S"},
        "user_id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS},
        "k": {"type": "integer", "minimum": 1, "maximum": max_k, "default": 10},
    }
    schema = {"type": "object", "properties": props, "required": ["query"], "additionalProperties": False}
    example = {"query": "red lunch bag", "user_id": "17841", "k": 10}
    return {"required": True, "content": {"application/json": {"schema": schema, "example": example}}}


def _off_loop(threadpool: bool) -> Any:
    """A plain ``def`` handler as it is (Starlette runs it in its threadpool, off the event
    loop: its Redis reads and Python ranking then overlap other requests' I/O), or, with
    ``threadpool`` false, wrapped to run on the event loop (one request at a time)."""

    def wrap(handler: Any) -> Any:
        if threadpool:
            return handler

        @functools.wraps(handler)
        async def on_loop(*args: Any, **kwargs: Any) -> Any:
            return handler(*args, **kwargs)

        return on_loop

    return wrap


def _read_state(runtime: ServingRuntime, user_id: str) -> Any:
    from stores.user_store import read_user_state

    return read_user_state(runtime.request_redis, runtime.settings, user_id)


def _describe(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body")]
    where = ".".join(loc) or "request"
    msg = str(err.get("msg", "invalid"))
    if err.get("type") == "missing":
        msg = "is required"
    got = err.get("input")
    if got is not None and err.get("type") != "missing" and not isinstance(got, dict):
        text = str(got)
        msg += f" (got {text[:40]!r}{'...' if len(text) > 40 else ''})"
    return f"{where}: {msg}"


async def _search_request(request: Request, max_k: int) -> tuple[str, str | None, int]:
    """Read and validate a /search body by hand: the size limit must apply before parsing."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is {int(declared):,} bytes; the limit is {MAX_BODY_BYTES:,}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body exceeds {MAX_BODY_BYTES:,} bytes")
        chunks.append(chunk)
    try:
        obj = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError:
        raise ApiError(422, 'body must be JSON like {"query": "red mug", "k": 10}') from None
    if not isinstance(obj, dict):
        raise ApiError(422, 'body must be a JSON object like {"query": "red mug", "k": 10}')
    unknown = sorted(set(obj) - {"query", "user_id", "k"})
    if unknown:
        raise ApiError(422, f"unknown field(s) {', '.join(unknown)}; expected query, user_id, k")
    query = obj.get("query")
    if not isinstance(query, str):
        raise ApiError(422, "query: is required and must be a string")
    query = query.strip()
    if not query:
        raise ApiError(422, "query: must not be empty")
    if len(query) > MAX_QUERY_CHARS:
        raise ApiError(413, f"query is {len(query):,} characters; the limit is {MAX_QUERY_CHARS:,}")
    user_id = obj.get("user_id")
    if user_id is not None and (not isinstance(user_id, str) or not user_id or len(user_id) > MAX_ID_CHARS):
        raise ApiError(422, f"user_id: must be a non-empty string of at most {MAX_ID_CHARS} characters")
    k = obj.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int):
        raise ApiError(422, f"k: must be an integer (got {k!r})")
    if not 1 <= k <= max_k:
        raise ApiError(422, f"k: must be between 1 and {max_k} (got {k})")
    return query, user_id, k
