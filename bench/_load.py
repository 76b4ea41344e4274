"""Shared parts of the serving benchmarks: data into Redis, a serving process, a load generator.

The load generator runs in its own process (spawned) so its CPU is not the server's,
and speaks raw HTTP/1.1 keep-alive over asyncio streams: a full HTTP client library
costs several times more CPU per request, and on two shared cores the client's cost
is taken straight out of the server's throughput. It is closed-loop: ``concurrency``
connections each send the next request as soon as the previous answer is in, for
``duration_s``; throughput is what the server sustains at that concurrency.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from freshrec.children import die_with_parent, popen

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "online_retail_ii"


# -- data ---------------------------------------------------------------------------------


@dataclass
class LoadedData:
    items: dict[str, Any]  # item_id -> CatalogItem
    users: list[str]  # users with a state in Redis
    queries: list[str]
    events: int
    event_list: list[Any] | None = None


def bench_settings(name: str, **extra: Any) -> Any:
    """Settings for a benchmark's own broker, Redis and server on free loopback ports."""
    import tempfile

    from freshrec.infra import free_port
    from freshrec.settings import Settings

    return Settings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        state_dir=Path(tempfile.mkdtemp(prefix=f"bench-{name}-")),
        api_port=free_port(),
        topic_prefix="bench.",
        redis_prefix="bench:",
        partitions=1,
        **extra,
    )


def load_dataset(settings: Any, data_dir: Path, client: Any, keep_events: bool = False) -> LoadedData:
    """Write a dataset's catalog, user states and popularity into Redis, as the flows would.

    The states are computed with the streams package's own reference functions
    (``replay_events``, ``Popularity``) and written through its Redis adapters, so
    serving reads exactly the format the live flow writes.
    """
    from freshrec.contracts import CatalogItem, Event
    from freshrec.dataset import locate, read_events, read_items
    from stores import catalog_store, user_store
    from ranking.user_state import DAY_S, Popularity, StateRules, replay_events

    files = locate(data_dir)
    items: dict[str, Any] = {}
    for row in read_items(files.items) if files.items else ():
        try:
            item = CatalogItem.model_validate(row)
        except Exception:
            continue
        items[item.item_id] = item
    catalog_store.write_items(client, settings, items.values())

    events = []
    for row in read_events(files.events, files.name):
        try:
            events.append(Event.model_validate(row))
        except Exception:
            continue
    states = replay_events(events, StateRules.from_settings(settings))
    user_store.write_user_states(client, settings, states.values())
    pop = Popularity(settings.popularity_half_life_days * DAY_S)
    for e in events:
        pop.observe(e.ts)
        if e.item_id is not None:
            pop.see(e.item_id, e.ts)
            if e.kind in ("purchase", "cancel"):
                pop.add(e.item_id, 1.0 if e.kind == "purchase" else -1.0, e.ts)
    user_store.write_partition_batch(
        client, settings, settings.topics.events, 0, 1, {}, dict(pop.entries), pop.newest_ts, pop.first_seen
    )
    rng = random.Random(7)
    titles = [it.title for it in items.values()]
    queries = []
    for title in rng.sample(titles, min(500, len(titles))):
        words = title.lower().split()
        n = rng.randint(1, min(3, len(words)))
        start = rng.randint(0, len(words) - n)
        queries.append(" ".join(words[start : start + n]))
    return LoadedData(items, sorted(states), queries, len(events), events if keep_events else None)


# -- the server ---------------------------------------------------------------------------


def start_server(settings: Any, log_path: Path, extra: Iterable[str] = ()) -> subprocess.Popen[bytes]:
    """``freshrec serve`` for a benchmark; it gets SIGTERM (and stops its export worker)
    if the benchmark dies, even by SIGKILL, so an interrupted run leaves no server."""
    log = open(log_path, "wb")
    return popen(
        [sys.executable, "-m", "freshrec", "serve", "--log-level", "warning", *extra],
        env=settings.child_env(os.environ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def http_json(method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 30.0) -> tuple[int, Any]:
    data = None if body is None else orjson.dumps(body)
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read() or b"{}")


def wait_ready(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"serving exited with code {proc.returncode} before it was ready")
        try:
            status, body = http_json("GET", f"http://127.0.0.1:{port}/readyz", timeout=2)
            if status == 200:
                return body
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"serving on port {port} not ready after {timeout:.0f} s")


# -- the load generator -------------------------------------------------------------------


