"""Serving throughput and latency over loopback, against the in-process floor.

    python -m bench.serving --json bench/out/serving.json [--duration 10] [--concurrency 4]

Starts its own broker and Redis on free ports, writes the online_retail_ii catalog,
every user's state and fresh popularity into Redis (with the streams package's own
functions and format), starts ``freshrec serve`` as a separate process, and drives it
from a third process (bench._load: raw HTTP/1.1 keep-alive, closed loop, fixed
concurrency, fixed duration): first /recommend, then /search.

Measured in the same run, in this process while the server idles:

- ``faiss_search_us``: one exact search (k=10) over the catalog's index: the floor of
  /similar and part of every /recommend and /search;
- ``encode_int8_us``: one query through the int8 ONNX encoder (the floor of /search);
- ``encode_torch_fp32_us`` and ``int8_speedup``: the same query through PyTorch fp32,
  both on one thread (as serving runs them).

Targets on 2 cores: /recommend p99 < 10 ms at >= 500 requests/s; /search p99 < 20 ms at
>= 200 requests/s.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench._load import DEFAULT_DATA, bench_settings, drive, load_dataset, recommend_requests, search_requests, start_server, summarise, wait_ready
from bench.report import print_table, write_json


def floors(settings: Any, items: dict[str, Any], queries: list[str], n: int = 300) -> dict[str, float]:
    """Median in-process cost of one FAISS search and one query encoding (int8, torch fp32)."""
    import numpy as np
    import torch

    from models.build import build_index
    from models.encoder import TorchEncoder
    from models.onnx_encoder import encoder_for

    import faiss

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(settings.serving_faiss_threads)  # as serving runs it
    enc = encoder_for(settings, "base", None, precision="int8", threads=1)
    index = build_index(enc, items, "base", None)
    rng = random.Random(3)
    qs = [rng.choice(queries) for _ in range(n)]
    qvecs = enc.encode(qs[:50])

    def med(fn: Any, args: list[Any]) -> float:
        times = []
        for a in args:
            t0 = time.perf_counter()
            fn(a)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6

    for q in qs[:20]:
        enc.encode([q])
    int8_us = med(lambda q: enc.encode([q]), qs)
    faiss_us = med(lambda v: index.search(v, 10), [qvecs[i % len(qvecs)] for i in range(n * 3)])
    torch_enc = TorchEncoder(device="cpu")
    for q in qs[:10]:
        torch_enc.encode([q])
    torch_us = med(lambda q: torch_enc.encode([q]), qs[: n // 2])
    del np
    return {
        "faiss_search_us": faiss_us,
        "encode_int8_us": int8_us,
        "encode_torch_fp32_us": torch_us,
        "int8_speedup": torch_us / int8_us,
        "index_items": float(len(index)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: ../shared/data/online_retail_ii)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per endpoint")
    p.add_argument("--concurrency", type=int, default=4, help="open connections of the load generator")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    if not args.data.is_dir():
        print(
            f"bench.serving: dataset folder {args.data} not found; it needs the online_retail_ii data "
            "(events.csv.gz, items.csv) in ../shared/data/online_retail_ii, or pass --data",
            file=sys.stderr,
        )
        return 2

    from bench._common import start_guarded_stack
    from freshrec.children import stop
    from freshrec.infra import stop_stack
    from stores.user_store import connect

    settings = bench_settings("serving")
    state, port = settings.state_dir, settings.api_port
    guard = start_guarded_stack(settings)
    server = None
    try:
        t0 = time.perf_counter()
        data = load_dataset(settings, args.data, connect(settings))
        print(f"loaded {len(data.items):,} items, {len(data.users):,} users, {data.events:,} events in {time.perf_counter() - t0:.1f} s")
        from models.onnx_encoder import encoder_for

        t0 = time.perf_counter()
        encoder_for(settings, "base", None)  # export once, here, so serving starts from the cache
        print(f"int8 encoder exported in {time.perf_counter() - t0:.1f} s")
        server = start_server(settings, state / "serving.log")
        t0 = time.perf_counter()
        ready = wait_ready(port, 600, server)
        print(f"serving ready in {time.perf_counter() - t0:.1f} s: {ready}")

        drive(port, recommend_requests(data.users, n=500, seed=9), args.concurrency, 2.0)  # warm-up
        drive(port, search_requests(data.queries, data.users, n=200, seed=9), args.concurrency, 2.0)
        rec = summarise(drive(port, recommend_requests(data.users), args.concurrency, args.duration))
        sea = summarise(drive(port, search_requests(data.queries, data.users), args.concurrency, args.duration))
        server.terminate()
        server.wait(20)
        server = None
        floor = floors(settings, data.items, data.queries)
    finally:
        if server is not None:
            stop(server, 20)  # SIGTERM first: the server stops its export worker itself
        stop_stack(state)
        guard.close()

    figures = {
        "recommend_rps": rec["rps"],
        "recommend_p50_ms": rec["p50_ms"],
        "recommend_p99_ms": rec["p99_ms"],
        "search_rps": sea["rps"],
        "search_p50_ms": sea["p50_ms"],
        "search_p99_ms": sea["p99_ms"],
        "errors": rec["errors"] + sea["errors"],
        "requests": rec["requests"] + sea["requests"],
        **floor,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "items": len(data.items),
        "users": len(data.users),
        "targets": {"recommend": "p99 < 10 ms at >= 500 rps", "search": "p99 < 20 ms at >= 200 rps"},
        "recommend_target_met": rec["p99_ms"] < 10 and rec["rps"] >= 500,
        "search_target_met": sea["p99_ms"] < 20 and sea["rps"] >= 200,
    }
    print_table(
        f"serving over loopback ({args.concurrency} connections, {args.duration:.0f} s per endpoint)",
        [(k, v) for k, v in figures.items() if not isinstance(v, dict)],
    )
    write_json(args.json, figures)
    return 0 if figures["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
