"""Highest sustained events/s of the user-state flow, against a bare consume-and-count flow.

    python -m bench.stream_throughput [--events 200000] [--layouts 1x1 1x2 2x1] [--json PATH]

Loads ``--events`` real events (../shared/data/online_retail_ii) into the ``events``
topic of a private broker once, then for each layout (1 worker; 2 worker threads; 2
processes of 1 worker) drains the whole topic with
(a) a bare Bytewax flow that only consumes and counts, and (b) the user-state flow
(recovery on, as deployed). Rate = events / (time the last one is reflected - time the
first one is), so process start-up is not counted; both are timed the same way, by
polling Redis (the bare flow adds its count there once per batch), and the ratio
users/bare is the figure that survives a noisy machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer

from freshrec.infra import free_port
from freshrec.settings import Settings
from streams.flow_process import FlowProcess, applied_count
from stores.redis_client import connect

from ._common import DEFAULT_DATA, load_events, private_stack
from .report import print_rows, write_json

BARE_COUNT_KEY = "bench:bare:count"


def bare_flow() -> Any:
    """Consume ``events`` and count, nothing else (run by ``python -m bytewax.run``)."""
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow

    from streams.flow_parts import kafka_source

    settings = Settings()
    client = connect(settings)
    key = settings.redis_prefix + BARE_COUNT_KEY

    def count(batch: list[Any]) -> list[Any]:
        client.incrby(key, len(batch))
        return []

    flow = Dataflow("bench_bare")
    messages = op.input("events", flow, kafka_source(settings, settings.topics.events))
    op.flat_map_batch("count", messages, count)
    # A flow needs an output; nothing reaches it.
    from bytewax.testing import TestingSink

    op.output("none", op.flat_map_batch("nothing", messages, lambda b: []), TestingSink([]))
    return flow


def produce(settings: Settings, events: list[dict[str, Any]]) -> float:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 20, "batch.size": 1_000_000,
                         "partitioner": "murmur2_random"})
    t0 = time.monotonic()
    for event in events:
        while True:
            try:
                producer.produce(settings.topics.events, orjson.dumps(event), event["user_id"].encode())
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("the broker did not acknowledge every event")
    return time.monotonic() - t0


def measure(count: Any, expected: int, procs: list[FlowProcess], timeout: float) -> tuple[float, float]:
    """(events/s between first and last reflected event, seconds) by polling ``count()``."""
    deadline = time.monotonic() + timeout
    first_t, first_n = None, 0
    while True:
        n = count()
        now = time.monotonic()
        if first_t is None and n > 0:
            first_t, first_n = now, n
        if n >= expected:
            assert first_t is not None
            span = max(now - first_t, 1e-3)
            return (expected - first_n) / span, span
        if now > deadline:
            raise TimeoutError(f"only {n} of {expected} events after {timeout:.0f} s:\n{procs[0].log_tail()}")
        for p in procs:
            p.check_alive()
        time.sleep(0.01)


LAYOUTS = {
    "1x1": "1 process, 1 worker",
    "1x2": "1 process, 2 worker threads (-w 2; they share one GIL)",
    "2x1": "2 processes of 1 worker (-i/-a on loopback)",
}


def _procs(settings: Settings, kind: str, layout: str) -> list[FlowProcess]:
    if layout == "2x1":
        addresses = f"127.0.0.1:{free_port()};127.0.0.1:{free_port()}"
        flags = [["-i", str(i), "-a", addresses] for i in range(2)]
    else:
        flags = [["-w", layout[-1]]]
    procs = []
    for i, f in enumerate(flags):
        log = settings.state_dir / f"{kind}-{layout}-{i}.log"
        if kind == "bare":
            p = FlowProcess(settings, "users", f, log=log, bytewax_run=True)
            p.argv[3] = "bench.stream_throughput:bare_flow()"
        else:
            p = FlowProcess(settings, "users", f, log=log)
        procs.append(p)
    return procs


def run_once(base: Settings, kind: str, layout: str, expected: int, timeout: float) -> dict[str, Any]:
    tag = f"{kind}{layout}"
    settings = base.model_copy(update={"redis_prefix": f"{base.redis_prefix}{tag}:", "state_dir": base.state_dir / tag})
    client = connect(settings)
    if kind == "bare":
        key = settings.redis_prefix + BARE_COUNT_KEY

        def count() -> int:
            return int(client.get(key) or 0)
    else:

        def count() -> int:
            return applied_count(settings, "users", client)

    procs = _procs(settings, kind, layout)
    for p in procs:
        p.start()
    try:
        rate, span = measure(count, expected, procs, timeout)
    finally:
        for p in procs:
            p.kill()
    return {"flow": kind, "layout": layout, "events": expected, "seconds": span, "events_per_s": rate, "ratio_to_bare": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument(
        "--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS),
        help="; ".join(f"{k}: {v}" for k, v in LAYOUTS.items()),
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--timeout", type=float, default=300.0, help="give up on one drain after this long")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    events = load_events(args.data, args.events)
    rows: list[dict[str, Any]] = []
    with private_stack() as settings:
        seconds = produce(settings, events)
        print(f"loaded {len(events):,} events of {args.data.name} into {settings.topics.events} in {seconds:.1f} s")
        for layout in args.layouts:
            bare = run_once(settings, "bare", layout, len(events), args.timeout)
            users = run_once(settings, "users", layout, len(events), args.timeout)
            users["ratio_to_bare"] = users["events_per_s"] / bare["events_per_s"]
            rows += [bare, users]
            print_rows("stream throughput (drain of the topic; start-up excluded)", rows[-2:])
    print_rows("stream throughput, all runs", rows)
    write_json(args.json, {"benchmark": "stream_throughput", "data": str(args.data), "runs": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
