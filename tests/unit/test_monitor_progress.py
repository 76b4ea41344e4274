"""monitor.progress: a flow's lag and freshness from offsets and timestamps, by hand."""

from __future__ import annotations

from monitor.progress import flow_progress, partition_of, partition_progress


def test_position_is_one_past_the_applied_offset_or_the_first_offset_held() -> None:
    parts = partition_progress(begin={0: 0, 1: 40, 2: 0}, end={0: 10, 1: 50, 2: 7}, applied={0: 9, 2: 3})
    assert [(p.partition, p.position, p.end, p.lag) for p in parts] == [
        (0, 10, 10, 0),  # caught up
        (1, 40, 50, 10),  # nothing applied: everything from the first retained offset waits
        (2, 4, 7, 3),
    ]


def test_an_end_offset_under_reported_by_the_broker_is_no_negative_lag() -> None:
    # Tansu reports the last batch's base offset + 1: the flow can be "past" the end
    (p,) = partition_progress(begin={0: 0}, end={0: 1}, applied={0: 699})
    assert p.lag == 0 and p.position == 700


def test_freshness_is_the_age_of_the_oldest_waiting_message_over_partitions() -> None:
    parts = partition_progress(begin={0: 0, 1: 0, 2: 0}, end={0: 10, 1: 10, 2: 10}, applied={0: 9, 1: 4, 2: 7})
    # partition 0 is caught up: its (stale) timestamp must not count
    got = flow_progress(parts, {0: 1_000, 1: 95_000, 2: 99_500}, now_s=100.0)
    assert got.position == 10 + 5 + 8 and got.lag == 0 + 5 + 2
    assert got.lag_seconds == 5.0
    assert flow_progress(parts, {}, now_s=100.0).lag_seconds == 0.0  # ages unknown: none claimed
    assert flow_progress(parts, {1: 101_000}, now_s=100.0).lag_seconds == 0.0  # a clock ahead: no negative age


def test_partition_of_a_store_field() -> None:
    assert partition_of("freshrec.events:3") == 3 and partition_of("a:b:12") == 12


def test_the_monitor_shows_an_unreachable_source_as_down_and_leaves_its_figures_out() -> None:
    import time

    from prometheus_client import generate_latest

    from freshrec.infra import free_port
    from freshrec.settings import Settings
    from monitor.exporter import monitor_registry

    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    registry, monitor = monitor_registry(settings)
    t0 = time.monotonic()
    text = generate_latest(registry).decode()
    monitor.close()
    assert time.monotonic() - t0 < 10  # within Prometheus's scrape timeout, not kafka-python's 30 s bootstrap
    assert 'freshrec_monitor_up{source="kafka"} 0.0' in text and 'freshrec_monitor_up{source="redis"} 0.0' in text
    assert 'freshrec_monitor_read_errors_total{source="kafka"} 1.0' in text
    assert "freshrec_flow_lag_messages" not in text and "freshrec_topic_messages" not in text  # a gap, not a false 0
