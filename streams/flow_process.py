"""Run ``freshrec stream <flow>`` as a child process and wait for its effects in Redis.

Tests and benchmarks need real processes (a SIGKILL must really kill), started with
the same Settings object they use themselves, and a way to know the flow is done that
does not rely on the broker's high watermark (wrong on the embedded broker): the flow
records per partition the last offset whose effects are in Redis, so "done" is "every
partition's applied offset reached what was produced there".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from freshrec.children import popen
from freshrec.settings import Settings

from stores import catalog_store, collab_store, user_store
from stores.redis_client import connect


class FlowProcess:
    """One ``freshrec stream <flow>`` process; ``extra`` are its flags (``-w 2`` ...).

    ``bytewax_run=True`` starts ``python -m bytewax.run streams.<flow>_flow`` instead,
    Bytewax's own runner (``extra`` then takes its flags).
    """

    def __init__(
        self,
        settings: Settings,
        flow: str,
        extra: list[str] | None = None,
        log: Path | None = None,
        bytewax_run: bool = False,
    ) -> None:
        self.settings = settings
        self.flow = flow
        self.extra = list(extra or [])
        self.log_path = log or settings.state_dir / f"stream-{flow}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        if bytewax_run:
            self.argv = [sys.executable, "-m", "bytewax.run", f"streams.{flow}_flow", *self.extra]
        else:
            self.argv = [sys.executable, "-m", "freshrec", "stream", flow, *self.extra]

    def start(self) -> FlowProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        # Through freshrec.children: a test or benchmark killed mid-run must not leave its flow
        # (call from a thread that lives as long as the flow should: see freshrec.children).
        self.proc = popen(
            self.argv,
            env=self.settings.child_env(os.environ),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"`{' '.join(self.argv[1:])}` exited with {self.proc.returncode}; log:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no snapshot, no flush, no goodbye."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> FlowProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def applied_offsets(settings: Settings, flow: str, client: Any = None) -> dict[str, int]:
    """Per partition of the flow's input topic, the last offset whose effects are in Redis.

    ``flow`` is ``users``, ``catalog`` or ``collab`` (which reads the events topic like
    ``users`` but keeps its own offsets, in ``collab:meta``).
    """
    client = client or connect(settings)
    if flow == "collab":
        return collab_store.read_offsets(client, settings)
    if flow not in ("users", "catalog"):
        raise ValueError(f"flow {flow!r} is not one of users, catalog, collab")
    return (user_store if flow == "users" else catalog_store).read_applied_offsets(client, settings)


def applied_count(settings: Settings, flow: str, client: Any = None) -> int:
    """Messages whose effects are in Redis, summed over partitions (offsets start at 0)."""
    return sum(o + 1 for o in applied_offsets(settings, flow, client).values())


def wait_applied(
    settings: Settings, flow: str, expected: int, timeout: float = 60.0, procs: list[FlowProcess] | None = None
) -> float:
    """Block until ``expected`` messages of the flow's topic are reflected in Redis."""
    client = connect(settings)
    start = time.monotonic()
    deadline = start + timeout
    while True:
        got = applied_count(settings, flow, client)
        if got >= expected:
            return time.monotonic() - start
        for p in procs or []:
            p.check_alive()
        if time.monotonic() > deadline:
            logs = "\n".join(p.log_tail() for p in procs or [])
            raise TimeoutError(f"{flow} flow applied {got} of {expected} messages within {timeout:.0f} s\n{logs}")
        time.sleep(0.05)