def recommend_requests(users: list[str], k: int = 10, n: int = 2000, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [
        f"GET /recommend?user_id={rng.choice(users)}&k={k} HTTP/1.1\r\nHost: b\r\n\r\n".encode() for _ in range(n)
    ]


def search_requests(queries: list[str], users: list[str], k: int = 10, n: int = 2000, seed: int = 2) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        body = {"query": rng.choice(queries), "k": k}
        if users and rng.random() < 0.5:
            body["user_id"] = rng.choice(users)
        raw = orjson.dumps(body)
        out.append(
            b"POST /search HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(raw)).encode()
            + b"\r\n\r\n"
            + raw
        )
    return out


async def _connection(
    port: int,
    reqs: list[bytes],
    offset: int,
    stride: int,
    deadline: float,
    t_base: float,
    out: dict[str, list[Any]],
    keep_every: int,
    stopping: dict[str, bool],
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = offset
    try:
        while not stopping["stop"]:
            t0 = time.perf_counter()
            if t0 >= deadline:
                break
            req = reqs[i % len(reqs)]
            try:
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                cl = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        cl = int(line[15:])
                        break
                body = await reader.readexactly(cl) if cl else b""
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                out["failures"].append(f"{type(exc).__name__}: {exc}")
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            t1 = time.perf_counter()
            out["t"].append(t0 - t_base)
            out["lat"].append(t1 - t0)
            out["status"].append(status)
            v0 = body.find(b'"adapter_version":"')
            out["version"].append(body[v0 + 19 : body.find(b'"', v0 + 19)].decode() if v0 >= 0 else "")
            if status != 200 and len(out["bad"]) < 20:
                out["bad"].append(body[:300].decode(errors="replace"))
            if keep_every and i % keep_every == 0:
                out["kept"].append((i % len(reqs), body.decode()))
            i += stride
    finally:
        writer.close()


async def _drive(port: int, reqs: list[bytes], concurrency: int, duration_s: float, keep_every: int, stop: Any) -> dict[str, Any]:
    out: dict[str, list[Any]] = {k: [] for k in ("t", "lat", "status", "version", "bad", "kept", "failures")}
    stopping = {"stop": False}

    async def watch() -> None:
        while not stopping["stop"]:
            if stop is not None and stop.is_set():
                stopping["stop"] = True
            await asyncio.sleep(0.1)

    t_base = time.perf_counter()
    out["t_base_wall"] = [time.time()]
    deadline = t_base + duration_s
    watcher = asyncio.ensure_future(watch())
    await asyncio.gather(
        *(_connection(port, reqs, c, concurrency, deadline, t_base, out, keep_every, stopping) for c in range(concurrency))
    )
    stopping["stop"] = True
    await watcher
    out["wall_s"] = [time.perf_counter() - t_base]
    return out


def _child(port: int, reqs: list[bytes], concurrency: int, duration_s: float, keep_every: int, stop: Any, q: Any) -> None:
    # ``daemon=True`` ends it when the benchmark exits normally; this, when it is killed.
    die_with_parent(signal.SIGKILL)
    try:
        q.put(orjson.dumps(asyncio.run(_drive(port, reqs, concurrency, duration_s, keep_every, stop))))
    except BaseException as exc:  # report, never hang the parent
        q.put(orjson.dumps({"error": f"{type(exc).__name__}: {exc}"}))


class LoadProcess:
    """The load generator in its own (spawned) process; :meth:`stop` ends it early.

    The result holds per-request arrays (``t`` start offset, ``lat``, ``status``,
    ``version``), ``t_base_wall`` (wall clock of t = 0) and ``kept``: (request index,
    parsed body) of every ``keep_every``-th request, for checks that need whole answers.
    """

    def __init__(self, port: int, reqs: list[bytes], concurrency: int, duration_s: float, keep_every: int = 0) -> None:
        ctx = mp.get_context("spawn")
        self.duration_s = duration_s
        self._stop = ctx.Event()
        self._q = ctx.Queue()
        self._p = ctx.Process(
            target=_child, args=(port, reqs, concurrency, duration_s, keep_every, self._stop, self._q), daemon=True
        )

    def start(self) -> LoadProcess:
        self._p.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def result(self) -> dict[str, Any]:
        raw = self._q.get(timeout=self.duration_s + 120)
        self._p.join(10)
        out = orjson.loads(raw)
        if "error" in out:
            raise RuntimeError(f"load generator failed: {out['error']}")
        out["kept"] = [(i, orjson.loads(b)) for i, b in out["kept"]]
        return out


def drive(port: int, reqs: list[bytes], concurrency: int, duration_s: float, keep_every: int = 0) -> dict[str, Any]:
    """Run the load for ``duration_s`` in a separate process and return its result."""
    return LoadProcess(port, reqs, concurrency, duration_s, keep_every).start().result()


def summarise(out: dict[str, Any], t_from: float = 0.0, t_to: float = float("inf")) -> dict[str, float]:
    """rps, p50/p99 ms and errors of the requests that started in [t_from, t_to)."""
    from bench.report import percentile

    lat = [l for t, l in zip(out["t"], out["lat"]) if t_from <= t < t_to]
    errors = sum(1 for t, s in zip(out["t"], out["status"]) if t_from <= t < t_to and s != 200)
    span = min(t_to, out["wall_s"][0]) - t_from
    return {
        "requests": len(lat),
        "rps": len(lat) / span if span > 0 else float("nan"),
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "errors": errors + len(out["failures"]),
    }
