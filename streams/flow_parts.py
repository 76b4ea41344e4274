"""Pieces both dataflows share: the Kafka source, consumer-error routing, Bytewax glue."""

from __future__ import annotations

from typing import Any

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaError, KafkaSource, KafkaSourceMessage
from bytewax.dataflow import Dataflow, Stream
from bytewax.operators import StatefulBatchLogic

from freshrec.contracts import DeadLetter
from freshrec.settings import Settings


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
        add_config={"fetch.wait.max.ms": str(settings.stream_fetch_wait_ms)},
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
    """Bytewax glue around a partition object with ``apply(messages)`` and ``snapshot()``."""

    def __init__(self, partition: Any) -> None:
        self.partition = partition

    def on_batch(self, values: list[Any]) -> tuple[list[Any], bool]:
        return [self.partition.apply(values)], StatefulBatchLogic.RETAIN

    def snapshot(self) -> Any:
        return self.partition.snapshot()
