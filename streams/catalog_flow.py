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
from .flow_parts import PartitionLogic, keyed_by_partition
from .sinks import CatalogSink


def build_catalog_flow(settings: Settings) -> Dataflow:
    flow = Dataflow("freshrec_catalog")
    keyed, errors = keyed_by_partition("catalog", flow, settings, settings.topics.catalog, STAGE)
    batches = op.stateful_batch("catalog-state", keyed, lambda resume: PartitionLogic(CatalogPartition(resume)))
    op.output("outputs", op.merge("all-outputs", batches, errors), CatalogSink(settings))
    return flow


def __getattr__(name: str) -> Any:
    if name == "flow":
        return build_catalog_flow(Settings())
    raise AttributeError(name)
