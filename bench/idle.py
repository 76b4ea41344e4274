"""What the whole stack costs when nobody shops (issue 15 item 6: idle under 5 % of one core).

``python -m bench.idle --seconds 60 --events 2000 --json docs/bench/idle.json``

Starts every process as production runs it (Tansu and redis-server; ``stream users``,
``stream collab``, ``stream catalog``, ``index``, ``learn``, ``serve``, ``collect``,
``monitor``), each in its own session on free loopback ports, sends the sample's catalog
and its first ``--events`` events, waits until the flows have applied them and serving is
ready, lets the system settle, then reads every process group's CPU time from /proc over
``--seconds`` with no traffic at all. The broker and Redis idle in the same run are the
floor: what the infrastructure costs by itself, which freshrec's polling adds to. The same
stack with the short fetch waits used before 2026-12-04 is measured in the same run, as
the peer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench._faults_procs import Child, broker_child, freshrec_child, group_members, redis_child
from bench.faults import SAMPLE, load_sample
from bench.report import write_json
from freshrec.infra import create_topics, free_port
from freshrec.producer import RecordProducer
from freshrec.settings import Settings
from streams.flow_process import wait_applied

TICKS = os.sysconf("SC_CLK_TCK")
INFRA = ("broker", "redis")
BUSY = 0.5  # a process using half a core or more over a window is working, not idling


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every live process in the group (children still running included)."""
    total = 0
    for pid in group_members(pgid):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / TICKS


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _settle(children: dict[str, Child], min_s: float, max_s: float, window_s: float = 10.0) -> float:
    """Wait until the work the load left behind is done, so that what is measured is idling.

    The learner trains the pairs of the events sent for minutes, and a publication makes
    serving and the indexer rebuild: transient work, not the cost of idling. Settled =
    two consecutive ``window_s`` windows in which no freshrec process used more than
    half of ``BUSY`` (steady polling stays far below it); at least ``min_s``, at most ``max_s``.
    """
    t0 = time.monotonic()
    time.sleep(min_s)
    quiet = 0
    while time.monotonic() - t0 < max_s and quiet < 2:
        before = {n: group_cpu_s(c.proc.pid) for n, c in children.items() if n not in INFRA}  # type: ignore[union-attr]
        time.sleep(window_s)
        busiest = max((group_cpu_s(children[n].proc.pid) - b) / window_s for n, b in before.items())  # type: ignore[union-attr]
        quiet = quiet + 1 if busiest < BUSY / 2 else 0
    return time.monotonic() - t0


# The fetch waits before 2026-12-04: the peer this run measures beside the defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "short-fetch-waits": {"stream_fetch_wait_ms": 5, "follower_fetch_wait_ms": 50},
}


