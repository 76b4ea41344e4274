"""bench.loadgen: the open-loop generator keeps its schedule and counts a stall in full."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from bench.loadgen import get_request, open_loop


@pytest.fixture
def stalling_server() -> Iterator[tuple[int, dict[str, float]]]:
    """An HTTP/1.1 keep-alive server answering at once, except while ``stall["until"]`` lies ahead."""
    stall = {"until": 0.0}
    ready = threading.Event()
    box: dict[str, object] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                wait = stall["until"] - time.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def serve() -> None:
        loop = asyncio.new_event_loop()
        server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
        box["port"], box["loop"] = server.sockets[0].getsockname()[1], loop
        ready.set()
        loop.run_forever()
        server.close()
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0.05))
        loop.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ready.wait(5)
    yield int(box["port"]), stall  # type: ignore[arg-type]
    loop = box["loop"]
    loop.call_soon_threadsafe(loop.stop)  # type: ignore[attr-defined]
    t.join(5)


def test_keeps_the_offered_rate(stalling_server: tuple[int, dict[str, float]]) -> None:
    port, _ = stalling_server
    out = open_loop(port, [get_request("/x")], rate=200, duration_s=1.5, warmup_s=0.3)
    assert out["errors"] == 0 and out["sent"] == 300
    assert out["achieved_rps"] == pytest.approx(200, rel=0.1)
    assert out["p50_ms"] < 50


def test_a_stall_counts_for_every_request_due_in_it(stalling_server: tuple[int, dict[str, float]]) -> None:
    # A 0.5 s stall in a 2 s window at 200/s delays ~100 requests (a quarter); a closed
    # loop with 4 connections would have sent only 4 of them and shown p99 near 0.
    port, stall = stalling_server
    threading.Timer(1.0, lambda: stall.update(until=time.time() + 0.5)).start()
    out = open_loop(port, [get_request("/x")], rate=200, duration_s=2.0, warmup_s=0.3)
    assert out["errors"] == 0
    assert out["p90_ms"] > 100, out
    assert out["max_ms"] > 400, out


def test_an_unanswered_request_is_an_error_at_its_timeout(stalling_server: tuple[int, dict[str, float]]) -> None:
    port, stall = stalling_server
    stall["until"] = time.time() + 30
    out = open_loop(port, [get_request("/x")], rate=20, duration_s=0.5, warmup_s=0.0, timeout_s=0.3)
    assert out["errors"] == out["sent"] == 10
    assert out["achieved_rps"] == 0
    assert out["p50_ms"] >= 300
