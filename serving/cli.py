"""``freshrec serve``: run the API on uvicorn (one process, one event loop).

One worker on purpose: the encoder and index live in the process, and a second worker
would hold a second copy and build every new pair twice on the same two cores. Scale
out with more serving replicas (each follows the topics), not more workers.

Examples::

    freshrec serve                              # settings.api_host:api_port
    freshrec serve --port 8080 --version base   # start on the base model
    FRESHREC_ADMIN_TOKEN=s3cret freshrec serve  # with /admin
    FRESHREC_USERS_TOKEN=t0ken freshrec serve   # with /users/{user_id} (off without a token)
"""

from __future__ import annotations

import argparse
import logging
import sys

from freshrec.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freshrec serve", description="Run the recommend/search/similar API.")
    p.add_argument("--host", help="bind address (default: settings.api_host)")
    p.add_argument("--port", type=int, help="port (default: settings.api_port)")
    p.add_argument("--version", dest="serve_version", help="adapter version to start on (default: the newest)")
    p.add_argument("--no-auto-activate", action="store_true", help="do not activate announced adapters")
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
    if update:
        settings = settings.model_copy(update=update)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from .app import create_app
    from .runtime import ConfigError, ServingRuntime

    try:
        runtime = ServingRuntime(settings)
    except ConfigError as exc:
        print(f"freshrec serve: {exc}", file=sys.stderr)
        return 2
    app = create_app(runtime)
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level=args.log_level,
        access_log=False,  # a log line per request would cost more than the request
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run()
    return 0
