"""``freshrec reset`` against a real Redis: exactly the prefix's keys and the stored positions go."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import redis

from console.cli import main
from freshrec.infra import free_port
from freshrec.reset import ResetError, reset
from freshrec.settings import Settings
from stores import collab_store

pytestmark = pytest.mark.integration

POSITIONS = ["streams/users", "streams/catalog", "streams/collab", "learner", "indexer"]
REGISTRIES = ["adapters", "rankers", "exports"]
KEPT = [*REGISTRIES, "logs", "redis", "infra.json"]


def _populate(state: Path) -> None:
    """A state dir as the flows, learner, indexer, registry and `up` leave it."""
    files = {
        "streams/users/part-0.sqlite3": "snapshot",
        "streams/users/epoch.json": "{}",
        "streams/catalog/part-0.sqlite3": "snapshot",
        "streams/collab/part-0.sqlite3": "snapshot",
        "streams/collab/epoch.json": "{}",
        "learner/checkpoints/ckpt-000000001/state.json": "{}",
        "learner/trained.log": "{}\n",
        "learner/epoch.json": "{}",
        "learner/ranker/checkpoints/ckpt-000000001/state.json": "{}",
        "learner/ranker/epoch.json": "{}",
        "indexer/offsets.json": "{}",
        "indexer/epoch.json": "{}",
        "adapters/v000001-abc/manifest.json": "{}",
        "rankers/v000001-abc/manifest.json": "{}",
        "rankers/active.json": "{}",
        "exports/base/encoder.int8.onnx": "x",
        "logs/tansu.log": "log",
        "redis/appendonly.aof": "",
        "infra.json": "{}",
    }
    for rel, text in files.items():
        (state / rel).parent.mkdir(parents=True, exist_ok=True)
        (state / rel).write_text(text)


def _write_collab_state(client: redis.Redis, s: Settings) -> int:
    """The collaborative flow's keys as :func:`stores.collab_store.write_batch` lays them out; returns how many."""
    p = s.redis_prefix
    with client.pipeline(transaction=False) as pipe:
        for item in ("A", "B"):
            pipe.set(collab_store.cop_key(s, item), b"{}")
        pipe.hset(p + collab_store.META, mapping={"epoch": "id", "newest_ts": "1.0", "offsets": '{"0":4}'})
        pipe.hset(p + collab_store.ITEMS, "A", b"[1,1]")
        for key in collab_store.POP.values():
            pipe.hset(p + key, "A", b"[1.0,1.0]")
        pipe.hset(p + collab_store.FIRST_SEEN, "A", b"1.0")
        pipe.hset(p + collab_store.SHOPVEC, "u1", b"\0" * 16)
        pipe.rpush(p + collab_store.ORDER, b"[{},[[0,4]]]")
        pipe.execute()
    return 2 + 1 + 1 + len(collab_store.POP) + 1 + 1 + 1


def _with(settings: Settings, **changes: object) -> Settings:
    return Settings(**{**settings.model_dump(), **changes})


def test_reset_removes_exactly_the_prefix_keys_and_the_stored_positions(fresh_settings: Settings) -> None:
    s = fresh_settings
    _populate(s.state_dir)
    client = redis.Redis.from_url(s.redis_url)
    mine = [f"{s.redis_prefix}user:{i}" for i in range(2_500)]  # more than one SCAN/UNLINK batch
    # Another deployment in the same Redis, one whose prefix merely starts like ours, and no prefix at all.
    others = [f"other{s.redis_prefix}user:1", s.redis_prefix.rstrip(":") + "x:user:1", "user:1"]
    with client.pipeline(transaction=False) as pipe:
        for key in mine + others:
            pipe.set(key, b"1")
        pipe.hset(f"{s.redis_prefix}streams:epoch", "topic", "id")
        pipe.execute()
    collab = _write_collab_state(client, s)

    report = reset(s)

    assert report.redis_keys == len(mine) + 1 + collab
    assert collab_store.read_offsets(client, s) == {} and not collab_store.read_order(client, s)
    assert sorted(report.paths) == sorted(s.state_dir / p for p in POSITIONS)
    assert not any(client.scan_iter(match=f"{s.redis_prefix}*"))
    assert all(client.exists(k) for k in others)
    for rel in POSITIONS:
        assert not (s.state_dir / rel).exists(), rel
    for rel in KEPT:  # the registry, its exports, logs and the infrastructure's own files stay
        assert (s.state_dir / rel).exists(), rel
    assert (s.state_dir / "streams").is_dir()

    everything = reset(s, everything=True)
    assert sorted(everything.paths) == sorted(s.state_dir / p for p in REGISTRIES)
    for rel in REGISTRIES:
        assert not (s.state_dir / rel).exists(), rel
    assert everything.redis_keys == 0
    assert all(client.exists(k) for k in others)
    client.delete(*others)


def test_a_prefix_with_glob_characters_matches_only_itself(fresh_settings: Settings) -> None:
    s = _with(fresh_settings, redis_prefix=f"{fresh_settings.redis_prefix}[a]*?:")
    client = redis.Redis.from_url(s.redis_url)
    client.set(f"{s.redis_prefix}k", b"1")
    lookalike = f"{fresh_settings.redis_prefix}a-not-mine"  # what an unescaped pattern would match
    client.set(lookalike, b"1")
    assert reset(s).redis_keys == 1
    assert client.exists(lookalike)
    client.delete(lookalike)


def test_unreachable_redis_removes_nothing(fresh_settings: Settings) -> None:
    s = _with(fresh_settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    _populate(s.state_dir)
    with pytest.raises(ResetError, match="cannot reach Redis .*Nothing was removed"):
        reset(s)
    assert all((s.state_dir / rel).exists() for rel in POSITIONS)


def _cli_env(monkeypatch: pytest.MonkeyPatch, s: Settings) -> None:
    for name in ("kafka_bootstrap", "redis_url", "redis_prefix", "topic_prefix", "state_dir"):
        monkeypatch.setenv(f"FRESHREC_{name.upper()}", str(getattr(s, name)))


def test_reset_command_asks_then_prints_exactly_what_it_removed(
    fresh_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    s = fresh_settings
    _populate(s.state_dir)
    client = redis.Redis.from_url(s.redis_url)
    client.set(f"{s.redis_prefix}user:1", b"1")
    _cli_env(monkeypatch, s)

    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    assert main(["reset"]) == 1
    out, err = capsys.readouterr()
    assert "freshrec reset will remove" in out and str(s.state_dir / "learner") in out
    assert f"1 Redis keys under {s.redis_prefix!r}" in out
    assert "nothing removed" in err and "--yes" in err
    assert (s.state_dir / "learner").exists() and client.exists(f"{s.redis_prefix}user:1")

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no terminal, no answer: never assume yes
    assert main(["reset"]) == 1
    assert (s.state_dir / "learner").exists()
    capsys.readouterr()

    assert main(["reset", "--yes"]) == 0
    out, _ = capsys.readouterr()
    removed = out.strip().splitlines()
    in_order = ["streams/catalog", "streams/collab", "streams/users", "learner", "indexer"]
    assert removed == [f"removed {s.state_dir / p}" for p in in_order] + [
        f"removed 1 Redis keys under {s.redis_prefix!r} at {s.redis_url}"
    ]
    assert not client.exists(f"{s.redis_prefix}user:1")
    assert (s.state_dir / "adapters").exists() and (s.state_dir / "rankers").exists()

    assert main(["reset", "--yes"]) == 0
    assert "nothing to reset" in capsys.readouterr().out
