"""Topic epochs: which incarnation of a Kafka topic a stored offset belongs to.

An offset means nothing without the topic it was read from. When a topic is deleted and
created again (the embedded broker restarted: its storage is memory only; a wiped
cluster; a different cluster behind the same name), offsets start at 0 again, and any
position a consumer stored before (Bytewax snapshots, the Redis applied-offset guard,
the learner's and the indexer's checkpoints) is ahead of the new log: a consumer that
trusted it would silently skip, or silently refuse to write, every new event.

Kafka gives every topic a random id when it is created (KIP-516; Apache Kafka >= 2.8,
and Tansu). That id is the epoch: every stored position is recorded together with the
epoch it was taken in, and a consumer that finds its stored epoch differs from the
topic's current one stops with :class:`EpochMismatch`, which says what happened and the
one command that resolves it (``freshrec reset``). Nothing is skipped silently.

A broker that reports no topic id (an all-zero id, or an older Kafka) yields ``None``;
callers then cannot tell incarnations apart and say so in their log.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .kafka_security import librdkafka_options
from .settings import Settings

RESET_HINT = (
    "run `freshrec reset` (it clears the flow snapshots, the learner's and indexer's positions and "
    "freshrec's Redis keys) and replay the events; `freshrec up` does this by itself for the embedded broker"
)

# librdkafka reports a broker without topic ids as the all-zero UUID (base64).
_NO_ID = {"", "AAAAAAAAAAAAAAAAAAAAAA"}


class EpochMismatch(RuntimeError):
    """Stored positions belong to another incarnation of the topic than the broker's."""

    def __init__(self, owner: str, topic: str, stored: str, current: str | None, where: str) -> None:
        self.owner, self.topic, self.stored, self.current, self.where = owner, topic, stored, current, where
        now = f"id {current}" if current else "no such topic"
        super().__init__(
            f"{owner}: its stored positions for topic {topic!r} ({where}) were taken from the topic with id "
            f"{stored}, but the broker now has {now}: the topic was recreated (the embedded broker "
            f"restarted, which empties it, or this is another cluster), so every stored offset is meaningless "
            f"and following them would skip events silently. To start over: {RESET_HINT}"
        )


def topic_ids(settings: Settings, topics: list[str], timeout: float = 10.0) -> dict[str, str | None]:
    """The broker's current id of each topic; ``None`` for a topic that does not exist or
    a broker without topic ids."""
    from confluent_kafka import TopicCollection
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(librdkafka_options(settings))
    out: dict[str, str | None] = {}
    futures = admin.describe_topics(TopicCollection(list(topics)), request_timeout=timeout)
    for topic, future in futures.items():
        try:
            description = future.result(timeout)
        except Exception:  # unknown topic: KafkaException(UNKNOWN_TOPIC_OR_PART)
            out[topic] = None
            continue
        ident = str(description.topic_id) if description.topic_id is not None else ""
        out[topic] = None if ident in _NO_ID else ident
    return out


def check_epoch_file(path: Path, owner: str, topic: str, current: str | None) -> None:
    """Compare the epoch recorded at ``path`` for ``topic`` with ``current``; record it if
    none is recorded yet. Raises :class:`EpochMismatch` when they differ.

    ``path`` is a small JSON object ``{topic: id}`` kept beside the positions it vouches
    for (a flow's recovery directory, a checkpoint directory), so deleting the positions
    deletes the epoch with them.
    """
    recorded: dict[str, str] = {}
    if path.exists():
        recorded = json.loads(path.read_text())
    stored = recorded.get(topic)
    if stored is not None:
        if current is not None and stored != current:
            raise EpochMismatch(owner, topic, stored, current, str(path.parent))
        return
    if current is None:
        return
    recorded[topic] = current
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(recorded, indent=1, sort_keys=True))
    os.replace(tmp, path)
