"""Milliseconds from an event's send to its visibility in the user's Redis state.

    python -m bench.freshness --rate 1000 5000 --seconds 10 [--fetch-wait-ms 50 250] [--json PATH]

A private broker and Redis, the user-state flow running (recovery on, as deployed), and
real events of ../shared/data/online_retail_ii re-sent at ``--rate`` with fresh ids and
their send time stamped (``sent_at``). Visibility is read off the partition's applied
offset, which the flow sets in the same atomic Lua call that writes the states (so an
event is in its user's state exactly when its offset is covered); a probe polls it every
millisecond. A sample of events is also checked in the user's own state. ``lost`` counts
events never visible (must be 0). The floor: a plain consumer in this process reads the
same events, and its produce-to-consume times are the bare broker hop of the same run.

The generator runs in its own process (:func:`_generator`), apart from the probe's polling
thread: sharing one GIL, the two slowed each other, and a run asked for 5,000 events/s
achieved 2,759 (2026-12-02). It is open-loop: every millisecond it sends all events due by
then (librdkafka batches them, ``linger.ms`` 1), however late the previous ones were
delivered, and it reports the rate it really achieved beside the asked one.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import multiprocessing as mp
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from freshrec.settings import Settings
from stores import user_store
from streams.flow_process import FlowProcess
from stores.redis_client import connect

from ._common import DEFAULT_DATA, load_events, private_stack
from .report import print_rows, write_json


class _Probe(threading.Thread):
    """Polls the applied offsets; keeps, per partition, when each new offset appeared."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.timeline: dict[int, tuple[list[float], list[int]]] = {}
        self.stop_flag = threading.Event()

    def run(self) -> None:
        client = connect(self.settings)
        while not self.stop_flag.is_set():
            offsets = user_store.read_applied_offsets(client, self.settings)
            now = time.time()
            for field, off in offsets.items():
                part = int(field.rsplit(":", 1)[1])
                times, offs = self.timeline.setdefault(part, ([], []))
                if not offs or off > offs[-1]:
                    times.append(now)
                    offs.append(off)
            time.sleep(0.001)

    def visible_at(self, partition: int, offset: int) -> float | None:
        times, offs = self.timeline.get(partition, ([], []))
        i = bisect.bisect_left(offs, offset)
        return times[i] if i < len(offs) else None


def _floor_consumer(bootstrap: str, topic: str, fetch_wait_ms: int, ready: Any, stop: Any, out: Any) -> None:
    """A bare consumer in its own process (not sharing the producer's GIL): when each
    (partition, offset) reached a client; sent back through ``out`` at the end."""
    from freshrec.children import die_with_parent

    die_with_parent(signal.SIGKILL)  # ``daemon=True`` covers a normal exit, not a killed benchmark
    from confluent_kafka.admin import AdminClient

    meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10).topics[topic]
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": "bench-floor",
        "enable.auto.commit": False, "fetch.wait.max.ms": fetch_wait_ms,
    })
    # From the end, so only the measured events count (assign, no group join).
    consumer.assign([TopicPartition(topic, p, -1) for p in meta.partitions])
    received: dict[tuple[int, int], float] = {}
    ready.set()
    while not stop.is_set():
        # poll, not consume(n, timeout): consume waits for n messages or the timeout,
        # which would add its own batching delay to the floor.
        msg = consumer.poll(0.05)
        if msg is not None and msg.error() is None:
            received[(msg.partition(), msg.offset())] = time.time()
    consumer.close()
    out.send(received)


def _generator(
    bootstrap: str, topic: str, events: list[dict[str, Any]], rate: float, run_id: str, go: Any, out: Any
) -> None:
    """Send ``events`` at ``rate`` per second, open loop, and send back what was sent when
    and where each landed: ``(sent, delivered, failures, seconds)``."""
    from freshrec.children import die_with_parent

    die_with_parent(signal.SIGKILL)
    sent: dict[str, tuple[str, float]] = {}  # event_id -> (user, sent_at)
    delivered: dict[str, tuple[int, int]] = {}  # event_id -> (partition, offset)
    failures: list[str] = []

    def on_delivery(event_id: str, err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(str(err))
        else:
            delivered[event_id] = (msg.partition(), msg.offset())

    # murmur2: the keying rule readers look shoppers up by (stores.user_store.user_partition);
    # librdkafka's own default (crc32) would put their states where readers do not look.
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "acks": "all", "partitioner": "murmur2_random"})
    n = len(events)
    go.wait(60)
    t0 = time.monotonic()
    i = 0
    while i < n:
        due = min(n, int((time.monotonic() - t0) * rate) + 1)
        if i >= due:
            time.sleep(0.0005)
            continue
        while i < due:  # everything due by now, behind or not: open loop
            e = dict(events[i])
            e["event_id"] = eid = f"fresh-{run_id}:{i}"
            e["sent_at"] = now = time.time()
            sent[eid] = (e["user_id"], now)
            producer.produce(topic, orjson.dumps(e), e["user_id"].encode(),
                             on_delivery=functools.partial(on_delivery, eid))
            i += 1
        producer.poll(0)
    seconds = time.monotonic() - t0
    producer.flush(30)
    out.send((sent, delivered, failures, seconds))


