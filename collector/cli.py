"""``freshrec collect``: run the HTTP collector on uvicorn.

One worker is enough: a request's time is spent waiting for the broker's confirmation,
in a worker thread, and the producer batches concurrent requests' records together.
Scale out with more collector replicas behind a load balancer; each has its own producer,
and keying by ``user_id`` keeps a shopper's events in one partition whichever replica sent them.

Examples::

    FRESHREC_COLLECTOR_TOKEN=s3cret freshrec collect          # settings.collector_host:collector_port
    freshrec collect --port 8011 --insecure-no-token           # a local demo: anyone may send events
"""

from __future__ import annotations

import argparse
import logging
import sys

from freshrec.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freshrec collect", description="Run the HTTP event collector (POST /events).")
    p.add_argument("--host", help="bind address (default: settings.collector_host)")
    p.add_argument("--port", type=int, help="port (default: settings.collector_port)")
    p.add_argument(
        "--insecure-no-token", action="store_true",
        help="start without FRESHREC_COLLECTOR_TOKEN: anyone who reaches the port can send events (local demos only)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str], settings: Settings) -> int:
    args = build_parser().parse_args(argv)
    update: dict[str, object] = {}
    if args.host:
        update["collector_host"] = args.host
    if args.port:
        update["collector_port"] = args.port
    if update:
        settings = settings.model_copy(update=update)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from .app import ConfigError, create_app

    try:
        app = create_app(settings, insecure_no_token=args.insecure_no_token)
    except ConfigError as exc:
        print(f"freshrec collect: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.collector_host,
        port=settings.collector_port,
        log_level=args.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run()
    return 0
