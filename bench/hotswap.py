"""Hot-swap under load: the learner publishes, serving swaps, requests keep flowing.

    python -m bench.hotswap --json bench/out/hotswap.json [--swaps 5] [--steps 4] [--concurrency 4] [--workers 2]

Starts its own broker and Redis, loads the online_retail_ii catalog, users and
popularity into Redis (bench._load), starts ``freshrec serve`` (auto-activation on) as a
separate process and drives /recommend and /search from a third process for the whole
run. Phases:

1. **steady** (``--steady`` s): load only, no training, no swaps: the baseline p99.
2. **learn and swap**: this process trains a LoRA adapter (``learner.trainer.LoraTrainer``)
   on train pairs it reads back from the ``train-pairs`` topic (built from the events
   with the streams package's ``pair_for``), ``--steps`` micro-batches per version, then
   publishes it to the registry and announces it on ``adapters``, as the learner does;
   serving builds the new pair in the background and swaps. Repeated ``--swaps`` times;
   the next version is published once the previous one answers.

Figures: ``pairs_per_s`` (training, wall time of the train steps), ``publish_to_live_s``
(p50, max: announcement to the first response made by the new pair, as seen by the load
generator), ``requests``, ``errors``, ``mixed_version_responses`` (sampled /search
answers whose scores do not match the version they report, recomputed with that
version's encoder and an index built by it), ``p99_swap_ms`` / ``p99_steady_ms`` and
their ratio, the build stages of the swaps (from /admin/status), and the device.

``--workers 2`` serves with two worker processes (the default of ``freshrec serve``; /admin
off, so no stage timings): a version is live once *every* worker answers with it
(``all_workers_live_*``, from /readyz, which names the worker). The workers share one
export and one catalog encoding per version (``models.export``, ``models.encodings``):
the first builds them, the other waits for its lock and reads them.

Targets on 2 CPU cores: live within 10 s of publication for the ~4,600-item catalog,
zero failed requests, p99 during swaps at most twice the steady p99.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench._load import (
    bench_settings,
    DEFAULT_DATA,
    LoadProcess,
    drive,
    http_json,
    load_dataset,
    recommend_requests,
    search_requests,
    start_server,
    summarise,
    wait_ready,
)
from bench.report import median, percentile, print_table, write_json

TOKEN = "bench-hotswap-token"
TOL = 2e-3


def train_pairs(settings: Any, events: list[Any], items: dict[str, Any], limit: int) -> list[Any]:
    """The most recent ``limit`` train pairs of the events, as the users flow would emit them."""
    from ranking.pairs import PairRules, pair_for
    from ranking.user_state import StateRules, UserState, apply_event

    rules, prules = StateRules.from_settings(settings), PairRules.from_settings(settings)
    titles = {i: it.title for i, it in items.items()}
    texts = {i: it.text() for i, it in items.items()}
    states: dict[str, UserState] = {}
    drafts = []
    for event in events:
        state = states.get(event.user_id) or states.setdefault(event.user_id, UserState(event.user_id))
        if apply_event(state, event, rules):
            d = pair_for(state, event, prules)
            if d is not None and d.target_item in texts:
                drafts.append(d)
    return [d.complete(titles, texts) for d in drafts[-limit:]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hotswap", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--swaps", type=int, default=5, help="adapter versions to publish and swap to")
    p.add_argument("--steps", type=int, default=4, help="micro-batches trained per version")
    p.add_argument("--steady", type=float, default=10.0, help="seconds of load before any training (the baseline)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument(
        "--workers", type=int, default=1,
        help="serving worker processes; above 1 /admin is off (so no stage timings) and a version is live "
        "once every worker answers with it: each worker builds its pair, the export and the catalog "
        "encodings once between them (models.export, models.encodings)",
    )
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not args.data.is_dir():
        print(f"bench.hotswap: dataset folder {args.data} not found (needs online_retail_ii), or pass --data", file=sys.stderr)
        return 2

    import torch

    from freshrec.contracts import AdapterAnnouncement
    from bench._common import start_guarded_stack
    from freshrec.children import stop
    from freshrec.infra import stop_stack
    from freshrec.producer import RecordProducer
    from stores.user_store import connect

    torch.set_num_threads(2)
    # result cache off: the swap must show in the cost of answers computed during it
    if args.workers > 1:  # /admin would pin serving to one worker (serving.cli.worker_count)
        settings = bench_settings("hotswap", auto_activate=True, serve_version="base", result_cache_size=0,
                                  serving_workers=args.workers)
    else:
        settings = bench_settings("hotswap", admin_token=TOKEN, auto_activate=True, serve_version="base",
                                  result_cache_size=0)
    state, port = settings.state_dir, settings.api_port
    device = settings.resolved_device()
    guard = start_guarded_stack(settings)
    server = None
    try:
        t0 = time.perf_counter()
        data = load_dataset(settings, args.data, connect(settings), keep_events=True)
        pairs = train_pairs(settings, data.event_list, data.items, args.swaps * args.steps * settings.learner_batch_size)
        print(f"loaded {len(data.items):,} items, {len(data.users):,} users, {len(pairs):,} train pairs in {time.perf_counter() - t0:.1f} s")
        with RecordProducer(settings) as producer:  # the learner reads them back from the topic
            for pair in pairs:
                producer.send(settings.topics.train_pairs, pair.user_id, pair.to_bytes())
            producer.flush()
        from models.onnx_encoder import encoder_for

        encoder_for(settings, "base", None)
        server = start_server(settings, state / "serving.log")
        wait_ready(port, 600, server)

        reqs = []
        rec = recommend_requests(data.users, n=3000, seed=11)
        sea = search_requests(data.queries, [], n=3000, seed=12)  # no user: answers recomputable from the version alone
        for a, b in zip(rec, sea):
            reqs.extend((a, b))
        drive(port, reqs[:400], args.concurrency, 2.0)  # warm-up

        load = LoadProcess(port, reqs, args.concurrency, 3600.0, keep_every=7).start()
        t_load_wall = time.time()  # replaced by the generator's own clock below
        time.sleep(args.steady)

        from freshrec.consumer import TopicFollower
        from models.registry import AdapterRegistry
        from learner.trainer import LoraTrainer

        trainer = LoraTrainer(settings, device)
        registry = AdapterRegistry(settings.state_dir / "adapters")
        follower = TopicFollower(settings, settings.topics.train_pairs, start="beginning")
        from freshrec.contracts import TrainPair

        buffer: list[Any] = []
        train_s = 0.0
        trained = 0
        published: list[tuple[str, float]] = []
        live_seen: dict[str, float] = {}  # the version answered by every worker
        first_worker: dict[str, float] = {}  # ... by the first worker
        stages: list[dict[str, float]] = []
        parent = None
        for _ in range(args.swaps):
            for _step in range(args.steps):
                while len(buffer) < settings.learner_batch_size:
                    buffer.extend(TrainPair.model_validate_json(m.value) for m in follower.poll(0.5))
                batch, buffer = buffer[: settings.learner_batch_size], buffer[settings.learner_batch_size :]
                ts = time.perf_counter()
                trainer.train_step(batch)
                train_s += time.perf_counter() - ts
                trained += len(batch)
            manifest = registry.publish(trainer.peft_model, parent, {"train_pairs": float(trained)}, trained)
            parent = manifest.version
            with RecordProducer(settings) as producer:
                ann = AdapterAnnouncement(version=manifest.version, parent=manifest.parent, path=str(registry.path(manifest.version)), created=manifest.created)
                producer.send(settings.topics.adapters, manifest.version, ann.to_bytes())
                producer.flush()
            published.append((manifest.version, time.time()))
            deadline = time.time() + 120
            live_workers: set[int] = set()
            while time.time() < deadline:
                status, body = http_json("GET", f"http://127.0.0.1:{port}/readyz")  # a new connection: any worker
                if status == 200 and body.get("adapter_version") == manifest.version:
                    first_worker.setdefault(manifest.version, time.time())
                    live_workers.add(int(body.get("worker", 0)))
                    if len(live_workers) >= args.workers:
                        live_seen[manifest.version] = time.time()
                        break
                time.sleep(0.05)
            else:
                print(f"warning: {manifest.version} not live on every worker after 120 s", file=sys.stderr)
            if args.workers == 1:
                _, st = http_json("GET", f"http://127.0.0.1:{port}/admin/status", token=TOKEN)
                stages.append((st.get("last_swap") or {}).get("stages_s", {}))
            else:
                stages.append({})
            print(
                f"published {manifest.version}: live after "
                f"{live_seen.get(manifest.version, float('nan')) - published[-1][1]:.1f} s; stages {stages[-1]}"
            )
        follower.close()
        time.sleep(2.0)
        load.stop()
        out = load.result()
        t_load_wall = out["t_base_wall"][0]
        t_end_wall = time.time()
        server.terminate()
        server.wait(20)
        server = None

        # -- figures ---------------------------------------------------------------------
        t_end = t_end_wall - t_load_wall
        first_answer: dict[str, float] = {}
        for t, lat, st, ver in zip(out["t"], out["lat"], out["status"], out["version"]):
            if st == 200 and ver and ver not in first_answer:
                first_answer[ver] = t_load_wall + t + lat
        live = [first_answer[v] - at for v, at in published if v in first_answer]
        windows = [(at - t_load_wall, first_answer.get(v, at + 120) - t_load_wall) for v, at in published]
        in_swap = [l for t, l in zip(out["t"], out["lat"]) if t < t_end and any(a <= t < b for a, b in windows)]
        steady = [l for t, l in zip(out["t"], out["lat"]) if t < args.steady]
        overall = summarise(out, 0.0, t_end)

        # mixed versions: recompute sampled /search answers with the version they name
        from models.build import build_index

        by_version: dict[str, list[Any]] = {}
        for i, body in out["kept"]:
            if "personalised" in body and body.get("adapter_version"):
                by_version.setdefault(body["adapter_version"], []).append((i, body))
        queries = {i: _query_of(reqs[i]) for answers in by_version.values() for i, _ in answers}
        mixed = checked = 0
        items = dict(sorted(data.items.items()))
        for version, answers in by_version.items():
            path = None if version == "base" else registry.load(version)[1]
            enc = encoder_for(settings, version, path)
            index = build_index(enc, items, version)
            for i, body in answers[:60]:
                q = enc.encode([queries[i]])[0]
                err = max((abs(float(index.reconstruct(h["item_id"]) @ q) - h["score"]) for h in body["items"]), default=0.0)
                checked += 1
                mixed += err > TOL
            del enc, index
    finally:
        if server is not None:
            stop(server, 20)  # SIGTERM first: the server stops its export worker itself
        stop_stack(state)
        guard.close()

    figures = {
        "device": device,
        "swaps": len(live),
        "pairs_per_s": trained / train_s if train_s else float("nan"),
        "publish_to_live_p50_s": median(live),
        "publish_to_live_max_s": max(live) if live else float("nan"),
        "workers": args.workers,
        # /readyz polled after each publication: the first worker, and every worker, on the new version
        "first_worker_live_p50_s": median([first_worker[v] - at for v, at in published if v in first_worker]),
        "all_workers_live_p50_s": median([live_seen[v] - at for v, at in published if v in live_seen]),
        "all_workers_live_max_s": max([live_seen[v] - at for v, at in published if v in live_seen], default=float("nan")),
        "requests": overall["requests"],
        "errors": overall["errors"],
        "mixed_version_responses": mixed,
        "checked_responses": checked,
        "p99_steady_ms": percentile(steady, 99) * 1000,
        "p99_swap_ms": percentile(in_swap, 99) * 1000,
        "p99_ratio": percentile(in_swap, 99) / percentile(steady, 99) if steady and in_swap else float("nan"),
        "rps": overall["rps"],
        "swap_stages_median_s": {k: median([st[k] for st in stages if k in st]) for k in (stages[0] if stages and stages[0] else {})},
        "items": len(data.items),
        "concurrency": args.concurrency,
        "targets": {"publish_to_live_s": "< 10", "errors": 0, "mixed_version_responses": 0, "p99_ratio": "<= 2"},
    }
    print_table("hot-swap under load", [(k, v) for k, v in figures.items() if not isinstance(v, dict)])
    print(f"swap stages, median (s): {figures['swap_stages_median_s']}")
    write_json(args.json, figures)
    return 0 if figures["errors"] == 0 and mixed == 0 else 1


def _query_of(raw: bytes) -> str:
    import orjson

    return orjson.loads(raw.split(b"\r\n\r\n", 1)[1])["query"]


if __name__ == "__main__":
    sys.exit(main())