def run(args: argparse.Namespace, root: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    settings = Settings(**overrides,
        kafka_bootstrap=f"127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0",
        state_dir=root / "state", api_port=free_port(), collector_port=free_port(), monitor_port=free_port(),
        collector_token="idle-bench", topic_prefix="idle.", redis_prefix="idle:", partitions=4, device="cpu",
    )
    logs = root / "logs"
    events, items = load_sample(args.data, args.events)
    children: dict[str, Child] = {}
    try:
        children["broker"] = broker_child(settings, "memory://tansu/", logs / "broker.log").start()
        children["redis"] = redis_child(settings, root / "redis", logs / "redis.log").start()
        create_topics(settings.kafka_bootstrap, settings.topics.all(), settings.partitions)
        for flow in ("users", "collab", "catalog"):
            children[flow] = freshrec_child(flow, settings, ["stream", flow], logs / f"{flow}.log").start()
        children["indexer"] = freshrec_child("indexer", settings, ["index"], logs / "indexer.log").start()
        children["learner"] = freshrec_child("learner", settings, ["learn", "--device", "cpu"],
                                             logs / "learner.log").start()
        with RecordProducer(settings, client_id="idle-bench") as producer:
            for row in items:
                producer.send_catalog(row)
            for event in events:
                producer.send_event(event)
            producer.flush()
        api = f"http://127.0.0.1:{settings.api_port}"
        children["serving"] = freshrec_child("serving", settings, ["serve"], logs / "serving.log",
                                             ready=lambda: _ready(f"{api}/readyz"), ready_timeout_s=300).start()
        children["collector"] = freshrec_child(
            "collector", settings, ["collect"], logs / "collector.log",
            ready=lambda: _ready(f"http://127.0.0.1:{settings.collector_port}/healthz")).start()
        children["monitor"] = freshrec_child(
            "monitor", settings, ["monitor"], logs / "monitor.log",
            ready=lambda: _ready(f"http://127.0.0.1:{settings.monitor_port}/metrics")).start()
        for flow, n in (("catalog", len(items)), ("users", len(events)), ("collab", len(events))):
            wait_applied(settings, flow, n, timeout=600)
        print(f"  loaded: {len(items):,} items, {len(events):,} events applied", flush=True)
        settled = _settle(children, args.settle, args.max_settle)
        print(f"  settled after {settled:.0f} s (no pending training, swap or catch-up)", flush=True)
        for name, child in children.items():
            if not child.alive():
                raise RuntimeError(f"{name} exited before the measurement; its log ends:\n{child.log_tail()}")
        before = {name: group_cpu_s(child.proc.pid) for name, child in children.items()}  # type: ignore[union-attr]
        t0 = time.monotonic()
        time.sleep(args.seconds)
        wall = time.monotonic() - t0
        after = {name: group_cpu_s(child.proc.pid) for name, child in children.items()}  # type: ignore[union-attr]
        pct = {name: round(100 * (after[name] - before[name]) / wall, 2) for name in children}
    finally:
        for child in reversed(list(children.values())):
            child.cleanup()
    freshrec_total = round(sum(v for k, v in pct.items() if k not in INFRA), 2)
    infra_total = round(sum(v for k, v in pct.items() if k in INFRA), 2)
    return {
        "settings": overrides, "seconds": round(wall, 1), "settled_after_s": round(settled, 1), "events": len(events), "items": len(items),
        "percent_of_one_core": pct, "freshrec_total": freshrec_total, "infra_floor_total": infra_total,
        "total": round(freshrec_total + infra_total, 2), "target_total": "< 5",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="how long to measure the idle stack")
    p.add_argument("--settle", type=float, default=20.0, help="seconds after the load before looking for quiet")
    p.add_argument("--max-settle", type=float, default=600.0, help="measure anyway after this many seconds")
    p.add_argument("--events", type=int, default=5000, help="events sent before going idle")
    p.add_argument("--data", type=Path, default=SAMPLE, help="dataset folder (events.csv[.gz], items.csv)")
    p.add_argument("--variants", default="defaults,short-fetch-waits", help=f"stacks to measure, one after the other: {', '.join(VARIANTS)}")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    runs: dict[str, Any] = {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in VARIANTS:
            raise SystemExit(f"--variants: unknown {name!r}; choose from {', '.join(VARIANTS)}")
        print(f"{name}: {VARIANTS[name] or 'the settings as shipped'}", flush=True)
        root = Path(tempfile.mkdtemp(prefix="freshrec-idle-"))
        try:
            runs[name] = run(args, root, VARIANTS[name])
        finally:
            shutil.rmtree(root, ignore_errors=True)
    names = list(runs)
    print(f"\nidle for {args.seconds:.0f} s after {args.events:,} events: CPU in % of one core")
    print(f"  {'process':<10}" + "".join(f"{n:>20}" for n in names))
    for proc in sorted(runs[names[0]]["percent_of_one_core"], key=lambda p: -runs[names[0]]["percent_of_one_core"][p]):
        note = "   (infrastructure)" if proc in INFRA else ""
        print(f"  {proc:<10}" + "".join(f"{runs[n]['percent_of_one_core'][proc]:>20.2f}" for n in names) + note)
    print(f"  {'all':<10}" + "".join(f"{runs[n]['total']:>20.2f}" for n in names) + "   (target < 5)")
    write_json(str(args.json) if args.json else None,
               {"benchmark": "idle", "events": args.events, "seconds": args.seconds, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
