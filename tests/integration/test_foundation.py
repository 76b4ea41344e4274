"""The foundation against the real embedded broker and Redis: replay, dead letters, launcher."""

from __future__ import annotations

import collections
import itertools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from freshrec.consumer import TopicFollower
from freshrec.contracts import DeadLetter
from freshrec.dataset import locate, read_events
from freshrec.infra import Stack, free_port
from console.replay import Pace, replay
from freshrec.settings import Settings

pytestmark = pytest.mark.integration


def consume(settings: Settings, topic: str, expected: int, timeout: float = 30.0) -> list:
    """Read until `expected` messages arrived (Tansu's end offsets can't be trusted) or timeout."""
    got = []
    deadline = time.monotonic() + timeout
    with TopicFollower(settings, topic) as follower:
        while len(got) < expected and time.monotonic() < deadline:
            got.extend(follower.poll(0.2))
        # Anything beyond `expected` would be a duplicate: give it a moment to show up.
        got.extend(follower.poll(0.5))
    return got


def test_replay_of_20000_sample_events_arrives_complete_and_in_user_order(
    fresh_settings: Settings, sample_dir: Path
) -> None:
    report = replay(fresh_settings, sample_dir, Pace(), limit=20_000, progress=False)
    assert report.events == 20_000
    assert report.delivery.failed == 0 and report.delivery.rejected == 0
    assert report.delivery.confirmed == report.items + 20_000

    messages = consume(fresh_settings, fresh_settings.topics.events, 20_000)
    assert len(messages) == 20_000
    received = [orjson.loads(m.value) for m in sorted(messages, key=lambda m: (m.partition, m.offset))]

    files = locate(sample_dir)
    sent = list(itertools.islice(read_events(files.events, files.name), 20_000))
    assert {e["event_id"] for e in received} == {e["event_id"] for e in sent}

    def per_user(rows: list[dict]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = collections.defaultdict(list)
        for row in rows:
            out[row["user_id"]].append(row["event_id"])
        return out

    # One user's events sit in one partition, in the order they were sent.
    assert per_user(received) == per_user(sent)
    partitions_of_user = collections.defaultdict(set)
    for m in messages:
        partitions_of_user[m.key].add(m.partition)
    assert all(len(p) == 1 for p in partitions_of_user.values())


def test_malformed_lines_go_to_dead_letter_and_valid_ones_arrive(fresh_settings: Settings, tmp_path: Path) -> None:
    now = time.time()
    valid = [
        {"event_id": f"ok{i}", "user_id": f"u{i % 3}", "item_id": f"i{i}", "kind": "purchase", "ts": now - 100 + i}
        for i in range(50)
    ]
    bad = [
        b'{"event_id": "b1", "user_id": "u1", ',  # bad JSON
        orjson.dumps({"event_id": "b2", "item_id": "i1", "kind": "click", "ts": now}),  # missing user
        orjson.dumps({"event_id": "b3", "user_id": "u1", "item_id": "i1", "kind": "like", "ts": now}),  # unknown kind
        orjson.dumps({"event_id": "b4", "user_id": "u1", "item_id": "i1", "kind": "click", "ts": now + 86400}),
    ]
    lines = [orjson.dumps(v) for v in valid[:25]] + bad + [orjson.dumps(v) for v in valid[25:]]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_bytes(
        orjson.dumps({"item_id": "big", "title": "x" * 100_000}) + b"\n"
        + orjson.dumps({"item_id": "ok", "title": "Mug"}) + b"\n"
    )

    env = fresh_settings.child_env(os.environ)
    out = subprocess.run(
        [sys.executable, "-m", "freshrec", "produce", str(path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "sent 50, rejected 4" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "freshrec", "produce", "--topic", "catalog", str(catalog)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert "sent 1, rejected 1" in out.stdout, out.stdout + out.stderr

    events = consume(fresh_settings, fresh_settings.topics.events, 50)
    assert sorted(orjson.loads(m.value)["event_id"] for m in events) == sorted(v["event_id"] for v in valid)
    letters = [DeadLetter.from_bytes(m.value) for m in consume(fresh_settings, fresh_settings.topics.dead_letter, 5)]
    assert len(letters) == 5
    by_raw = {dl.raw[:40]: dl for dl in letters}
    fields = sorted(dl.field for dl in letters)
    assert fields == ["kind", "record", "title", "ts", "user_id"]
    assert all(dl.reason for dl in letters)
    assert by_raw[bad[0][:40]].raw == bad[0]  # the original bytes are kept
    assert [m for m in consume(fresh_settings, fresh_settings.topics.catalog, 1)]


def run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "freshrec", *args],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout,
    )


def test_up_twice_down_twice_and_taken_port(tmp_path: Path) -> None:
    env = {
        "FRESHREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "FRESHREC_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "FRESHREC_STATE_DIR": str(tmp_path / "state"),
    }
    try:
        first = run_cli(["up"], env)
        assert first.returncode == 0, first.stderr
        assert "kafka" in first.stdout and "redis" in first.stdout
        status = run_cli(["status"], env)
        assert status.returncode == 0 and status.stdout.count(" up") == 2

        second = run_cli(["up"], env)
        assert second.returncode == 1
        assert "already up" in second.stderr and "freshrec down" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        down = run_cli(["down"], env)
    assert down.returncode == 0 and down.stdout.count("stopped") == 2
    again = run_cli(["down"], env)
    assert again.returncode == 0 and "nothing to stop" in again.stdout
    assert run_cli(["status"], env).returncode == 1


def _up_with_taken_port(tmp_path: Path, taken: str) -> tuple[int, dict[str, str], subprocess.CompletedProcess[str]]:
    """``freshrec up`` while something that is neither broker nor Redis listens on the
    ``taken`` ("kafka" or "redis") port; returns that port, the env and the result."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        kafka_port = port if taken == "kafka" else free_port()
        redis_port = port if taken == "redis" else free_port()
        env = {
            "FRESHREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{kafka_port}",
            "FRESHREC_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "FRESHREC_STATE_DIR": str(tmp_path / "state"),
        }
        return port, env, run_cli(["up"], env)


def test_taken_port_gives_one_line_error(tmp_path: Path) -> None:
    port, _, out = _up_with_taken_port(tmp_path, "kafka")
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0
    assert f"port 127.0.0.1:{port} is already taken" in out.stderr
    assert "FRESHREC_KAFKA_BOOTSTRAP" in out.stderr


def test_redis_port_taken_by_something_else(tmp_path: Path) -> None:
    _, env, out = _up_with_taken_port(tmp_path, "redis")
    assert out.returncode == 1
    assert "not Redis" in out.stderr and "FRESHREC_REDIS_URL" in out.stderr
    # The broker it had started is stopped again, so a retry can work.
    assert run_cli(["status"], env).returncode == 1


def test_stack_fixture_is_reachable(stack: Stack) -> None:
    import redis

    assert redis.Redis.from_url(stack.redis_url).ping()
