"""Followers never skip: the resume bookkeeping, the backoff and the loop (pure logic, a stand-in follower)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from freshrec.consumer import AppliedPositions, Backoff, Message, Start, follow_resuming


def _m(partition: int, offset: int) -> Message:
    return Message(partition, offset, None, f"{partition}:{offset}".encode(), 0)


def test_applied_positions_resume_after_the_last_applied_record() -> None:
    pos = AppliedPositions()
    assert pos.resume("end") == "end"  # never opened: the caller's start
    pos.seed({0: 10, 1: 4})
    pos.applied([_m(0, 10), _m(0, 11), _m(1, 4)])
    pos.seed({0: 99, 1: 99, 2: 7})  # a reopen's positions never move known partitions
    assert pos.resume("end") == {0: 12, 1: 5, 2: 7}
    pos.applied([_m(0, 3)])  # an older record (a re-applied batch) does not move back
    assert pos.resume("end")[0] == 12


def test_backoff_doubles_up_to_its_cap_and_reports_the_outage() -> None:
    b = Backoff(first_s=0.5, cap_s=4.0)
    assert b.succeeded(1.0) is None  # no outage, nothing to report
    assert [b.failed(10.0 + i) for i in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.outage_s(20.0) == 10.0
    assert b.succeeded(25.0) == 15.0
    assert b.outage_s(26.0) == 0.0 and b.failures == 0
    assert b.failed(30.0) == 0.5  # a new outage starts from the first pause


class Log:
    """What a broker would hold: records per partition; followers read from their start."""

    def __init__(self, records: dict[int, int]) -> None:
        self.ends = dict(records)
        self.opened: list[Start] = []

    def produce(self, partition: int, n: int = 1) -> None:
        self.ends[partition] += n


class StandInFollower:
    """Reads the :class:`Log` from its start, ``batch`` records per poll; may fail on a poll."""

    def __init__(self, log: Log, start: Start, fail_on_poll: int | None = None, batch: int = 2) -> None:
        self.log = log
        self.pos = dict(log.ends) if start == "end" else {p: 0 for p in log.ends} if start == "beginning" else dict(start)
        self.fail_on_poll = fail_on_poll
        self.batch = batch
        self.polls = 0
        self.closed = False

    def positions(self) -> dict[int, int]:
        return dict(self.pos)

    def poll(self, timeout_s: float) -> list[Message]:
        self.polls += 1
        if self.polls == self.fail_on_poll:
            raise ConnectionError("broker went away")
        out = []
        for p in sorted(self.pos):
            while self.pos[p] < self.log.ends[p] and len(out) < self.batch:
                out.append(_m(p, self.pos[p]))
                self.pos[p] += 1
        return out

    def close(self) -> None:
        self.closed = True


@pytest.mark.timeout(10)
def test_resumes_at_the_applied_offsets_retries_the_failed_batch_and_reads_what_came_meanwhile() -> None:
    """The old loop reopened at the end: the failed batch and the records produced during
    the outage were lost. Here every record after the start is applied once, in order."""
    log = Log({0: 5, 1: 3})  # records before the follower starts at the end
    stop = threading.Event()
    applied: list[tuple[int, int]] = []
    errors: list[str] = []
    recovered: list[int] = []
    apply_failed = False
    followers: list[StandInFollower] = []

    def open_at(start: Start) -> StandInFollower:
        log.opened.append(start)
        f = StandInFollower(log, start, fail_on_poll=2 if len(followers) == 1 else None)  # the 2nd loses the broker
        followers.append(f)
        if len(followers) == 1:
            log.produce(0, 3)  # 5, 6, 7
            log.produce(1, 1)  # 3
        return f

    def on_batch(_f: Any, batch: list[Message]) -> None:
        nonlocal apply_failed
        if (1, 3) in [(m.partition, m.offset) for m in batch] and not apply_failed:
            apply_failed = True
            raise RuntimeError("redis down while applying")
        applied.extend((m.partition, m.offset) for m in batch)
        if not batch and len(applied) == 6:
            stop.set()

    def on_error(exc: Exception, backoff: Backoff, pause_s: float) -> None:
        errors.append(type(exc).__name__)
        if isinstance(exc, ConnectionError):
            log.produce(1, 2)  # arrives while the follower is away

    follow_resuming(
        stop, open_at, "end", on_batch, on_error, lambda s, n: recovered.append(n),  # type: ignore[arg-type]
        poll_s=0.0, backoff=Backoff(first_s=0.0, cap_s=0.0),
    )

    assert log.opened == ["end", {0: 7, 1: 3}, {0: 8, 1: 4}]  # never the end again
    assert errors == ["RuntimeError", "ConnectionError"]
    assert applied == [(0, 5), (0, 6), (0, 7), (1, 3), (1, 4), (1, 5)]
    assert recovered == [1, 1]
    assert all(f.closed for f in followers)


def test_a_failing_open_retries_with_growing_pauses_until_stopped() -> None:
    stop = threading.Event()
    pauses: list[float] = []

    def open_at(start: Start) -> StandInFollower:
        raise ConnectionError("no broker")

    def on_error(exc: Exception, backoff: Backoff, pause_s: float) -> None:
        pauses.append(pause_s)
        if len(pauses) == 4:
            stop.set()

    follow_resuming(stop, open_at, "end", lambda f, b: None, on_error, backoff=Backoff(first_s=0.001, cap_s=0.004))  # type: ignore[arg-type]
    assert pauses == [0.001, 0.002, 0.004, 0.004]


# -- applying twice is harmless --------------------------------------------------------------


def _applier(dim: int = 8) -> Any:
    from freshrec.contracts import CatalogItem
    from models.live_index import LiveIndex
    from serving.pair import ActivePair
    from serving.vectors import VectorApplier

    pair = _pair(LiveIndex(dim, "v1"))
    active = ActivePair(pair)
    catalog = {f"i{n}": CatalogItem(item_id=f"i{n}", title=f"item {n}") for n in range(5)}
    return VectorApplier(active, None, lambda ids: {i: catalog[i] for i in ids if i in catalog}), pair


def _pair(index: Any) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(adapter_version="v1", index=index, texts={}, encoder=None)


def _vec(seed: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_applying_a_batch_twice_leaves_the_same_index() -> None:
    from freshrec.contracts import ItemVector

    applier, pair = _applier()
    batch = [ItemVector("i0", "v1", _vec(0)), ItemVector("i1", "v1", _vec(1)), ItemVector("i0", "v1", _vec(2)),
             ItemVector("i2", "v1", _vec(3)), ItemVector("i2", "v1", None)]
    applier.apply(batch)
    once = {i: pair.index.reconstruct(i) for i in pair.index.item_ids()}
    applier.apply(batch)  # the retry after a failure later in the batch
    twice = {i: pair.index.reconstruct(i) for i in pair.index.item_ids()}
    assert sorted(once) == sorted(twice) == ["i0", "i1"] and len(pair.index) == 2
    for i in once:
        np.testing.assert_array_equal(once[i], twice[i])
    np.testing.assert_allclose(twice["i0"], _vec(2), atol=1e-6)  # the latest vector of i0


def test_a_vector_the_index_cannot_take_is_dropped_not_retried_forever() -> None:
    from freshrec.contracts import ItemVector

    applier, pair = _applier(dim=8)
    bad_dim = ItemVector("i0", "v1", np.ones(5, dtype=np.float32))
    nan = ItemVector("i1", "v1", np.full(8, np.nan, dtype=np.float32))
    applier.apply([bad_dim, nan, ItemVector("i3", "v1", _vec(4))])  # raises nothing
    assert applier.invalid == 2
    assert pair.index.item_ids() == ["i3"]


def test_a_failing_re_read_raises_so_the_follower_retries_the_batch() -> None:
    """The old follower swallowed this and moved on: the batch's catalog re-read was lost."""
    from freshrec.contracts import ItemVector
    from models.live_index import LiveIndex
    from serving.pair import ActivePair
    from serving.vectors import VectorApplier

    active = ActivePair(_pair(LiveIndex(8, "v1")))

    def redis_down(ids: Any) -> dict[str, Any]:
        raise ConnectionError("redis down")

    with pytest.raises(ConnectionError):
        VectorApplier(active, None, redis_down).apply([ItemVector("i0", "v1", _vec(0))])


def test_serving_exports_each_followers_outage_and_errors(tmp_path: Any) -> None:
    """An outage is visible on /metrics while it lasts, not only in the log."""
    from freshrec.infra import free_port
    from freshrec.settings import Settings
    from serving.runtime import ServingRuntime
    from serving.testing import CatalogTwin, hash_tools

    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", state_dir=tmp_path / "state")
    runtime = ServingRuntime(settings, tools=hash_tools(CatalogTwin({})), follow_topics=False)
    assert 'freshrec_follower_outage_seconds{topic="adapters"} 0.0' in runtime.metrics.render().decode()
    runtime.adapter_backoff.failed(0.0)  # a failure at monotonic time 0: an outage of "uptime" seconds
    runtime.adapter_errors += 1
    text = runtime.metrics.render().decode()
    assert 'freshrec_follower_errors{topic="adapters"} 1.0' in text
    assert 'freshrec_follower_outage_seconds{topic="adapters"} 0.0' not in text
