"""``freshrec monitor``: the flows' progress on ``/metrics`` for Prometheus.

Example::

    FRESHREC_MONITOR_HOST=0.0.0.0 freshrec monitor          # settings.monitor_host:monitor_port
    freshrec monitor --port 9108
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from freshrec.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freshrec monitor", description="Serve the flows' progress on a Prometheus /metrics.")
    p.add_argument("--host", help="bind address (default: settings.monitor_host)")
    p.add_argument("--port", type=int, help="port (default: settings.monitor_port)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str], settings: Settings) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from prometheus_client import start_http_server

    from .exporter import monitor_registry

    host = args.host or settings.monitor_host
    port = settings.monitor_port if args.port is None else args.port
    registry, monitor = monitor_registry(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server, thread = start_http_server(port, addr=host, registry=registry)
    logging.getLogger("monitor").info("serving /metrics on %s:%d", host, server.server_address[1])
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        monitor.close()
    return 0
