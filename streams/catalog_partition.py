"""Current catalog records of one Kafka partition of ``catalog``, and what a batch changes.

Keyed by Kafka partition for the same reasons as :mod:`streams.user_partition` (one call
per batch, one atomic guarded Redis write per batch with the partition's offset), and
exactly-once in Redis the same way: Bytewax snapshots this object with the source
offsets, updates are deterministic, and the Redis write refuses offsets it already holds.

An item's record "changed" when its content (everything but ``ts``) differs from the
current one, when it is new, or when an existing item is deleted. Only changed items go
to ``changed-items`` for the indexer (at least once: a replay after a crash may repeat
some, and the indexer's upsert is idempotent). The producer keys catalog records by
item id; a record whose key is not its ``item_id`` goes to dead-letter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from freshrec.contracts import CatalogItem, CatalogRecord, DeadLetter, InvalidRecord, parse_catalog

from .user_partition import SourceMessage, check_key

STAGE = "streams.catalog"
SNAPSHOT_VERSION = 1


@dataclass
class CatalogBatch:
    topic: str
    partition: int
    last_offset: int
    upserts: dict[str, bytes] = field(default_factory=dict)
    deletes: list[str] = field(default_factory=list)
    changed: list[CatalogRecord] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)


def content_of(item: CatalogItem) -> bytes:
    """What decides whether an item changed: the record without its timestamp."""
    return orjson.dumps(item.model_dump(exclude={"ts"}, exclude_none=True))


class CatalogPartition:
    def __init__(self, resume: Any | None = None) -> None:
        self._content: dict[str, bytes] = {}
        self.last_offset = -1
        if resume is not None:
            version, content, last_offset = resume
            if version != SNAPSHOT_VERSION:
                raise ValueError(f"snapshot v{version} is not readable; clear {STAGE} recovery in state_dir/streams")
            self._content = dict(content)
            self.last_offset = last_offset

    def __len__(self) -> int:
        return len(self._content)

    def item_ids(self) -> set[str]:
        return set(self._content)

    def apply(self, messages: Iterable[SourceMessage]) -> CatalogBatch:
        batch: CatalogBatch | None = None
        # item_id -> the record that now decides it (last one in the batch wins).
        latest: dict[str, CatalogRecord] = {}
        for msg in messages:
            if batch is None:
                batch = CatalogBatch(msg.topic or "", msg.partition or 0, self.last_offset)
            if msg.offset is not None:
                batch.last_offset = msg.offset
            raw = msg.value or b""
            try:
                record = parse_catalog(raw)
                check_key(msg, record.item_id, "item_id", "catalog records must be keyed by item id")
            except InvalidRecord as err:
                batch.dead_letters.append(DeadLetter.of(STAGE, err, raw, msg.topic or ""))
                continue
            item_id = record.item_id
            if isinstance(record, CatalogItem):
                content = content_of(record)
                if self._content.get(item_id) == content:
                    continue
                self._content[item_id] = content
            else:
                if self._content.pop(item_id, None) is None:
                    continue
            latest[item_id] = record
            batch.changed.append(record)
        if batch is None:
            return CatalogBatch("", 0, self.last_offset)
        for item_id, record in latest.items():
            if isinstance(record, CatalogItem):
                batch.upserts[item_id] = record.to_bytes()
            else:
                batch.deletes.append(item_id)
        self.last_offset = batch.last_offset
        return batch

    def snapshot(self) -> tuple[int, dict[str, bytes], int]:
        return (SNAPSHOT_VERSION, dict(self._content), self.last_offset)
