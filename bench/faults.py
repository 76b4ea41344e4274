"""Fault injection: kill each kind of process mid-replay, restart it, and count what was lost or doubled.

    python -m bench.faults --json docs/bench/faults.json
        [--faults none,users,catalog,indexer,learner,serving,redis,redis_empty,broker]
        [--events 20000] [--rate 1000] [--kills 2] [--seed 7]

    # what docs/bench/faults.json holds (7 to 11 minutes on 2 busy cores):
    python -m bench.faults --events 5000 --rate 500 --json docs/bench/faults.json

For each fault, a system of its own (broker, Redis with AOF, the users and catalog
flows, the indexer, serving; the learner in its own scenario) takes a paced replay of
the sample while an open-loop client asks ``/recommend`` at a fixed rate. At seeded
random moments the fault's process is ``kill -9``-ed, left down for 0.5-2 s, and
started again exactly as before (Redis on the same port and AOF directory; the broker
on the same storage). ``redis_empty`` restarts Redis with its data directory wiped, the
case of a new or lost Redis, which the flows must refill from their own snapshots. When
everything has drained, Redis, the item vectors, the served index and the learner's
checkpoint and training log are compared with a clean reference computed from the
topics by the flows' own logic (:mod:`bench._faults_check`).

Figures per fault: events lost and doubled (in each component's own unit), serving
errors inside the outage windows (kill until recovered) and outside them, time to
recover (kill until the killed part has caught up with what existed at the kill, or
serves again), crashes of other processes (restarted as a supervisor would), and
processes a kill left orphaned. ``none`` is the floor: the same run with no kill, which
must show zeros everywhere, or the harness and not the fault is what is measured.

The broker fault needs storage that outlives the broker. Tansu takes
``--storage-engine postgres://...``; this run creates a database of its own on
127.0.0.1:5432 (``freshrec_faults_<random>``), probes whether the Tansu binary can use
it, runs the fault if it can, says why not if it cannot, and drops the database.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.report import print_rows, write_json
from freshrec.contracts import CatalogItem
from freshrec.infra import free_port
from freshrec.settings import Settings

from ._faults_procs import probe_tansu_storage, psql
from ._faults_run import Config, Scenario

ALL_FAULTS = ("none", "users", "catalog", "indexer", "learner", "serving", "redis", "redis_empty", "broker")
SAMPLE = Path(__file__).resolve().parents[1] / "freshrec" / "sample"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--faults", default=",".join(ALL_FAULTS), help=f"comma-separated, of {', '.join(ALL_FAULTS)}")
    p.add_argument("--events", type=int, default=20_000, help="events replayed per fault (the sample's first N)")
    p.add_argument("--rate", type=float, default=1000.0, help="replay pace, events/s")
    p.add_argument("--kills", type=int, default=2, help="kills per fault")
    p.add_argument("--seed", type=int, default=7, help="seeds kill times, down times and request users")
    p.add_argument("--request-rate", type=float, default=10.0, help="open-loop /recommend requests per second")
    p.add_argument("--learner-events", type=int, default=3000,
                   help="events in the learner scenario (it trains ~30 pairs/s on 2 CPU cores and must drain)")
    p.add_argument("--no-serving", action="store_true", help="flows only: no indexer, no serving, no request loop")
    p.add_argument("--data", type=Path, default=SAMPLE, help="dataset folder (events.csv[.gz], items.csv)")
    p.add_argument("--keep", action="store_true", help="keep the run's temporary folder (logs) and print it")
    return p


def run_faults(args: argparse.Namespace) -> dict[str, Any]:
    """Run every asked fault in turn; return the JSON-ready figures (also used by the tests)."""
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(ALL_FAULTS))
    if unknown:
        raise SystemExit(f"--faults: unknown {', '.join(unknown)}; choose from {', '.join(ALL_FAULTS)}")
    if args.no_serving and {"indexer", "serving"} & set(faults):
        raise SystemExit("--no-serving leaves out the indexer and serving, so it cannot inject those faults")
    events, items = load_sample(args.data, args.events)
    tmp = Path(tempfile.mkdtemp(prefix="freshrec-faults-"))
    cfg = Config(events, items, rate=args.rate, kills=args.kills, seed=args.seed, request_rate=args.request_rate,
                 serving=not args.no_serving, indexer=not args.no_serving, learner_events=args.learner_events)
    out: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "data")} | {"data": str(args.data)},
        "definitions": {
            "lost": "per component: users = applied events missing from Redis states; catalog = items missing or "
                    "different; indexer = catalog items with no vector; serving = catalog items not in the served "
                    "index; learner = consumed trainable pairs neither trained nor held; broker = confirmed sends "
                    "missing from the topic",
            "doubled": "users = events counted beyond the reference; catalog = items that should not exist; "
                       "learner = pairs trained twice",
            "outage window": "from the kill until recovered (or the end of the recovery timeout)",
            "recovery": "users/catalog: the flow's applied offsets reach what was sent before the kill; indexer: its "
                        "checkpoint covers the catalog as it was at the kill; learner: its checkpoint covers the "
                        "train pairs the broker reported at the kill; serving: /recommend answers 200; redis, "
                        "redis_empty, broker: both flows caught up (and, with serving, /recommend answers 200, "
                        "not degraded)",
            "serving errors": "non-200 answers and requests with no answer within 5 s (refused, reset, timed "
                              "out); inside a window when the request's life overlaps it; degraded answers are "
                              "200s and counted apart",
        },
        "faults": {},
    }
    started = time.monotonic()
    try:
        if cfg.indexer:
            cfg.exports = _shared_export(tmp)
            # The ONNX quantiser leaves an INFO handler on the root logger; the run's own
            # output is its progress bars and the table.
            logging.getLogger().setLevel(logging.WARNING)
        for fault in faults:
            print(f"\n== fault: {fault}", flush=True)
            if fault == "broker":
                out["faults"][fault] = _broker_fault(cfg, tmp)
                continue
            out["faults"][fault] = Scenario(fault, cfg, tmp / fault).run()
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    out["seconds"] = round(time.monotonic() - started, 1)
    out["table"] = [summarise(f, fig) for f, fig in out["faults"].items() if "skipped" not in fig]
    out["skipped"] = {f: fig["skipped"] for f, fig in out["faults"].items() if "skipped" in fig}
    return out


def _shared_export(tmp: Path) -> Path:
    """The base model's int8 ONNX export, built once and linked into every scenario's state dir."""
    from models.onnx_encoder import encoder_for

    shared = tmp / "shared"
    encoder_for(Settings(state_dir=shared), "base", None, "int8")
    return shared / "exports"


def _broker_fault(cfg: Config, tmp: Path) -> dict[str, Any]:
    """Kill the broker only where its storage survives it: Tansu on a Postgres database of this run's own."""
    db = f"freshrec_faults_{uuid.uuid4().hex[:8]}"
    made = psql(f"CREATE DATABASE {db}")
    if made.returncode != 0:
        return {"skipped": f"cannot create a Postgres database on 127.0.0.1:5432: {made.stderr.strip()}"}
    try:
        url = f"postgres://postgres@127.0.0.1:5432/{db}"
        probe = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", topic_prefix="probe.")
        why = probe_tansu_storage(url, probe, tmp / "broker-probe.log")
        if why is not None:
            return {"skipped": f"Tansu cannot keep its topics in Postgres here, so a broker restart would lose "
                               f"them (the memory engine's known behaviour, issue 13 item 1): {why}",
                    "storage": url}
        cfg_pg = Config(**{**vars(cfg), "broker_storage": url})
        return Scenario("broker", cfg_pg, tmp / "broker").run() | {"storage": "postgres (database created and dropped)"}
    finally:
        psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def summarise(fault: str, figures: dict[str, Any]) -> dict[str, Any]:
    """One table row: totals over the components checked, and where the losses are."""
    parts = ("broker", "users", "catalog", "indexer", "serving", "learner")
    lost = {p: figures[p].get("lost", figures[p].get("missing", 0)) for p in parts if p in figures}
    doubled = {p: figures[p].get("doubled", 0) for p in parts if p in figures and p != "broker"}
    rec = [k["recovery_s"] for k in figures.get("kills", [])]
    done = [r for r in rec if r is not None]
    req = figures.get("serving_requests", {})
    return {
        "fault": fault,
        "kills": len(rec),
        "lost": sum(lost.values()),
        "doubled": sum(doubled.values()),
        "err in": req.get("errors_in_window"),
        "err out": req.get("errors_outside_window"),
        "recovery med s": statistics.median(done) if done else None,
        "recovery max s": (max(done) if len(done) == len(rec) else "never") if rec else None,
        "crashes": sum(figures.get("crashes", {}).values()),
        "orphans": sum(len(k["orphans"]) for k in figures.get("kills", [])),
        "where": ", ".join(f"{p} {n}" for p, n in {**lost, **{f"{k} x2": v for k, v in doubled.items()}}.items() if n),
    }


def load_sample(data_dir: Path, n_events: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The first ``n_events`` events and every valid catalog row of a dataset folder."""
    from freshrec.dataset import locate, read_events, read_items

    files = locate(data_dir)
    events = list(itertools.islice(read_events(files.events, files.name), n_events))
    items = []
    for row in read_items(files.items) if files.items else ():
        try:
            CatalogItem.model_validate(row)
        except ValueError:
            continue
        items.append(row)
    return events, items


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    for noisy in ("httpx", "httpcore"):  # one INFO line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = run_faults(args)
    print_rows(f"fault injection ({args.events:,} events at {args.rate:,.0f} ev/s, {args.kills} kills per fault, "
               f"seed {args.seed})", out["table"])
    for fault, why in out["skipped"].items():
        print(f"{fault}: skipped: {why}")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
