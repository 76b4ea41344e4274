"""Replay throughput: freshrec's validating producer and follower against bare kafka-python.

    python -m bench.replay --events 100000 --json bench/out/replay.json

Starts its own embedded broker on free loopback ports, reads the first N events of the
real data (../shared/data/online_retail_ii), and measures, each repeated and reported as
the median:

- freshrec: ``RecordProducer.send_event`` (validate, key by user, batch, confirm) then
  ``TopicFollower`` reading them all back; ``lost`` counts sent event ids never read back.
- bare: a kafka-python producer sending the same pre-serialised bytes with the same
  batching settings, and a bare assigned consumer counting them back.

The ratio freshrec/bare is the figure that survives a noisy machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from bench._common import DEFAULT_DATA, load_events, private_stack
from bench.report import median, print_table, write_json
from freshrec.consumer import TopicFollower
from freshrec.contracts import parse_event
from freshrec.infra import create_topics
from freshrec.producer import RecordProducer
from freshrec.settings import Settings


def _freshrec_round(settings: Settings, rows: list[dict]) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    with RecordProducer(settings, client_id="bench-freshrec") as producer:
        for row in rows:
            producer.send_event(row)
        report = producer.flush()
    produce_s = time.perf_counter() - t0
    assert report.failed == 0 and report.confirmed == len(rows), report

    seen: set[str] = set()
    t0 = time.perf_counter()
    with TopicFollower(settings, settings.topics.events) as follower:
        deadline = time.monotonic() + 120
        while len(seen) < len(rows) and time.monotonic() < deadline:
            for m in follower.poll(0.2):
                seen.add(orjson.loads(m.value)["event_id"])
    consume_s = time.perf_counter() - t0
    lost = len({r["event_id"] for r in rows} - seen)
    return len(rows) / produce_s, len(rows) / consume_s, lost


def _bare_round(bootstrap: str, topic: str, payloads: list[tuple[bytes, bytes]], partitions: int) -> tuple[float, float, int]:
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, batch_size=256 * 1024,
        max_in_flight_requests_per_connection=1,
    )
    t0 = time.perf_counter()
    futures = [producer.send(topic, key=k, value=v) for k, v in payloads]
    producer.flush()
    produce_s = time.perf_counter() - t0
    failed = sum(1 for f in futures if f.failed())
    producer.close()

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=2000, fetch_max_wait_ms=50)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    n = 0
    t0 = time.perf_counter()
    deadline = time.monotonic() + 120
    while n < len(payloads) and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            n += len(records)
    consume_s = time.perf_counter() - t0
    consumer.close()
    return len(payloads) / produce_s, len(payloads) / consume_s, len(payloads) - n + failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    rows = load_events(args.dataset, args.events)

    # The bare loop sends exactly the bytes freshrec would, so only the framework cost differs.
    now = time.time()
    payloads = []
    for row in rows:
        event = parse_event(row, now=now)
        payloads.append((event.user_id.encode(), event.to_bytes()))

    results: dict[str, list[tuple[float, float, int]]] = {"freshrec": [], "bare": []}
    with private_stack() as base:
        for i in range(args.repeats):
            settings = base.model_copy(update={"topic_prefix": f"bench{i}."})
            create_topics(base.kafka_bootstrap, settings.topics.all(), settings.partitions)
            results["freshrec"].append(_freshrec_round(settings, rows))
            bare_topic = f"bare{i}"
            create_topics(base.kafka_bootstrap, [bare_topic], settings.partitions)
            results["bare"].append(_bare_round(base.kafka_bootstrap, bare_topic, payloads, settings.partitions))

    def med(kind: str, idx: int) -> float:
        return median([r[idx] for r in results[kind]])

    figures = {
        "events": len(rows),
        "repeats": args.repeats,
        "produce_events_per_s": med("freshrec", 0),
        "consume_events_per_s": med("freshrec", 1),
        "lost": max(r[2] for r in results["freshrec"]),
        "bare_produce_events_per_s": med("bare", 0),
        "bare_consume_events_per_s": med("bare", 1),
        "bare_lost": max(r[2] for r in results["bare"]),
    }
    figures["produce_ratio_vs_bare"] = figures["produce_events_per_s"] / figures["bare_produce_events_per_s"]
    figures["consume_ratio_vs_bare"] = figures["consume_events_per_s"] / figures["bare_consume_events_per_s"]
    print_table(f"replay of {len(rows):,} events, median of {args.repeats}", list(figures.items()))
    write_json(args.json_path, figures)
    return 0 if figures["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
