"""What the users flow accepts: keyed events only, each event once (issue 13, items 3 and 6)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from freshrec.contracts import DeadLetter
from freshrec.settings import Settings
from stores import catalog_store, user_store
from streams.flow_process import FlowProcess, wait_applied
from stores.redis_client import connect
from tests.integration.helpers import read_topic
from tests.integration.test_streams_users import (
    _assert_states_equal, _produce, _redis_states, _reference, _sample_events,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(fresh_settings: Settings) -> Settings:
    return fresh_settings.model_copy(update={"stream_snapshot_seconds": 0.5})


def _one_user(n: int) -> list[dict[str, object]]:
    return [
        {"event_id": f"u7-{i}", "user_id": "u7", "item_id": f"i{i % 5}", "kind": "purchase" if i % 3 else "view",
         "ts": 1_300_000_000.0 + i}
        for i in range(n)
    ]


def test_unkeyed_events_spread_over_partitions_all_go_to_dead_letter(settings: Settings) -> None:
    events = _one_user(40)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for i, event in enumerate(events):  # what a producer without keys does: round robin
        producer.produce(settings.topics.events, value=orjson.dumps(event), partition=i % settings.partitions)
    assert producer.flush(15) == 0
    with FlowProcess(settings, "users", ["--no-recovery"]) as flow:
        wait_applied(settings, "users", len(events), timeout=60, procs=[flow])
        letters = [DeadLetter.from_bytes(v) for v in read_topic(settings, settings.topics.dead_letter, len(events))]
    assert len(letters) == 40 and {d.field for d in letters} == {"key"}
    assert all("keyed by user_id" in d.reason for d in letters)
    assert sorted(orjson.loads(d.raw)["event_id"] for d in letters) == sorted(e["event_id"] for e in events)
    assert user_store.read_user_state(connect(settings), settings, "u7") is None


def test_the_same_events_keyed_end_in_the_reference_state(settings: Settings) -> None:
    events = _one_user(40)
    sent = _produce(settings, events)
    want, _, _ = _reference(settings, events)
    with FlowProcess(settings, "users", ["--no-recovery"]) as flow:
        wait_applied(settings, "users", sent, timeout=60, procs=[flow])
    _assert_states_equal(_redis_states(settings), want)
    assert want["u7"].events == 40


def test_replaying_the_same_file_twice_leaves_redis_as_replaying_it_once(settings: Settings, sample_dir: Path) -> None:
    events = _sample_events(sample_dir, 5000)
    want, want_pop, _ = _reference(settings, events)
    assert max(s.events for s in want.values()) > settings.stream_dedupe_ids  # beyond the per-user window
    sent = _produce(settings, events)
    with FlowProcess(settings, "users", log=settings.state_dir / "run1.log") as flow:
        wait_applied(settings, "users", sent, timeout=90, procs=[flow])
    # The same file again, to a flow restarted in between (the window is in the snapshot).
    sent += _produce(settings, events)
    with FlowProcess(settings, "users", log=settings.state_dir / "run2.log") as flow:
        wait_applied(settings, "users", sent, timeout=90, procs=[flow])
    _assert_states_equal(_redis_states(settings), want)
    client = connect(settings)
    pops, expect = user_store.read_popularity(client, settings), want_pop.scores()
    assert pops.keys() == expect.keys()
    assert all(pops[i] == pytest.approx(expect[i], rel=1e-9, abs=1e-12) for i in expect)
    assert user_store.read_item_first_seen(client, settings) == want_pop.first_seen


def test_unkeyed_catalog_records_go_to_dead_letter(settings: Settings) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    records = [{"item_id": f"i{i}", "title": f"Item {i}"} for i in range(8)]
    for i, record in enumerate(records):
        producer.produce(settings.topics.catalog, value=orjson.dumps(record), partition=i % settings.partitions)
    assert producer.flush(15) == 0
    with FlowProcess(settings, "catalog", ["--no-recovery"]) as flow:
        wait_applied(settings, "catalog", len(records), timeout=60, procs=[flow])
        letters = [DeadLetter.from_bytes(v) for v in read_topic(settings, settings.topics.dead_letter, len(records))]
    assert len(letters) == 8 and all(d.field == "key" and "keyed by item_id" in d.reason for d in letters)
    assert catalog_store.all_items(connect(settings), settings) == {}