def run(settings: Settings, events: list[dict[str, Any]], rate: float, seconds: float) -> dict[str, Any]:
    n = min(len(events), int(rate * seconds))
    run_id = uuid.uuid4().hex[:6]

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    receive_end, send_end = ctx.Pipe(duplex=False)
    floor = ctx.Process(
        target=_floor_consumer,
        args=(settings.kafka_bootstrap, settings.topics.events, settings.stream_fetch_wait_ms, ready, stop, send_end),
        daemon=True,
    )
    floor.start()
    probe = _Probe(settings)
    probe.start()
    go, (gen_receive, gen_send) = ctx.Event(), ctx.Pipe(duplex=False)
    generator = ctx.Process(
        target=_generator, args=(settings.kafka_bootstrap, settings.topics.events, events[:n], rate, run_id, go, gen_send),
        daemon=True,
    )
    generator.start()
    ready.wait(30)
    time.sleep(0.5)  # the floor consumer's fetches settle
    go.set()
    sent, delivered, failures, send_s = gen_receive.recv()
    generator.join(10)
    actual_rate = n / send_s
    # Give stragglers time to show up, then stop measuring.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done = sum(1 for p, o in delivered.values() if probe.visible_at(p, o) is not None)
        if done == n:
            break
        time.sleep(0.1)
    probe.stop_flag.set()
    stop.set()
    probe.join(5)
    received: dict[tuple[int, int], float] = receive_end.recv() if receive_end.poll(30) else {}
    floor.join(5)

    lat, hop = [], []
    lost = 0
    for eid, (user, sent_at) in sent.items():
        where = delivered.get(eid)
        seen = probe.visible_at(*where) if where else None
        if seen is None:
            lost += 1
            continue
        lat.append((seen - sent_at) * 1000)
        got = received.get(where)
        if got is not None:
            hop.append((got - sent_at) * 1000)
    # Cross-check a sample in the users' own states: the offset guard must not lie.
    client = connect(settings)
    sample = list(sent.items())[:: max(1, n // 200)]
    states = user_store.read_user_states(client, settings, {u for _, (u, _) in sample})
    # recent_ids is a window: only the newest ids of a busy user are there, so count only
    # users with at most stream_dedupe_ids events in this run.
    per_user: dict[str, int] = {}
    for _, (u, _) in sent.items():
        per_user[u] = per_user.get(u, 0) + 1
    checkable = [eid for eid, (u, _) in sample if per_user[u] <= settings.stream_dedupe_ids]
    missing = sum(
        1 for eid in checkable
        if (st := states.get(sent[eid][0])) is None or eid not in st.recent_ids
    )

    def pct(xs: list[float], q: float) -> float | None:
        return float(np.percentile(xs, q)) if xs else None

    return {
        "rate": rate, "achieved_rate": actual_rate, "events": n, "lost": lost,
        "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": max(lat) if lat else None,
        "floor_p50_ms": pct(hop, 50), "floor_p99_ms": pct(hop, 99), "floor_max_ms": max(hop) if hop else None,
        "state_checked": len(checkable), "state_missing": missing, "send_failures": len(failures),
    }


def _start_flow(settings: Settings, tag: str) -> FlowProcess:
    """The users flow, ready once a warm-up event of its own (user ``warmup-<tag>``) is in Redis."""
    flow = FlowProcess(settings, "users").start()
    user = f"warmup-{tag}"
    warm = Producer({"bootstrap.servers": settings.kafka_bootstrap, "partitioner": "murmur2_random"})
    warm.produce(settings.topics.events, orjson.dumps(
        {"event_id": user, "user_id": user, "item_id": "x", "kind": "view", "ts": 1.0}), user.encode())
    warm.flush(10)
    client = connect(settings)
    deadline = time.monotonic() + 60
    while user_store.read_user_state(client, settings, user) is None:
        flow.check_alive()
        if time.monotonic() > deadline:
            flow.stop()
            raise TimeoutError(flow.log_tail())
        time.sleep(0.05)
    return flow


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.freshness", description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, nargs="+", default=[1000.0], help="events/s (several: one run each)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--fetch-wait-ms", type=int, nargs="+",
        help="the flows' (and the floor consumer's) longest held fetch; several: every rate at each "
        "(default: settings.stream_fetch_wait_ms)",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    events = load_events(args.data, int(max(args.rate) * args.seconds))
    rows = []
    # A fresh broker per fetch wait: Tansu (memory storage) answered later runs of one stack
    # slower as its topics grew, which would have been charged to the later setting.
    for wait in args.fetch_wait_ms or [Settings().stream_fetch_wait_ms]:
        with private_stack() as base:
            settings = base.model_copy(update={"stream_fetch_wait_ms": wait})
            flow = _start_flow(settings, str(wait))
            try:
                for rate in args.rate:
                    rows.append({"fetch_wait_ms": wait} | run(settings, events, rate, args.seconds))
                    print_rows("freshness: send -> visible in Redis user state (ms), floor = bare broker hop", rows[-1:])
            finally:
                flow.stop()
    print_rows("freshness, all runs", rows)
    write_json(args.json, {"benchmark": "freshness", "data": str(args.data), "runs": rows})
    return 0 if all(r["lost"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
