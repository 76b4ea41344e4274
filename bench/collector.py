"""Events/s through the HTTP collector, against the bare validating producer in the same run.

    python -m bench.collector [--batch 500] [--clients 4] [--duration 10] [--json docs/bench/collector.json]

A private broker on free ports; then

(a) the bare producer: :class:`freshrec.producer.RecordProducer` validates, keys and sends
    ``--baseline-events`` JSON lines and waits until the broker confirmed every one, as
    ``freshrec produce`` does: the most a Python producer on this machine delivers.
(b) the collector: ``freshrec collect`` in its own process, ``--clients`` keep-alive
    connections each POSTing ``--batch`` events (a JSON array) as soon as the previous
    answer is in, for ``--duration`` seconds. Only records answered ``accepted`` count,
    and an answer comes only after the broker confirmed its batch, so the rate is of
    confirmed events, as (a)'s is.

The ratio collector/bare is the figure that survives a noisy machine. The clients speak raw
HTTP/1.1 over asyncio streams with prebuilt requests (an HTTP library would cost more CPU,
taken from the server's on two shared cores); they still share the cores, so the collector's
figure is a lower bound of what it would do with the clients elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from freshrec.children import popen, stop
from freshrec.infra import free_port, port_open
from freshrec.producer import RecordProducer
from freshrec.settings import Settings

from ._common import private_stack
from .report import percentile, print_rows, write_json

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"
KINDS = ("view", "click", "cart", "purchase")


def _events(tag: str, n: int) -> list[dict[str, Any]]:
    """Synthetic valid events (the contract's shape and sizes of the real ones), 1,000 shoppers."""
    now = time.time()
    return [
        {"event_id": f"{tag}-{i:08d}", "user_id": f"{i * 7919 % 1000:05d}", "kind": KINDS[i % 4],
         "item_id": f"{i * 104729 % 4000:05d}A", "ts": now}
        for i in range(n)
    ]


def bare_producer(settings: Settings, n: int) -> dict[str, Any]:
    lines = [orjson.dumps(e) for e in _events("bare", n)]
    t0 = time.perf_counter()
    with RecordProducer(settings, client_id="bench-bare") as producer:
        for line in lines:
            producer.send_event(line)
        report = producer.flush()
    seconds = time.perf_counter() - t0
    return {"mode": "bare producer", "events": report.confirmed, "seconds": seconds,
            "events_per_s": report.confirmed / seconds, "failed": report.failed}


def _request(port: int, body: bytes) -> bytes:
    return (
        f"POST /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _client(port: int, requests: list[bytes], until: float, out: dict[str, Any]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        i = 0
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            body = orjson.loads(await reader.readexactly(length))
            out["latencies"].append(time.perf_counter() - t0)
            out["statuses"][status] = out["statuses"].get(status, 0) + 1
            out["accepted"] += body.get("accepted", 0)
            out["rejected"] += body.get("rejected", 0)
    finally:
        writer.close()


async def _drive(port: int, clients: int, batch: int, duration: float) -> dict[str, Any]:
    out: dict[str, Any] = {"latencies": [], "statuses": {}, "accepted": 0, "rejected": 0}
    # 8 distinct batches per client, cycled: distinct event ids without building a body per request
    per_client = [
        [_request(port, orjson.dumps(_events(f"c{c}-{k}", batch))) for k in range(8)] for c in range(clients)
    ]
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(port, reqs, t0 + duration, out) for reqs in per_client))
    out["seconds"] = time.perf_counter() - t0
    return out


def through_collector(settings: Settings, clients: int, batch: int, duration: float, log: Path) -> dict[str, Any]:
    port = free_port()
    env = settings.child_env(os.environ) | {"FRESHREC_COLLECTOR_TOKEN": TOKEN}
    with open(log, "wb") as fh:
        proc = popen([sys.executable, "-m", "freshrec", "collect", "--port", str(port), "--log-level", "warning"],
                     env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the collector did not start; see {log}:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        asyncio.run(_drive(port, 1, batch, 1.0))  # warm up: the producer's first metadata, the first batches
        out = asyncio.run(_drive(port, clients, batch, duration))
    finally:
        stop(proc)
    lat = out["latencies"]
    return {"mode": f"collector, {clients} clients x {batch}", "events": out["accepted"], "seconds": out["seconds"],
            "events_per_s": out["accepted"] / out["seconds"], "requests": len(lat),
            "batch_p50_ms": percentile(lat, 50) * 1000, "batch_p99_ms": percentile(lat, 99) * 1000,
            "statuses": {str(k): v for k, v in out["statuses"].items()}, "rejected": out["rejected"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.collector", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--batch", type=int, default=500, help="events per POST")
    p.add_argument("--clients", type=int, default=4, help="concurrent keep-alive connections")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load on the collector")
    p.add_argument("--baseline-events", type=int, default=50_000, help="events the bare producer sends")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    with private_stack(partitions=4) as settings:
        bare = bare_producer(settings, args.baseline_events)
        http = through_collector(settings, args.clients, args.batch, args.duration, settings.state_dir / "collector.log")
    ratio = http["events_per_s"] / bare["events_per_s"]
    columns = ("mode", "events", "seconds", "events_per_s", "batch_p50_ms", "batch_p99_ms")
    print_rows("events/s confirmed by the broker", [{k: row.get(k) for k in columns} for row in (bare, http)])
    print(f"\ncollector / bare producer: {ratio:.2f}   answers: {http['statuses']}")
    write_json(args.json, {"batch": args.batch, "clients": args.clients, "duration_s": args.duration,
                           "bare": bare, "collector": http, "collector_ratio_vs_bare": ratio})
    return 0 if set(http["statuses"]) == {"200"} and http["rejected"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
