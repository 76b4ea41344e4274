"""Create freshrec's topics on any Kafka, from the settings the code reads them from.

``freshrec topics`` (and the ``kafka-init`` service of ``docker-compose.yml``) call
:func:`ensure_topics`, so the topic names (``settings.topics``, under ``topic_prefix``) and
the partition count (``settings.partitions``) of a deployment are the ones every process
computes its keys and Redis slots from; nothing keeps a second list. It goes through
:mod:`freshrec.kafka_security`, so it works on a TLS/SASL Kafka too (``freshrec up``'s
embedded broker uses :func:`freshrec.infra.create_topics` instead).

Example::

    FRESHREC_KAFKA_BOOTSTRAP=kafka:9092 FRESHREC_PARTITIONS=8 freshrec topics --replication-factor 3
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .kafka_security import librdkafka_options
from .settings import Settings


class TopicError(RuntimeError):
    """The broker could not be reached, or refused to create a topic."""


class PartitionCountMismatch(RuntimeError):
    """The events topic's partition count is not ``settings.partitions``.

    Readers find a shopper's state under murmur2(user id) modulo ``settings.partitions``
    (:func:`stores.user_store.user_partition`), while the users flow writes it under the
    partition the events came from: with another count, most shoppers would be written
    where nobody looks. The users flow refuses to start instead.
    """

    def __init__(self, topic: str, actual: int, configured: int) -> None:
        self.topic, self.actual, self.configured = topic, actual, configured
        super().__init__(
            f"topic {topic!r} has {actual} partitions, but FRESHREC_PARTITIONS={configured}: readers look a "
            f"shopper up in partition murmur2(user id) % {configured}, so most states would be written where "
            f"nobody reads them. Set FRESHREC_PARTITIONS={actual} for every freshrec process (a new partition "
            "count also needs `freshrec reset` and a replay, since it moves shoppers between partitions)"
        )


def check_partition_count(settings: Settings, topic: str | None = None, timeout: float = 10.0) -> int | None:
    """The partition count of ``topic`` (default: the events topic), or None if the broker
    does not know the topic (yet); raise :class:`PartitionCountMismatch` if it is not
    ``settings.partitions``."""
    from confluent_kafka import TopicCollection
    from confluent_kafka.admin import AdminClient

    topic = topic or settings.topics.events
    admin = AdminClient(librdkafka_options(settings))
    future = admin.describe_topics(TopicCollection([topic]), request_timeout=timeout)[topic]
    try:
        description = future.result(timeout)
    except Exception:  # unknown topic (KafkaException UNKNOWN_TOPIC_OR_PART), or no broker yet
        return None
    actual = len(description.partitions)
    if actual != settings.partitions:
        raise PartitionCountMismatch(topic, actual, settings.partitions)
    return actual


@dataclass
class TopicReport:
    created: list[str] = field(default_factory=list)
    existing: dict[str, int] = field(default_factory=dict)  # name -> its partition count

    def mismatched(self, partitions: int) -> dict[str, int]:
        """Existing topics whose partition count is not ``partitions`` (left as they are)."""
        return {t: n for t, n in self.existing.items() if n != partitions}


def ensure_topics(settings: Settings, replication_factor: int = 1, timeout: float = 60.0) -> TopicReport:
    """Create every topic of ``settings.topics`` that is missing, with ``settings.partitions``
    partitions and ``replication_factor`` replicas; existing topics are left as they are
    (their partition counts are reported: a different count changes which partition a
    shopper's events land in, so fix it before any event is produced).

    Waits up to ``timeout`` seconds for the broker; raises :class:`TopicError` when it
    does not answer or refuses a creation (e.g. more replicas than brokers).
    """
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(librdkafka_options(settings))
    deadline = time.monotonic() + timeout
    while True:
        try:
            meta = admin.list_topics(timeout=min(5.0, timeout))
            break
        except Exception as exc:  # KafkaException: broker not (yet) reachable
            if time.monotonic() > deadline:
                raise TopicError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}") from None
            time.sleep(1.0)
    report = TopicReport()
    wanted = settings.topics.all()
    for name in wanted:
        if name in meta.topics and meta.topics[name].error is None:
            report.existing[name] = len(meta.topics[name].partitions)
    new = [NewTopic(t, settings.partitions, replication_factor) for t in wanted if t not in report.existing]
    for name, future in (admin.create_topics(new, request_timeout=timeout).items() if new else []):
        try:
            future.result()
            report.created.append(name)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" in str(exc):  # another kafka-init won the race
                report.existing[name] = settings.partitions
                continue
            raise TopicError(f"could not create topic {name!r}: {exc}") from None
    return report
