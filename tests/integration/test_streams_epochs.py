"""Topic epochs in the flows: a recreated topic or a Redis of another epoch stops a flow
with the message that names the fix; nothing is skipped silently (issue 13, item 1)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from freshrec.epochs import topic_ids
from freshrec.infra import create_topics
from freshrec.settings import Settings
from stores import catalog_store, user_store
from streams.flow_process import FlowProcess, wait_applied
from stores.redis_client import EPOCHS, connect
from tests.integration.test_streams_users import _produce, _sample_events

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(fresh_settings: Settings) -> Settings:
    return fresh_settings.model_copy(update={"stream_snapshot_seconds": 0.5})


def _recreate(settings: Settings, topic: str) -> None:
    """Delete ``topic`` and create it again: what a restart of the embedded broker does to every topic."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    for future in admin.delete_topics([topic], operation_timeout=10).values():
        future.result(15)
    deadline = time.monotonic() + 15
    while topic_ids(settings, [topic])[topic] is not None:
        assert time.monotonic() < deadline, "the topic was not deleted"
        time.sleep(0.1)
    create_topics(settings.kafka_bootstrap, [topic], settings.partitions)


def _exit_of(flow: FlowProcess, timeout: float = 60.0) -> tuple[int, str]:
    """The flow's exit status and log; a flow still running after ``timeout`` is killed (and fails the test)."""
    assert flow.proc is not None
    try:
        rc = flow.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        flow.kill()
        raise AssertionError(f"the flow kept running instead of stopping:\n{flow.log_tail()}") from None
    return rc, flow.log_tail(20_000)


def _assert_stopped_with_the_fix(rc: int, log: str, where: str) -> None:
    assert rc not in (0, 130), log
    assert "was recreated" in log and "freshrec reset" in log and where in log, log
    assert "Traceback" not in log and "panicked" not in log, log


def test_a_recreated_topic_stops_the_restarted_flow_instead_of_skipping(settings: Settings, sample_dir: Path) -> None:
    events = _sample_events(sample_dir, 200)
    sent = _produce(settings, events)
    before = topic_ids(settings, [settings.topics.events])[settings.topics.events]
    with FlowProcess(settings, "users", log=settings.state_dir / "run1.log") as flow:
        wait_applied(settings, "users", sent, timeout=60, procs=[flow])
        time.sleep(1.0)  # let a snapshot with the offsets land
    _recreate(settings, settings.topics.events)
    after = topic_ids(settings, [settings.topics.events])[settings.topics.events]
    assert after is not None and after != before
    _produce(settings, events[:20])  # new events at offsets 0.. that the old positions would skip
    rc, log = _exit_of(FlowProcess(settings, "users", log=settings.state_dir / "run2.log").start())
    _assert_stopped_with_the_fix(rc, log, "streams/users")
    # Without the recovery directory, Redis's epoch stops it the same way.
    fresh_dir = settings.model_copy(update={"state_dir": settings.state_dir / "other"})
    rc, log = _exit_of(FlowProcess(fresh_dir, "users", log=settings.state_dir / "run3.log").start())
    _assert_stopped_with_the_fix(rc, log, EPOCHS)


@pytest.mark.parametrize("flow_name", ["users", "catalog"])
def test_a_redis_of_another_epoch_stops_the_flow(settings: Settings, flow_name: str) -> None:
    topic = settings.topics.events if flow_name == "users" else settings.topics.catalog
    slots = user_store.epoch_slots(settings) if flow_name == "users" else catalog_store.epoch_slots(settings)
    connect(settings).hset(slots[-1][0], topic, "an-older-topic-id")
    rc, log = _exit_of(FlowProcess(settings, flow_name).start())
    _assert_stopped_with_the_fix(rc, log, EPOCHS)
    assert "an-older-topic-id" in log


def test_redis_switching_epoch_while_running_stops_the_flow_at_its_next_write(settings: Settings) -> None:
    client = connect(settings)
    event = {"event_id": "e0", "user_id": "u1", "item_id": "i1", "kind": "view", "ts": 1_300_000_000.0}
    _produce(settings, [event])
    flow = FlowProcess(settings, "users").start()
    try:
        wait_applied(settings, "users", 1, timeout=60, procs=[flow])
        # Another deployment's Redis now answers at this address (or someone recreated the
        # topic and reset Redis only): the flow's next write must not land in it.
        for key, _ in user_store.epoch_slots(settings):
            client.hset(key, settings.topics.events, "someone-elses-topic-id")
        _produce(settings, [event | {"event_id": "e1", "ts": 1_300_000_001.0}])
        rc, log = _exit_of(flow)
    finally:
        flow.stop()
    assert rc not in (0, 130) and "someone-elses-topic-id" in log and "freshrec reset" in log, log
    assert user_store.read_user_state(client, settings, "u1").events == 1  # type: ignore[union-attr]
    assert sum(user_store.read_applied_offsets(client, settings).values()) == 0  # the first event's offset, no more


def test_redis_offsets_stored_without_an_epoch_stop_the_flow(settings: Settings) -> None:
    # What a Redis written before epochs existed holds: offsets nobody can vouch for.
    applied = user_store.partition_key(settings, settings.topics.events, 0, user_store.APPLIED_USERS)
    connect(settings).hset(applied, f"{settings.topics.events}:0", 17_000)
    rc, log = _exit_of(FlowProcess(settings, "users").start())
    _assert_stopped_with_the_fix(rc, log, EPOCHS)
    assert "unknown" in log


def test_a_users_flow_whose_partition_count_differs_from_the_topic_refuses_to_start(settings: Settings) -> None:
    """The events topic has 4 partitions; a flow configured for 2 would write most shoppers
    where readers (murmur2 % 2) never look: it stops at once and names the fix."""
    wrong = settings.model_copy(update={"partitions": 2})
    rc, log = _exit_of(FlowProcess(wrong, "users").start())
    assert rc == 1, log
    assert "has 4 partitions, but FRESHREC_PARTITIONS=2" in log and "Set FRESHREC_PARTITIONS=4" in log
    assert "Traceback" not in log
    assert user_store.read_applied_offsets(connect(settings), settings) == {}
