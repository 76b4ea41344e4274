"""Where one /recommend and one /search spend their time, in process, under cProfile.

    python -m bench.serving_profile [--requests 2000] [--top 25]

Same data as bench.serving (its own broker and Redis, the online_retail_ii catalog,
every user's state and popularity), a :class:`serving.runtime.ServingRuntime` in this
process on the real int8 encoder, and the handlers called directly (no HTTP: the
framework's share is what bench.serving's floor measures). Prints, per endpoint, the
median wall time of a handler call, the share of named stages, and the top functions by
own time. docs/serving_profile.md holds a run's reading.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench._load import DEFAULT_DATA, bench_settings, load_dataset

# function name fragments -> stage, for the share table (own time, summed)
STAGES = {
    "redis (socket, protocol)": ("redis/", "socket", "_socket", "recv", "sendall", "hiredis"),
    "state decode": ("user_store", "msgpack", "unpack", "loads"),
    "scoring (blend)": ("ranking/scoring", "scoring.py"),
    "faiss": ("faiss", "live_index"),
    "onnx encoder": ("onnx", "tokeniz", "InferenceSession", "run"),
    "response JSON": ("orjson", "render", "_items", "_body"),
}


def _profile(calls: list[Any], top: int) -> tuple[list[float], str, dict[str, float]]:
    times = []
    prof = cProfile.Profile()
    for call in calls:
        t0 = time.perf_counter()
        prof.enable()
        call()
        prof.disable()
        times.append(time.perf_counter() - t0)
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    shares = {stage: 0.0 for stage in STAGES}
    shares["other"] = 0.0
    for (file, _line, func), v in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{file}:{func}"
        for stage, needles in STAGES.items():
            if any(n in where for n in needles):
                shares[stage] += v[2]
                break
        else:
            shares["other"] += v[2]
    return times, buf.getvalue(), {k: round(100 * v / total, 1) for k, v in shares.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serving_profile", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)

    from bench._common import start_guarded_stack
    from freshrec.infra import stop_stack
    from serving.app import create_app
    from serving.runtime import ServingRuntime
    from starlette.requests import Request
    from stores.user_store import connect

    settings = bench_settings("serving-profile", serving_threadpool=False, result_cache_size=0)  # profile the work, not the cache
    guard = start_guarded_stack(settings)
    runtime = None
    try:
        data = load_dataset(settings, args.data, connect(settings))
        runtime = ServingRuntime(settings, follow_topics=False)
        runtime.start()
        if not runtime.wait_ready(600):
            print("bench.serving_profile: the pair did not build in 600 s", file=sys.stderr)
            return 1
        app = create_app(runtime, manage_runtime=False)
        routes = {getattr(r, "path", ""): r for r in app.routes}
        recommend = routes["/recommend"].endpoint.__wrapped__  # type: ignore[attr-defined]
        search = routes["/search"].endpoint  # type: ignore[attr-defined]
        rng = random.Random(5)
        users = [rng.choice(data.users) for _ in range(args.requests)]
        for u in users[:200]:
            recommend(user_id=u, k=10)
        plain = []
        for u in users:
            t0 = time.perf_counter()
            recommend(user_id=u, k=10)
            plain.append(time.perf_counter() - t0)
        times, table, shares = _profile([lambda u=u: recommend(user_id=u, k=10) for u in users], args.top)
        print(f"\n/recommend (handler only): median {statistics.median(plain) * 1e6:.0f} us unprofiled, "
              f"{statistics.median(times) * 1e6:.0f} us under cProfile, over {len(times)} calls")
        print("own time by stage (%):", orjson.dumps(shares).decode())
        print(table)

        loop = asyncio.new_event_loop()
        bodies = [orjson.dumps({"query": rng.choice(data.queries), "k": 10, **({"user_id": rng.choice(data.users)} if i % 2 else {})})
                  for i in range(args.requests)]

        def call_search(body: bytes) -> None:
            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            scope = {"type": "http", "method": "POST", "path": "/search", "headers": [(b"content-length", str(len(body)).encode())],
                     "query_string": b""}
            loop.run_until_complete(search(Request(scope, receive)))

        enc = runtime.active.pair.encoder  # type: ignore[union-attr]
        enc_times = []
        for b in bodies[: args.requests // 2]:
            t0 = time.perf_counter()
            enc.encode([orjson.loads(b)["query"]])
            enc_times.append(time.perf_counter() - t0)
        times, table, shares = _profile([lambda b=b: call_search(b) for b in bodies], args.top)
        print(f"\n/search (handler only): median {statistics.median(times) * 1e6:.0f} us; the encoder alone (in a "
              f"worker thread, not in this profile: it shows as waiting): median {statistics.median(enc_times) * 1e6:.0f} us")
        print("own time by stage (%):", orjson.dumps(shares).decode())
        print(table)
        loop.close()
    finally:
        if runtime is not None:
            runtime.stop()
        stop_stack(settings.state_dir)
        guard.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
