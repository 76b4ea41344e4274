"""``freshrec topics`` (kafka-init in docker-compose.yml) on the real broker: it creates
exactly the settings' topics with the compose file's partition count, leaves existing
ones alone, and names a partition count that differs."""

from __future__ import annotations

import uuid

import pytest
import yaml
from confluent_kafka.admin import AdminClient, NewTopic

from console.cli import main as freshrec
from freshrec.infra import Stack
from freshrec.kafka_security import librdkafka_options
from freshrec.settings import Settings
from freshrec.topics import ensure_topics
from tests.unit.test_deploy import COMPOSE

pytestmark = pytest.mark.integration


def _partitions(settings: Settings) -> dict[str, int]:
    meta = AdminClient(librdkafka_options(settings)).list_topics(timeout=10)
    return {t: len(m.partitions) for t, m in meta.topics.items() if t.startswith(settings.topic_prefix)}


def test_topics_are_created_from_the_settings_with_the_compose_partition_count(stack: Stack) -> None:
    partitions = int(yaml.safe_load(COMPOSE.read_text())["x-freshrec"]["environment"]["FRESHREC_PARTITIONS"])
    settings = Settings(kafka_bootstrap=stack.bootstrap, topic_prefix=f"k{uuid.uuid4().hex[:8]}.", partitions=partitions)
    report = ensure_topics(settings, timeout=20)
    assert sorted(report.created) == sorted(settings.topics.all()) and report.existing == {}
    assert _partitions(settings) == {t: partitions for t in settings.topics.all()}
    again = ensure_topics(settings, timeout=20)
    assert again.created == [] and again.existing == {t: partitions for t in settings.topics.all()}


def test_an_existing_topic_with_another_partition_count_is_named_and_exits_1(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"k{uuid.uuid4().hex[:8]}."
    settings = Settings(kafka_bootstrap=stack.bootstrap, topic_prefix=prefix, partitions=4)
    admin = AdminClient(librdkafka_options(settings))
    admin.create_topics([NewTopic(settings.topics.events, 2, 1)])[settings.topics.events].result(20)
    monkeypatch.setenv("FRESHREC_KAFKA_BOOTSTRAP", stack.bootstrap)
    monkeypatch.setenv("FRESHREC_TOPIC_PREFIX", prefix)
    monkeypatch.setenv("FRESHREC_PARTITIONS", "4")
    assert freshrec(["topics", "--timeout", "20"]) == 1
    err = capsys.readouterr().err
    assert f"{settings.topics.events} has 2 partitions, not FRESHREC_PARTITIONS=4" in err
    assert _partitions(settings) == {t: 2 if t == settings.topics.events else 4 for t in settings.topics.all()}
