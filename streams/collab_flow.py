"""The collaborative dataflow: ``events`` -> the shop's collaborative state in Redis, rank examples, shopper vectors.

Run it with ``freshrec stream collab`` (recovery and the epoch checks set up for you), or
``python -m bytewax.run streams.collab_flow -r <dir> -s 5 -b 0`` (then only the Redis
epoch guard of every write applies).

Every message of every partition is keyed to one key, ``"shop"``: the whole shop is one
stateful partition (why, and how exactly-once holds: :mod:`streams.collab_partition`).
The stateful step writes Redis itself (:mod:`streams.collab_writer`); the sink sends rank
examples, shopper vectors and dead letters to Kafka (:class:`streams.sinks.CollabSink`).
Extra workers add nothing: one worker holds the state, the others only read partitions.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.operators import StatefulBatchLogic

from freshrec.epochs import check_epoch_file
from freshrec.settings import Settings
from stores import collab_store
from stores.redis_client import connect
from stores.redis_retry import with_retry

from .collab_partition import STAGE, CollabPartition
from .collab_writer import CollabWriter
from .flow_epoch import EPOCH_FILE, UNRESOLVED, Unresolved, topic_epoch
from .flow_parts import keyed_by_partition
from .sinks import CollabSink

SHOP = "shop"


class CollabLogic(StatefulBatchLogic[Any, Any, Any]):
    """Bytewax glue: apply a batch, write it (in the stateful step, as :class:`streams.flow_parts.PartitionLogic`
    does), and every ``check_every_s`` without a batch check that Redis still holds the shop."""

    def __init__(self, partition: CollabPartition, writer: CollabWriter | None, check_every_s: float = 2.0) -> None:
        self.partition = partition
        self.writer = writer
        self._every = timedelta(seconds=check_every_s)
        self._next = _now() + self._every

    def on_batch(self, values: list[Any]) -> tuple[list[Any], bool]:
        batch = self.partition.apply(values)
        if self.writer is not None:
            self.writer.write(batch, self.partition)
        self._next = _now() + self._every
        return [batch], StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[Any], bool]:
        if self.writer is not None:
            self.writer.check(self.partition)
        self._next = _now() + self._every
        return [], StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return self._next if self.writer is not None else None

    def snapshot(self) -> Any:
        return self.partition.snapshot()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def build_collab_flow(settings: Settings, epoch: str | None | Unresolved = UNRESOLVED) -> Dataflow:
    """The flow; ``epoch`` is the events topic's id, asked of the broker when not given."""
    if isinstance(epoch, Unresolved):
        epoch = topic_epoch(settings, settings.topics.events)
    flow = Dataflow("freshrec_collab")
    keyed, errors = keyed_by_partition("events", flow, settings, settings.topics.events, STAGE)
    shop = op.map("to-shop", keyed, lambda kv: (SHOP, kv[1]))

    def build(resume: Any) -> CollabLogic:
        partition = CollabPartition.from_settings(settings, resume)
        writer = CollabWriter(settings, epoch)
        writer.resume(partition)
        return CollabLogic(partition, writer, settings.stream_redis_check_s)

    batches = op.stateful_batch("collab-state", shop, build)
    op.output("outputs", op.merge("all-outputs", batches, errors), CollabSink(settings))
    return flow


def check_collab_epoch(settings: Settings, recovery: Path | None, epoch: str | None) -> None:
    """Check (or record) the events topic's ``epoch`` against the recovery directory and ``collab:meta``."""
    topic = settings.topics.events
    if recovery is not None:
        check_epoch_file(recovery / EPOCH_FILE, STAGE, topic, epoch)
    client = connect(settings)
    with_retry(lambda: collab_store.check_epoch(client, settings, topic, epoch), f"{STAGE}: checking the topic epoch",
               settings.stream_redis_backoff_max_s)


def __getattr__(name: str) -> Any:
    # `python -m bytewax.run streams.collab_flow` looks up `flow`; lazily, so importing has no side effects.
    if name == "flow":
        return build_collab_flow(Settings())
    raise AttributeError(name)
