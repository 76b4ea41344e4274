"""The users and catalog flows through Redis outages (issue 13, item 4, flow side).

Each test runs its own redis-server without persistence (the session's is shared): it is
killed and restarted *empty* on the same port, as a Redis without AOF comes back. The
flow must stall while it is gone, then rewrite its full state and go on, so that Redis
ends exactly as after a clean run (the in-memory reference of test_streams_users).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from freshrec.infra import free_port, redis_binary
from freshrec.settings import Settings
from stores import catalog_store, user_store
from streams.flow_process import FlowProcess, applied_count, wait_applied
from stores.redis_client import connect
from tests.integration.helpers import sample_items
from tests.integration.test_streams_users import (
    _assert_states_equal, _produce, _produce_paced, _redis_states, _reference, _sample_events,
)

pytestmark = pytest.mark.integration


class OwnRedis:
    """A redis-server on a fixed port, without persistence, that a test may kill and restart."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port = port
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OwnRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [redis_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(free_port(), tmp_path / "redis").start()
    yield server
    server.kill()


@pytest.fixture
def settings(fresh_settings: Settings, own_redis: OwnRedis) -> Settings:
    return fresh_settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{own_redis.port}/0", "stream_snapshot_seconds": 1.0,
                "stream_redis_backoff_max_s": 0.5, "stream_redis_check_s": 0.5}
    )


def _redis_snapshot(settings: Settings) -> dict[bytes, object]:
    """Every key of the test's prefix with its whole value: what "Redis equals" compares."""
    client = connect(settings)
    out: dict[bytes, object] = {}
    for key in client.scan_iter(match=f"{settings.redis_prefix}*", count=2000):
        kind = client.type(key)
        out[key] = client.hgetall(key) if kind == b"hash" else client.get(key)
    return out


def test_redis_killed_mid_replay_and_back_empty_ends_as_a_clean_run(
    settings: Settings, own_redis: OwnRedis, sample_dir: Path
) -> None:
    events = _sample_events(sample_dir, 20_000)
    want, want_pop, _ = _reference(settings, events)
    # The clean run: the same events through a flow that meets no outage (other prefix, topic shared).
    clean = settings.model_copy(update={"redis_prefix": "clean-" + settings.redis_prefix,
                                        "state_dir": settings.state_dir / "clean"})
    log = settings.state_dir / "outage.log"
    flow = FlowProcess(settings, "users", log=log).start()
    try:
        producer = _produce_paced(settings, events, rate=4000)
        client = connect(settings)
        deadline = time.monotonic() + 60
        while applied_count(settings, "users", client) < 3000:
            flow.check_alive()
            assert time.monotonic() < deadline, flow.log_tail()
            time.sleep(0.02)
        own_redis.kill()
        time.sleep(1.5)  # the flow meets the outage with events still arriving
        flow.check_alive()
        own_redis.start()  # empty: no persistence
        producer.join(60)
        wait_applied(settings, "users", len(events), timeout=120, procs=[flow])
        flow.check_alive()
    finally:
        flow.stop()
    text = log.read_text()
    assert "Redis unavailable" in text and "answers again" in text and "Redis lost data" in text, text[-3000:]
    _assert_states_equal(_redis_states(settings), want)
    client = connect(settings)
    pops, expect = user_store.read_popularity(client, settings), want_pop.scores()
    assert pops.keys() == expect.keys()
    assert all(pops[i] == pytest.approx(expect[i], rel=1e-9, abs=1e-12) for i in expect)
    assert user_store.read_item_first_seen(client, settings) == want_pop.first_seen

    with FlowProcess(clean, "users", log=settings.state_dir / "clean.log") as reference:
        wait_applied(clean, "users", len(events), timeout=120, procs=[reference])
    got, ref = _redis_snapshot(settings), _redis_snapshot(clean)
    strip = lambda d, p: {k[len(p):]: v for k, v in d.items()}  # noqa: E731
    assert strip(got, settings.redis_prefix.encode()) == strip(ref, clean.redis_prefix.encode())


def test_an_idle_flow_rebuilds_an_emptied_redis_without_new_events(
    settings: Settings, own_redis: OwnRedis, sample_dir: Path
) -> None:
    events = _sample_events(sample_dir, 3000)
    sent = _produce(settings, events)
    want, _, _ = _reference(settings, events)
    with FlowProcess(settings, "users", log=settings.state_dir / "users.log") as users, \
            FlowProcess(settings, "catalog", log=settings.state_dir / "catalog.log") as catalog:
        items = sample_items(sample_dir, 300)
        from freshrec.producer import RecordProducer

        with RecordProducer(settings, client_id="test-catalog") as producer:
            for item in items.values():
                producer.send(settings.topics.catalog, item.item_id, item.to_bytes())
            assert producer.flush().failed == 0
        wait_applied(settings, "users", sent, timeout=90, procs=[users])
        wait_applied(settings, "catalog", len(items), timeout=90, procs=[catalog])
        before = _redis_snapshot(settings)
        assert all(connect(settings).hexists(key, settings.topics.events) for key, _ in user_store.epoch_slots(settings))

        # A key no flow writes: its absence after the restart proves Redis came back
        # empty, even when an idle flow's check (every 2 s) has already begun rewriting.
        sentinel = f"{settings.redis_prefix}sentinel"
        connect(settings).set(sentinel, b"1")
        own_redis.kill()
        time.sleep(1.0)
        own_redis.start()
        assert connect(settings).get(sentinel) is None
        # No new events: the idle check alone must bring everything back.
        t0 = time.monotonic()
        wait_applied(settings, "users", sent, timeout=30, procs=[users, catalog])
        wait_applied(settings, "catalog", len(items), timeout=30, procs=[users, catalog])
        deadline = time.monotonic() + 10
        while _redis_snapshot(settings) != before and time.monotonic() < deadline:
            time.sleep(0.1)
        took = time.monotonic() - t0
        users.check_alive()
        catalog.check_alive()
    assert _redis_snapshot(settings) == before
    assert took < 15
    _assert_states_equal(_redis_states(settings), want)
    assert catalog_store.all_items(connect(settings), settings) == items


def test_a_flow_restarted_on_an_emptied_redis_rebuilds_it_from_its_snapshot(
    settings: Settings, own_redis: OwnRedis, sample_dir: Path
) -> None:
    events = _sample_events(sample_dir, 3000)
    sent = _produce(settings, events)
    want, _, _ = _reference(settings, events)
    with FlowProcess(settings, "users", log=settings.state_dir / "run1.log") as flow:
        wait_applied(settings, "users", sent, timeout=90, procs=[flow])
        time.sleep(2.5)  # a snapshot covering every offset
    before = _redis_snapshot(settings)
    own_redis.kill()
    own_redis.start()  # the flow is down, Redis comes back empty, no event will arrive
    with FlowProcess(settings, "users", log=settings.state_dir / "run2.log") as flow:
        wait_applied(settings, "users", sent, timeout=30, procs=[flow])
        deadline = time.monotonic() + 10
        while _redis_snapshot(settings) != before and time.monotonic() < deadline:
            time.sleep(0.1)
    assert _redis_snapshot(settings) == before
    _assert_states_equal(_redis_states(settings), want)
