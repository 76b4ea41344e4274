"""The catalog dataflow: ``catalog`` -> current item records in Redis, ``changed-items``.

Run it with ``freshrec stream catalog``, or ``python -m bytewax.run streams.catalog_flow``
(see :mod:`streams.users_flow` for the recovery flags). Exactly-once in Redis works as
described in :mod:`streams.catalog_partition`.
"""

from __future__ import annotations

from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from freshrec.settings import Settings

from .catalog_partition import STAGE, CatalogPartition
from .flow_epoch import UNRESOLVED, Unresolved, topic_epoch
from .flow_parts import PartitionLogic, keyed_by_partition
from .partition_writer import CatalogWriter
from .sinks import CatalogSink


def build_catalog_flow(settings: Settings, epoch: str | None | Unresolved = UNRESOLVED) -> Dataflow:
    """The flow; ``epoch`` is the catalog topic's id, asked of the broker when not given."""
    if isinstance(epoch, Unresolved):
        epoch = topic_epoch(settings, settings.topics.catalog)
    flow = Dataflow("freshrec_catalog")
    keyed, errors = keyed_by_partition("catalog", flow, settings, settings.topics.catalog, STAGE)

    def build(resume: Any) -> PartitionLogic:
        return PartitionLogic(CatalogPartition(resume), CatalogWriter(settings, epoch), settings.stream_redis_check_s)

    batches = op.stateful_batch("catalog-state", keyed, build)
    op.output("outputs", op.merge("all-outputs", batches, errors), CatalogSink(settings))
    return flow


def __getattr__(name: str) -> Any:
    if name == "flow":
        return build_catalog_flow(Settings())
    raise AttributeError(name)
