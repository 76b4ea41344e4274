"""Open-loop HTTP load: requests sent at a fixed offered rate, latency from the scheduled send.

    python -m bench.loadgen --port 8000 --path /healthz --rate 500 --duration 10

A closed-loop generator (``bench._load.drive``: N connections, each sending the next
request when the previous answer is in) slows down with the server, so a stall delays
the requests that would have measured it and p99 looks better than what a caller sees
(coordinated omission). Here request ``i`` is due at ``t0 + i / rate`` whatever the
server does, and its latency runs from that due time to the last byte of its answer:
time spent waiting for a free connection, or behind a late dispatcher, counts.

Each request takes an idle keep-alive connection (HTTP/1.1, one request in flight per
connection, raw asyncio streams: an HTTP client library costs several times more CPU
per request, taken straight out of the server's two cores) or opens a new one, up to
``max_connections``; past that, requests queue in the client, still on the clock.
A request not answered ``timeout_s`` after its due time is an error, and counts in the
percentiles at the time it was abandoned (a lower bound), so a stuck server cannot
improve its own p99 by not answering.

:func:`open_loop` runs the schedule in a spawned process of its own (so its CPU is not
the caller's), which gets SIGKILL if the caller dies. The first ``warmup_s`` seconds
are sent but not counted. ``send_lag_p99_ms`` is how late the dispatcher itself sent
(the generator's own overload shows there, not as server latency).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import signal
import sys
import time
from typing import Any

import orjson

from freshrec.children import die_with_parent


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
            break
    body = await reader.readexactly(length) if length else b""
    return status, body


class _Connections:
    """Idle keep-alive connections, opened on demand up to ``limit``."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0
        self.peak = 0
        self._free = asyncio.Condition()

    async def take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with self._free:
            while not self.idle and self.opened >= self.limit:
                await self._free.wait()
            if self.idle:
                return self.idle.pop()
            self.opened += 1
            self.peak = max(self.peak, self.opened)
        try:
            return await asyncio.open_connection(self.host, self.port)
        except BaseException:
            await self.drop()
            raise

    async def give(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        async with self._free:
            self.idle.append(conn)
            self._free.notify()

    async def drop(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None) -> None:
        if conn is not None:
            conn[1].close()
        async with self._free:
            self.opened -= 1
            self._free.notify()

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def _run(
    host: str, port: int, requests: list[bytes], rate: float, duration_s: float, warmup_s: float,
    max_connections: int, timeout_s: float,
) -> dict[str, Any]:
    conns = _Connections(host, port, max_connections)
    total = int((warmup_s + duration_s) * rate)
    counted_from = int(warmup_s * rate)
    lat = [0.0] * total  # seconds from due time to answer (or to abandonment)
    status = [0] * total  # HTTP status; 0: no answer (a connection error or a timeout)
    failures: list[str] = []
    done_at = [0.0] * total
    lags: list[float] = []

    async def one(i: int, due: float) -> None:
        conn = None
        try:
            async with asyncio.timeout(max(0.0, due + timeout_s - time.perf_counter())):
                conn = await conns.take()
                conn[1].write(requests[i % len(requests)])
                code, _ = await _read_answer(conn[0])
            status[i] = code
            await conns.give(conn)
        except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
            if len(failures) < 20:
                failures.append(f"{type(exc).__name__}: {exc}"[:200])
            if conn is not None:
                await conns.drop(conn)
        now = time.perf_counter()
        lat[i] = now - due
        done_at[i] = now

    tasks: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter() + 0.05
    interval = 1.0 / rate
    i = 0
    while i < total:
        now = time.perf_counter()
        while i < total and t0 + i * interval <= now:
            due = t0 + i * interval
            if i >= counted_from:
                lags.append(now - due)
            task = asyncio.create_task(one(i, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if i < total:
            await asyncio.sleep(max(0.0, t0 + i * interval - time.perf_counter()))
    if tasks:
        await asyncio.wait(list(tasks))
    conns.close()

    counted = range(counted_from, total)
    window_start = t0 + counted_from * interval
    ok = [lat[j] for j in counted if 200 <= status[j] < 300]
    everything = sorted(lat[j] for j in counted)
    errors = sum(1 for j in counted if not 200 <= status[j] < 300)
    last = max((done_at[j] for j in counted), default=window_start)
    span = max(last - window_start, duration_s)
    return {
        "offered_rps": rate,
        "achieved_rps": len(ok) / span,
        "sent": len(everything),
        "ok": len(ok),
        "errors": errors,
        "p50_ms": _pct(everything, 50) * 1e3,
        "p90_ms": _pct(everything, 90) * 1e3,
        "p99_ms": _pct(everything, 99) * 1e3,
        "max_ms": (everything[-1] if everything else float("nan")) * 1e3,
        "send_lag_p99_ms": _pct(sorted(lags), 99) * 1e3,
        "connections_peak": conns.peak,
        "statuses": _count(status[j] for j in counted),
        "failures": failures,
        "duration_s": duration_s,
    }


def _pct(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values; nan for none."""
    if not ordered:
        return float("nan")
    return ordered[max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def _child(args: tuple[Any, ...], q: Any) -> None:
    die_with_parent(signal.SIGKILL)  # holds nothing worth a goodbye
    try:
        try:
            import uvloop

            uvloop.install()  # less client CPU per request: more of the two cores for the server
        except ImportError:
            pass
        q.put(orjson.dumps(asyncio.run(_run(*args))))
    except BaseException as exc:  # report, never hang the parent
        q.put(orjson.dumps({"error": f"{type(exc).__name__}: {exc}"}))


def open_loop(
    port: int,
    requests: list[bytes],
    rate: float,
    duration_s: float,
    *,
    warmup_s: float = 1.0,
    max_connections: int = 256,
    timeout_s: float = 5.0,
    host: str = "127.0.0.1",
) -> dict[str, Any]:
    """Send ``requests`` (raw HTTP/1.1, cycled) at ``rate`` per second for ``warmup_s +
    duration_s`` from a spawned process; figures over the last ``duration_s`` seconds.

    Returns ``offered_rps``, ``achieved_rps`` (2xx answers per second of the window),
    ``p50_ms``/``p90_ms``/``p99_ms``/``max_ms`` from each request's due time (errors
    included, at the time they failed), ``errors`` (non-2xx, connection errors,
    timeouts), ``send_lag_p99_ms``, ``connections_peak``, ``statuses``, ``failures``.
    Raises RuntimeError if the generator itself failed.
    """
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration_s must be positive (got {rate}, {duration_s})")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    args = (host, port, requests, float(rate), float(duration_s), float(warmup_s), max_connections, float(timeout_s))
    proc = ctx.Process(target=_child, args=(args, q), daemon=True)
    proc.start()
    try:
        raw = q.get(timeout=warmup_s + duration_s + timeout_s + 60)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    out = orjson.loads(raw)
    if "error" in out:
        raise RuntimeError(f"load generator failed: {out['error']}")
    return out


def get_request(path: str) -> bytes:
    """A raw keep-alive GET of ``path``."""
    return f"GET {path} HTTP/1.1\r\nHost: b\r\n\r\n".encode()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/healthz", help="GET this path")
    p.add_argument("--rate", type=float, default=500.0, help="offered requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds counted (after --warmup)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--connections", type=int, default=256, help="most connections open at once")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds after its due time a request is abandoned")
    args = p.parse_args(argv)
    out = open_loop(
        args.port, [get_request(args.path)], args.rate, args.duration, warmup_s=args.warmup,
        max_connections=args.connections, timeout_s=args.timeout, host=args.host,
    )
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return 0 if out["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
