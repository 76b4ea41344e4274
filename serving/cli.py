"""``freshrec serve``: run the API on uvicorn, in ``settings.serving_workers`` processes.

Several workers share one listening socket (uvicorn's supervisor), so requests use
every core: one event loop runs Python one request at a time, and ranking is Python.
Each worker is a whole serving process: it builds its own (encoder, index) pair, follows
the topics and has its own export worker, which costs per worker the memory of a
serving process (measured in bench.serving: RSS per worker) and the catalog encode at
start-up and on each adapter swap. Rankers follow the ranker registry's record, so an
admin ranker activation reaches every worker; an adapter activation through /admin does
not (it builds in the worker that answered), so with admin on serve runs one worker.
Workers get SIGKILL if the supervisor dies without stopping them (design invariant 6).

Examples::

    freshrec serve                              # settings.api_host:api_port
    freshrec serve --port 8080 --version base   # start on the base model
    freshrec serve --workers 1                  # one process (FRESHREC_SERVING_WORKERS=1)
    FRESHREC_ADMIN_TOKEN=s3cret freshrec serve  # with /admin (one worker)
    FRESHREC_USERS_TOKEN=t0ken freshrec serve   # with /users/{user_id} (off without a token)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

from freshrec.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freshrec serve", description="Run the recommend/search/similar API.")
    p.add_argument("--host", help="bind address (default: settings.api_host)")
    p.add_argument("--port", type=int, help="port (default: settings.api_port)")
    p.add_argument("--version", dest="serve_version", help="adapter version to start on (default: the newest)")
    p.add_argument("--no-auto-activate", action="store_true", help="do not activate announced adapters")
    p.add_argument("--workers", type=int, help="worker processes (default: settings.serving_workers)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str], settings: Settings) -> int:
    args = build_parser().parse_args(argv)
    update: dict[str, object] = {}
    if args.host:
        update["api_host"] = args.host
    if args.port:
        update["api_port"] = args.port
    if args.serve_version:
        update["serve_version"] = args.serve_version
    if args.no_auto_activate:
        update["auto_activate"] = False
    if args.workers is not None:
        if args.workers < 1:
            print(f"freshrec serve: --workers must be at least 1 (got {args.workers})", file=sys.stderr)
            return 2
        update["serving_workers"] = args.workers
    if update:
        settings = settings.model_copy(update=update)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from .app import create_app
    from .runtime import ConfigError, ServingRuntime, admin_enabled

    try:
        admin = admin_enabled(settings)
    except ConfigError as exc:
        print(f"freshrec serve: {exc}", file=sys.stderr)
        return 2
    options: dict[str, Any] = dict(
        host=settings.api_host,
        port=settings.api_port,
        log_level=args.log_level,
        access_log=False,  # a log line per request would cost more than the request
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    workers = worker_count(settings, admin)
    if workers == 1:
        try:
            runtime = ServingRuntime(settings)
        except ConfigError as exc:
            print(f"freshrec serve: {exc}", file=sys.stderr)
            return 2
        uvicorn.Server(uvicorn.Config(create_app(runtime), **options)).run()
        return 0
    # Spawned workers rebuild the settings from the environment, the CLI's overrides included.
    os.environ.update(settings.child_env(os.environ))
    os.environ[_LOG_LEVEL_VAR] = args.log_level
    # A worker busy building its first pair can answer the supervisor's ping late on two
    # shared cores; uvicorn would kill and restart it after 5 s.
    uvicorn.run(f"{__name__}:worker_app", factory=True, workers=workers, timeout_worker_healthcheck=30, **options)
    return 0


_LOG_LEVEL_VAR = "_FRESHREC_SERVE_LOG_LEVEL"


def worker_count(settings: Settings, admin: bool) -> int:
    """``settings.serving_workers``, or 1 with /admin on: an adapter activated through
    /admin builds in the worker that answered, and the others would keep the old one."""
    if settings.serving_workers > 1 and admin:
        logging.getLogger("freshrec.serving").warning(
            "serving with 1 worker, not %d: /admin is on, and an adapter activated through it would go live in "
            "one worker only", settings.serving_workers,
        )
        return 1
    return settings.serving_workers


def worker_app() -> Any:
    """The app of one worker process (uvicorn's factory; settings from the environment)."""
    # Our parent is uvicorn's supervisor, which stops us with SIGTERM (gracefully) when it is
    # asked to stop. If it dies instead, SIGKILL: with the supervisor gone nothing we hold
    # needs a goodbye, and a graceful stop of a worker still building its first pair can take
    # many seconds on a busy machine. Our export worker dies with us (its own SIGKILL request).
    from freshrec.children import die_with_parent

    die_with_parent(signal.SIGKILL)
    level = os.environ.get(_LOG_LEVEL_VAR, "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    from .app import create_app
    from .runtime import ServingRuntime

    return create_app(ServingRuntime(Settings()))
