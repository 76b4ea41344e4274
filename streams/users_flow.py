"""The user-state dataflow: ``events`` -> per-user state in Redis, train pairs, dead letters.

Run it with ``freshrec stream users`` (recovery set up for you), or with Bytewax's own
runner, which reads Settings from ``FRESHREC_*`` variables::

    python -m bytewax.recovery .freshrec/streams/users 1      # once
    python -m bytewax.run streams.users_flow -w 2 -r .freshrec/streams/users -s 5 -b 0

How state, Redis writes and exactly-once fit together: :mod:`streams.user_partition`.
The stateful step writes Redis itself (:mod:`streams.partition_writer`); the sink only
sends train pairs and dead letters to Kafka. ``freshrec stream`` checks the topic's
epoch against the recovery directory and Redis before Bytewax resumes
(:mod:`streams.flow_epoch`); Bytewax's own runner skips the recovery-directory check,
and the Redis epoch guard on every write still applies.
"""

from __future__ import annotations

from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from freshrec.settings import Settings

from .flow_epoch import UNRESOLVED, Unresolved, topic_epoch
from .flow_parts import PartitionLogic, keyed_by_partition
from .partition_writer import UserStateWriter
from .sinks import UserStateSink
from .user_partition import STAGE, UserPartition


def build_users_flow(settings: Settings, epoch: str | None | Unresolved = UNRESOLVED) -> Dataflow:
    """The flow; ``epoch`` is the events topic's id (:mod:`freshrec.epochs`), asked of
    the broker when not given."""
    if isinstance(epoch, Unresolved):
        epoch = topic_epoch(settings, settings.topics.events)
    flow = Dataflow("freshrec_users")
    keyed, errors = keyed_by_partition("events", flow, settings, settings.topics.events, STAGE)

    def build(resume: Any) -> PartitionLogic:
        partition = UserPartition.from_settings(settings, resume)
        return PartitionLogic(partition, UserStateWriter(settings, epoch), settings.stream_redis_check_s)

    batches = op.stateful_batch("user-state", keyed, build)
    op.output("outputs", op.merge("all-outputs", batches, errors), UserStateSink(settings))
    return flow


def __getattr__(name: str) -> Any:
    # `python -m bytewax.run streams.users_flow` looks up `flow`; building it lazily keeps
    # a plain import free of side effects.
    if name == "flow":
        return build_users_flow(Settings())
    raise AttributeError(name)
