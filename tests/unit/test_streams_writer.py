"""The flows' Redis writer logic without Redis: retry policy, and when the full state is sent."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from redis.exceptions import ConnectionError, ResponseError

from freshrec.settings import Settings
from streams.flow_parts import PartitionLogic
from streams.partition_writer import UserStateWriter
from stores.redis_client import Outcome
from stores.redis_retry import Backoff, with_retry
from tests.unit.test_streams_partition import T0, Msg, new_partition


def events(n: int, user: str = "u1", start: int = 0) -> list[Msg]:
    """``n`` purchases of ``user`` at offsets ``start``, ``start + 1``, ..."""
    return [
        Msg(user.encode(), orjson.dumps({"event_id": f"{user}-{o}", "user_id": user, "item_id": f"i{o % 4}",
                                         "kind": "purchase", "ts": T0 + o}), o)
        for o in range(start, start + n)
    ]


def test_backoff_doubles_from_a_tenth_of_a_second_up_to_the_cap() -> None:
    b = Backoff(cap=1.0)
    assert [b.delay() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    assert b.delay() == 0.1


def test_retry_waits_out_an_outage_with_one_line_at_each_end() -> None:
    calls, lines, sleeps = [], [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) <= 4:
            raise ConnectionError("Connection refused")
        return "ok"

    assert with_retry(flaky, "streams.users: writing", cap=0.3, log=lines.append, sleep=sleeps.append) == "ok"
    assert sleeps == [0.1, 0.2, 0.3, 0.3]
    assert len(lines) == 2 and "Redis unavailable" in lines[0] and "answers again" in lines[1]


def test_retry_does_not_swallow_an_error_reply() -> None:
    def broken() -> None:
        raise ResponseError("WRONGTYPE")

    with pytest.raises(ResponseError):
        with_retry(broken, "x", log=lambda _: None, sleep=lambda _: None)


class _FakeRedisWriter(UserStateWriter):
    """A writer whose 'Redis' is a dict of partition -> applied offset, plus a log of writes."""

    def __init__(self, applied: dict[str, int]) -> None:
        super().__init__(Settings(), "epoch-1", client=object())  # type: ignore[arg-type]
        self.applied = applied
        self.writes: list[tuple[int, int, bool, int]] = []  # (offset, prev, full, users)
        self.down = 0  # calls left that fail as in an outage

    def _store(self, batch: Any, prev_offset: int, full: bool) -> Outcome:
        if self.down:
            self.down -= 1
            raise ConnectionError("down")
        field = f"{batch.topic}:{batch.partition}"
        cur = self.applied.get(field)
        if cur is not None and cur >= batch.last_offset:
            return Outcome.HELD
        if not full and prev_offset >= 0 and (cur is None or cur < prev_offset):
            return Outcome.BEHIND
        self.writes.append((batch.last_offset, prev_offset, full, len(batch.users)))
        self.applied[field] = batch.last_offset
        return Outcome.WRITTEN

    def _applied(self, topic: str, partition: int) -> int | None:
        return self.applied.get(f"{topic}:{partition}")


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("stores.redis_retry.time.sleep", lambda _: None)


def test_a_redis_behind_the_partition_gets_the_full_state_with_the_batch_offset() -> None:
    writer = _FakeRedisWriter({})
    logic = PartitionLogic(new_partition(), writer)
    logic.on_batch(events(3, "u1"))
    logic.on_batch(events(2, "u2", start=3))
    assert writer.writes == [(2, -1, False, 1), (4, 2, False, 1)]
    writer.applied.clear()  # Redis restarted empty
    logic.on_batch(events(1, "u3", start=5))
    # The batch is refused (Redis holds nothing of offsets <= 4), then all 3 users go at once.
    assert writer.writes[-1] == (5, -1, True, 3) and writer.rebuilds == 1


def test_an_idle_check_rebuilds_an_emptied_redis_and_nothing_else() -> None:
    writer = _FakeRedisWriter({})
    logic = PartitionLogic(new_partition(), writer)
    logic.on_notify()
    assert writer.writes == []  # nothing seen: nothing to rebuild
    logic.on_batch(events(3, "u1"))
    logic.on_notify()
    assert len(writer.writes) == 1  # Redis holds it all
    writer.applied.clear()
    logic.on_notify()
    assert writer.writes[-1] == (2, -1, True, 1) and writer.rebuilds == 1
    assert logic.notify_at() is not None


def test_a_replay_behind_redis_is_skipped_and_an_outage_only_delays() -> None:
    writer = _FakeRedisWriter({"ev:0": 10})  # Redis ahead: a restart from an older snapshot
    logic = PartitionLogic(new_partition(), writer)
    logic.on_batch(events(3, "u1"))
    assert writer.writes == [] and writer.skipped == 1
    writer.down = 3
    logic.on_batch(events(10, "u1", start=3))
    assert writer.writes == [(12, 2, False, 1)]


def test_unkeyed_messages_never_reach_redis() -> None:
    writer = _FakeRedisWriter({})
    logic = PartitionLogic(new_partition(), writer)
    msgs = events(2)
    for m in msgs:
        m.key = None
    [batch], _ = logic.on_batch(msgs)
    assert len(batch.dead_letters) == 2 and writer.writes == [(1, -1, False, 0)]
    assert orjson.loads(batch.dead_letters[0].to_bytes())["field"] == "key"
