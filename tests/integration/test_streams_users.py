"""The user-state flow against the real broker and Redis.

The expected state is always a plain in-memory computation (``replay_events``) over the
same events in file order: one user's events are in one partition, in produce order, so
that is exactly the order the flow sees them in.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from freshrec.contracts import DeadLetter, Event, TrainPair, parse_event
from freshrec.dataset import locate, read_events
from freshrec.infra import free_port
from freshrec.producer import RecordProducer
from freshrec.settings import Settings
from stores import user_store
from streams.flow_process import FlowProcess, wait_applied
from streams.user_partition import UserPartition
from ranking.pairs import PairRules, pair_for
from stores.redis_client import connect
from ranking.user_state import DAY_S, Popularity, StateRules, UserState, apply_event, popularity_weight
from tests.integration.helpers import read_topic
from tests.unit.test_streams_partition import Msg

pytestmark = pytest.mark.integration

N_EVENTS = 20_000
BAD_RECORDS: list[tuple[bytes | None, bytes]] = [
    (b"u-bad", b"{not json"),
    (b"u-bad", orjson.dumps({"event_id": "x1", "user_id": "u-bad", "kind": "teleport", "item_id": "i", "ts": 1.0})),
    (b"u-bad", orjson.dumps({"event_id": "x2", "user_id": "u-bad", "kind": "click", "ts": 1.0})),
    (b"someone-else", orjson.dumps({"event_id": "x3", "user_id": "u-bad", "kind": "click", "item_id": "i", "ts": 1.0})),
]


def _sample_events(sample_dir: Path, limit: int) -> list[dict[str, Any]]:
    files = locate(sample_dir)
    return list(itertools.islice(read_events(files.events, files.name), limit))


def _produce(settings: Settings, events: list[dict[str, Any]], bad_every: int = 0) -> int:
    """Send events (and, every ``bad_every`` events, one malformed record); return count sent."""
    n = 0
    with RecordProducer(settings, client_id="test-streams") as producer:
        bad = itertools.cycle(BAD_RECORDS)
        for i, event in enumerate(events):
            producer.send(settings.topics.events, event["user_id"], orjson.dumps(event))
            n += 1
            if bad_every and i % bad_every == bad_every // 2:
                key, value = next(bad)
                producer.send(settings.topics.events, key, value)
                n += 1
        report = producer.flush()
    assert report.failed == 0, report.errors
    return n


def _reference(settings: Settings, events: list[dict[str, Any]]) -> tuple[dict[str, UserState], Popularity, int]:
    rules = StateRules.from_settings(settings)
    pair_rules = PairRules.from_settings(settings)
    states: dict[str, UserState] = {}
    pop = Popularity(settings.popularity_half_life_days * DAY_S)
    pairs = 0
    for raw in events:
        event = parse_event(raw)
        state = states.setdefault(event.user_id, UserState(event.user_id))
        weight = popularity_weight(state, event)
        if not apply_event(state, event, rules):
            continue
        pop.observe(event.ts)
        if event.item_id is not None:
            pop.see(event.item_id, event.ts)
        if weight:
            pop.add(event.item_id, weight, event.ts)  # type: ignore[arg-type]
        pairs += pair_for(state, event, pair_rules) is not None
    return states, pop, pairs


def _redis_states(settings: Settings) -> dict[str, UserState]:
    client = connect(settings)
    return user_store.read_user_states(client, settings, user_store.scan_user_ids(client, settings))


def _assert_states_equal(got: dict[str, UserState], want: dict[str, UserState]) -> None:
    assert got.keys() == want.keys()
    diff = [u for u in want if got[u] != want[u]]
    assert not diff, f"{len(diff)} users differ, e.g. {diff[0]}: {got[diff[0]]} != {want[diff[0]]}"


@pytest.fixture
def settings(fresh_settings: Settings) -> Settings:
    # Short epochs so snapshots happen within a test's few seconds.
    return fresh_settings.model_copy(update={"stream_snapshot_seconds": 0.5})


def test_replay_equals_in_memory_reference_and_bad_records_go_to_dead_letter(
    settings: Settings, sample_dir: Path
) -> None:
    events = _sample_events(sample_dir, N_EVENTS)
    sent = _produce(settings, events, bad_every=N_EVENTS // 8)
    n_bad = sent - len(events)
    assert n_bad == 8
    want, want_pop, want_pairs = _reference(settings, events)
    with FlowProcess(settings, "users") as flow:
        wait_applied(settings, "users", sent, timeout=90, procs=[flow])
        flow.check_alive()  # malformed records did not stop it
        _assert_states_equal(_redis_states(settings), want)

        pops = user_store.read_popularity(connect(settings), settings)
        expect_pop = want_pop.scores()
        assert pops.keys() == expect_pop.keys()
        assert all(pops[i] == pytest.approx(expect_pop[i], rel=1e-9, abs=1e-12) for i in expect_pop)
        assert user_store.read_item_first_seen(connect(settings), settings) == want_pop.first_seen

        letters = [DeadLetter.from_bytes(v) for v in read_topic(settings, settings.topics.dead_letter, n_bad)]
        assert len(letters) == n_bad
        assert {d.stage for d in letters} == {"streams.users"}
        assert {d.field for d in letters} == {"record", "kind", "item_id", "key"}
        assert all(d.source_topic == settings.topics.events and d.reason for d in letters)

        pairs = [TrainPair.model_validate_json(v) for v in read_topic(settings, settings.topics.train_pairs, want_pairs)]
        assert len(pairs) == want_pairs and len({p.pair_id for p in pairs}) == want_pairs


def _produce_paced(settings: Settings, events: list[dict[str, Any]], rate: float) -> threading.Thread:
    """Produce in the background at about ``rate`` events/s (so a kill lands mid-stream)."""

    def run() -> None:
        with RecordProducer(settings, client_id="test-streams-paced") as producer:
            t0 = time.monotonic()
            for i, event in enumerate(events):
                if i % 100 == 0:
                    delay = t0 + i / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                producer.send(settings.topics.events, event["user_id"], orjson.dumps(event))
            assert producer.flush().failed == 0

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigkill_three_times_during_replay_loses_and_doubles_nothing(settings: Settings, sample_dir: Path) -> None:
    # Snapshots every 2 s while events stream in: a kill almost surely lands after some
    # Redis writes that no snapshot covers yet, the case the offset guard exists for.
    settings = settings.model_copy(update={"stream_snapshot_seconds": 2.0})
    events = _sample_events(sample_dir, N_EVENTS)
    want, _, _ = _reference(settings, events)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    quarter = N_EVENTS // 4
    chunks = [events[i : i + quarter] for i in range(0, N_EVENTS, quarter)]
    client = connect(settings)
    logs = [settings.state_dir / f"run{i}.log" for i in range(4)]
    flow = FlowProcess(settings, "users", log=logs[0]).start()
    try:
        for k, chunk in enumerate(chunks[:3]):
            before = sum(user_store.read_applied_offsets(client, settings).values())
            producer = _produce_paced(settings, chunk, rate=4000)
            # Wait until this chunk is being applied, then kill at a random moment.
            start = time.monotonic()
            while sum(user_store.read_applied_offsets(client, settings).values()) <= before:
                flow.check_alive()
                assert time.monotonic() - start < 60, flow.log_tail()
                time.sleep(0.01)
            time.sleep(rng.uniform(0.05, 0.8))
            flow.kill()
            producer.join(60)
            flow = FlowProcess(settings, "users", log=logs[k + 1]).start()
        sent = N_EVENTS - len(chunks[3]) + _produce(settings, chunks[3])
        wait_applied(settings, "users", sent, timeout=120, procs=[flow])
        _assert_states_equal(_redis_states(settings), want)
        replays = sum(p.read_text().count("replaying offsets already in Redis") for p in logs[1:])
        assert replays > 0, "no restart replayed writes that Redis already held: the guard was not exercised"
    except AssertionError as exc:
        raise AssertionError(f"{exc} (random seed {seed})") from None
    finally:
        flow.stop()


def test_duplicate_event_ids_are_applied_once(settings: Settings) -> None:
    events = [
        {"event_id": f"d{i}", "user_id": "u1", "item_id": f"i{i % 3}", "kind": "purchase", "ts": 1_300_000_000.0 + i}
        for i in range(10)
    ]
    # A producer retry: the same events again, at new offsets.
    sent = _produce(settings, events + events[5:])
    with FlowProcess(settings, "users", ["--no-recovery"]) as flow:
        wait_applied(settings, "users", sent, timeout=60, procs=[flow])
    state = user_store.read_user_state(connect(settings), settings, "u1")
    want = UserState("u1")
    for e in events:
        apply_event(want, Event.model_validate(e), StateRules.from_settings(settings))
    assert state == want and state is not None and state.events == 10


def _copy(settings: Settings, tag: str) -> Settings:
    return settings.model_copy(
        update={"redis_prefix": f"{settings.redis_prefix}{tag}:", "state_dir": settings.state_dir / tag}
    )


def test_two_workers_and_two_processes_give_the_same_state_as_one(settings: Settings, sample_dir: Path) -> None:
    events = _sample_events(sample_dir, N_EVENTS)
    sent = _produce(settings, events, bad_every=N_EVENTS // 4)
    want, _, _ = _reference(settings, events)

    one = _copy(settings, "w1")
    with FlowProcess(one, "users") as flow:
        wait_applied(one, "users", sent, timeout=90, procs=[flow])
    two = _copy(settings, "w2")
    with FlowProcess(two, "users", ["-w", "2"]) as flow:
        wait_applied(two, "users", sent, timeout=90, procs=[flow])
    # Two processes of one worker each, through Bytewax's own runner and flags.
    procs_settings = _copy(settings, "p2")
    addresses = f"127.0.0.1:{free_port()};127.0.0.1:{free_port()}"
    procs = [
        FlowProcess(procs_settings, "users", ["-i", str(i), "-a", addresses], bytewax_run=True,
                    log=procs_settings.state_dir / f"proc{i}.log").start()
        for i in range(2)
    ]
    try:
        wait_applied(procs_settings, "users", sent, timeout=90, procs=procs)
    finally:
        for p in procs:
            p.stop()

    got_one = _redis_states(one)
    _assert_states_equal(got_one, want)
    _assert_states_equal(_redis_states(two), got_one)
    _assert_states_equal(_redis_states(procs_settings), got_one)
    assert user_store.read_popularity(connect(two), two) == user_store.read_popularity(connect(one), one)
    assert user_store.read_item_first_seen(connect(two), two) == user_store.read_item_first_seen(connect(one), one)


def _bounded_reference(settings: Settings, events: list[dict[str, Any]]) -> list[UserPartition]:
    """Each partition's pure state over its own events in produce order: what retention
    forgets depends on that order only, not on batching or restarts."""
    parts = [UserPartition.from_settings(settings) for _ in range(settings.partitions)]
    offsets = [0] * settings.partitions
    by_part: list[list[Any]] = [[] for _ in range(settings.partitions)]
    for raw in events:
        p = user_store.user_partition(settings, raw["user_id"])
        by_part[p].append(Msg(raw["user_id"].encode(), orjson.dumps(raw), offsets[p], settings.topics.events, p, None))
        offsets[p] += 1
    for part, msgs in zip(parts, by_part, strict=True):
        part.apply(msgs)
    return parts


def test_bounded_state_forgets_in_redis_what_the_flow_forgets_across_a_sigkill(
    settings: Settings, sample_dir: Path
) -> None:
    """Retention 5 days and a 150-entry popularity top-N over ~23 days of events: Redis
    ends equal to the pure partitions (users, popularity entries, first-seen times), with
    a SIGKILL and a replay in between."""
    settings = settings.model_copy(
        update={"stream_snapshot_seconds": 1.0, "stream_retention_days": 5.0, "stream_popularity_items": 150}
    )
    events = _sample_events(sample_dir, N_EVENTS)
    parts = _bounded_reference(settings, events)
    want = {u: s for part in parts for u, s in part.users().items()}
    assert 0 < len(want) < len({e["user_id"] for e in events})  # the rule did forget shoppers
    # Every event is a purchase here, so fewer popularity entries than first-seen items means the top-N cut fired.
    assert any(len(p.popularity.entries) < len(p.popularity.first_seen) for p in parts)
    client = connect(settings)
    flow = FlowProcess(settings, "users").start()
    try:
        producer = _produce_paced(settings, events[: N_EVENTS // 2], rate=4000)
        start = time.monotonic()
        while sum(user_store.read_applied_offsets(client, settings).values()) < N_EVENTS // 8:
            flow.check_alive()
            assert time.monotonic() - start < 60, flow.log_tail()
            time.sleep(0.01)
        flow.kill()
        producer.join(60)
        flow = FlowProcess(settings, "users").start()
        sent = N_EVENTS // 2 + _produce(settings, events[N_EVENTS // 2 :])
        wait_applied(settings, "users", sent, timeout=120, procs=[flow])
        _assert_states_equal(_redis_states(settings), want)
        ev = settings.topics.events
        for p, part in enumerate(parts):
            pop = client.hgetall(user_store.partition_key(settings, ev, p, user_store.POPULARITY))
            assert {k.decode(): tuple(orjson.loads(v)) for k, v in pop.items()} == part.popularity.entries
            assert len(pop) <= 150 + 200  # cut back once a day
            seen = client.hgetall(user_store.partition_key(settings, ev, p, user_store.FIRST_SEEN))
            assert {k.decode(): float(v) for k, v in seen.items()} == part.popularity.first_seen
    finally:
        flow.stop()
