"""Pieces both dataflows share: the Kafka source, consumer-error routing, Bytewax glue."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaError, KafkaSource, KafkaSourceMessage
from bytewax.dataflow import Dataflow, Stream
from bytewax.operators import StatefulBatchLogic

from freshrec.contracts import DeadLetter
from freshrec.kafka_security import bytewax_source_config
from freshrec.settings import Settings

from .partition_writer import PartitionWriter


def kafka_source(settings: Settings, topic: str) -> KafkaSource:
    """Read ``topic`` from the beginning (or the resumed offsets), following its tail.

    ``tail=True`` because the embedded broker's high watermark is wrong (INTERFACES.md):
    partition EOF would end a flow early. Errors come through as items, not exceptions.
    """
    return KafkaSource(
        settings.kafka_servers,
        [topic],
        tail=True,
        batch_size=settings.stream_batch_size,
        raise_on_errors=False,
        add_config={**bytewax_source_config(settings), "fetch.wait.max.ms": str(settings.stream_fetch_wait_ms)},
    )


def consumer_error_letter(stage: str, error: KafkaError) -> tuple[str, DeadLetter]:
    """A consumer error as a dead letter, keyed to the partition's sink."""
    msg = error.msg
    letter = DeadLetter(stage, "kafka", str(error.err), msg.value or b"", msg.topic or "")
    return str(msg.partition or 0), letter


def keyed_by_partition(step_id: str, flow: Dataflow, settings: Settings, topic: str, stage: str) -> tuple[Stream[Any], Stream[Any]]:
    """Input of ``topic`` as (messages keyed by their partition, consumer-error letters)."""
    messages = op.input(step_id, flow, kafka_source(settings, topic))
    split = op.branch(f"{step_id}-split-errors", messages, lambda m: isinstance(m, KafkaSourceMessage))
    keyed = op.key_on(f"{step_id}-by-partition", split.trues, lambda m: str(m.partition))
    errors = op.map(f"{step_id}-consumer-errors", split.falses, lambda e: consumer_error_letter(stage, e))
    return keyed, errors


class PartitionLogic(StatefulBatchLogic[Any, Any, Any]):
    """Bytewax glue around a partition object (``apply(messages)``, ``snapshot()``,
    ``full_batch()``) and its Redis writer (:mod:`streams.partition_writer`).

    The write happens here, in the stateful step, because only here is the partition's
    full state at hand when Redis turns out to have lost it. Bytewax snapshots the
    partition after the batch's write, so the exactly-once argument of
    :mod:`streams.user_partition` holds as when a sink wrote. Every ``check_every_s``
    without a batch, :meth:`on_notify` has the writer check that Redis still holds the
    partition (an emptied Redis is rebuilt on an idle stream too).
    """

    def __init__(self, partition: Any, writer: PartitionWriter | None = None, check_every_s: float = 2.0) -> None:
        self.partition = partition
        self.writer = writer
        self._check_every = timedelta(seconds=check_every_s)
        self._next_check = _now() + self._check_every

    def on_batch(self, values: list[Any]) -> tuple[list[Any], bool]:
        prev_offset = self.partition.last_offset
        batch = self.partition.apply(values)
        if self.writer is not None:
            self.writer.write(batch, prev_offset, self.partition)
        self._next_check = _now() + self._check_every
        return [batch], StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[Any], bool]:
        if self.writer is not None:
            self.writer.check(self.partition)
        self._next_check = _now() + self._check_every
        return [], StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return self._next_check if self.writer is not None else None

    def snapshot(self) -> Any:
        return self.partition.snapshot()


def _now() -> datetime:
    return datetime.now(timezone.utc)
