"""`up`, `down` and the embedded Redis across restarts and crashes, through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from freshrec.infra import _terminate, free_cluster_ports, free_port, pid_alive, port_open, start_redis

pytestmark = pytest.mark.integration


def run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "freshrec", *args],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout,
    )


def _env(state: Path, redis_port: int | None = None) -> dict[str, str]:
    return {
        "FRESHREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "FRESHREC_REDIS_URL": f"redis://127.0.0.1:{redis_port or free_port()}/0",
        "FRESHREC_STATE_DIR": str(state),
        "FRESHREC_REDIS_PREFIX": "freshrec:",
    }


def _recorded(state: Path) -> dict:
    return json.loads((state / "infra.json").read_text())


def _leave_positions(state: Path) -> None:
    """What the flows, learner, indexer and learner's registry leave after a session."""
    for rel in ("streams/users/part-0.sqlite3", "learner/checkpoints/ckpt-000000001/state.json",
                "indexer/offsets.json", "adapters/v000001-abc/manifest.json"):
        (state / rel).parent.mkdir(parents=True, exist_ok=True)
        (state / rel).write_text("{}")


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)


def test_up_after_down_clears_snapshots_positions_and_the_reused_redis_keys(tmp_path: Path) -> None:
    """A Redis that was already running is reused, and `up` clears freshrec's keys in it (only those)."""
    theirs = start_redis("127.0.0.1", free_port(), tmp_path / "theirs", persist=False)
    state = tmp_path / "state"
    env = _env(state, theirs.port)
    client = redis.Redis(port=theirs.port)
    try:
        first = run_cli(["up"], env)
        assert first.returncode == 0, first.stderr
        assert "already running, reused: cleared 0 keys under 'freshrec:'" in first.stdout
        client.set("freshrec:user:1", b"1")
        client.hset("freshrec:streams:applied", "events:0", 17_000)
        client.set("someone-else:user:1", b"1")
        _leave_positions(state)
        down = run_cli(["down"], env)
        assert "stopped kafka" in down.stdout and "left redis" in down.stdout
        assert client.ping(), "down stopped a Redis it did not start"

        second = run_cli(["up"], env)
        assert second.returncode == 0, second.stderr
        assert "already running, reused: cleared 2 keys under 'freshrec:'" in second.stdout
        assert f"removed {state / 'streams' / 'users'}, {state / 'learner'}, {state / 'indexer'}" in second.stdout
        assert not client.exists("freshrec:user:1", "freshrec:streams:applied")
        assert client.get("someone-else:user:1") == b"1"
        assert not (state / "streams" / "users").exists() and not (state / "learner").exists()
        assert not (state / "indexer").exists()
        assert (state / "adapters" / "v000001-abc" / "manifest.json").exists(), "the registry must survive `up`"

        status = run_cli(["status", "--counts"], env)
        assert status.returncode == 0, status.stderr
        assert "freshrec.events" in status.stdout and "lower bound" in status.stdout
        assert "Known broker quirk" in status.stdout
    finally:
        run_cli(["down"], env)
        _terminate(theirs.pid)


def test_own_redis_persists_its_keys_and_up_clears_them_with_the_old_topics(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = _env(state)
    try:
        first = run_cli(["up"], env)
        assert first.returncode == 0, first.stderr
        assert f"AOF in {state / 'redis'}" in first.stdout
        port = _recorded(state)["redis"]["port"]
        redis.Redis(port=port).set("freshrec:user:1", b"1")
        assert run_cli(["down"], env).stdout.count("stopped") == 2

        # The AOF brought the key back, and it belonged to the old topics: cleared.
        second = run_cli(["up"], env)
        assert second.returncode == 0, second.stderr
        assert "cleared 1 keys under 'freshrec:'" in second.stdout
        assert redis.Redis(port=port).dbsize() == 0
    finally:
        run_cli(["down"], env)


def test_embedded_redis_keeps_its_keys_across_a_kill(tmp_path: Path) -> None:
    port = free_port()
    first = start_redis("127.0.0.1", port, tmp_path)
    try:
        redis.Redis(port=port).set("freshrec:user:1", b"kept")
        _kill(first.pid)  # no shutdown: only what reached the append-only file survives
    finally:
        _terminate(first.pid)
    # The killed server's socket can still accept for a moment on a loaded machine.
    deadline = time.monotonic() + 10
    while port_open("127.0.0.1", port) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = start_redis("127.0.0.1", port, tmp_path)
    try:
        assert second.pid != first.pid
        assert redis.Redis(port=port).get("freshrec:user:1") == b"kept"
        assert (tmp_path / "redis" / "appendonly.aof").stat().st_size > 0
    finally:
        _terminate(second.pid)


def test_down_after_a_broker_crash_stops_redis_and_up_after_a_crash_keeps_it_ours(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = _env(state)
    try:
        assert run_cli(["up"], env).returncode == 0
        rec = _recorded(state)
        _kill(rec["kafka"]["pid"])
        down = run_cli(["down"], env)
        assert down.returncode == 0
        assert f"kafka (pid {rec['kafka']['pid']}, {rec['kafka']['host']}:{rec['kafka']['port']}) had already exited" in down.stdout
        assert f"stopped redis (pid {rec['redis']['pid']}" in down.stdout
        assert not pid_alive(rec["redis"]["pid"])

        # `up` over a stale infra.json whose broker crashed: the Redis it left stays recorded as
        # ours (not "external"), so the next `down` stops it too.
        assert run_cli(["up"], env).returncode == 0
        rec = _recorded(state)
        _kill(rec["kafka"]["pid"])
        again = run_cli(["up"], env)
        assert again.returncode == 0, again.stderr
        assert f"pid {rec['redis']['pid']}, left running by the previous `up`, reused" in again.stdout
        assert _recorded(state)["redis"]["pid"] == rec["redis"]["pid"]
        down = run_cli(["down"], env)
        assert down.stdout.count("stopped") == 2, down.stdout
        assert not pid_alive(rec["redis"]["pid"])
    finally:
        run_cli(["down"], env)


def test_up_with_a_cluster_url_starts_a_three_master_redis_cluster_and_down_stops_it(tmp_path: Path) -> None:
    """`freshrec up` with FRESHREC_REDIS_URL=redis+cluster://...: the one-machine cluster recipe."""
    state = tmp_path / "state"
    ports = free_cluster_ports(3)
    env = _env(state) | {"FRESHREC_REDIS_URL": "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)}
    up = run_cli(["up"], env)
    try:
        assert up.returncode == 0, up.stderr
        assert "Redis Cluster of 3 masters" in up.stdout
        nodes = _recorded(state)["redis_cluster"]
        assert [n["port"] for n in nodes] == ports and all(pid_alive(n["pid"]) for n in nodes)
        for port in ports:  # every node sees a formed cluster covering all 16384 slots
            info = redis.Redis(port=port).execute_command("CLUSTER", "INFO").decode()
            assert "cluster_state:ok" in info and "cluster_slots_assigned:16384" in info
        status = run_cli(["status"], env)
        assert status.returncode == 0 and status.stdout.count("redis") == 3, status.stdout  # liveness probes time out under load
        again = run_cli(["up"], env)
        assert again.returncode == 1 and "already up" in again.stderr
    finally:
        down = run_cli(["down"], env)
    assert down.returncode == 0, down.stderr
    assert down.stdout.count("stopped redis") == 3
    assert not any(pid_alive(n["pid"]) for n in nodes) and not any(port_open("127.0.0.1", p) for p in ports)
    assert not (state / "infra.json").exists()
