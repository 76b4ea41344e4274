"""Current catalog records of one Kafka partition of ``catalog``, and what a batch changes.

Keyed by Kafka partition for the same reasons as :mod:`streams.user_partition` (one call
per batch, one atomic guarded Redis write per batch with the partition's offset), and
exactly-once in Redis the same way: Bytewax snapshots this object with the source
offsets, updates are deterministic, and the Redis write refuses offsets it already holds.

An item's record "changed" when its content (everything but ``ts``) differs from the
current one, when it is new, or when an existing item is deleted. Only changed items go
to ``changed-items`` for the indexer (at least once: a replay after a crash may repeat
some, and the indexer's upsert is idempotent). The producer keys catalog records by
item id; a record without a key or whose key is not its ``item_id`` goes to dead-letter.

Redis is rebuilt from this object when it lost data (:mod:`streams.partition_writer`):
it keeps the record Redis holds for each current item and the ids of deleted ones,
whose number grows with the items ever deleted (catalogs are small next to events).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from freshrec.contracts import CatalogItem, CatalogRecord, DeadLetter, InvalidRecord, parse_catalog

from .user_partition import SourceMessage, check_key

STAGE = "streams.catalog"
# v2 keeps the records themselves (to rebuild Redis), the deleted ids, and the topic and
# partition; a v1 snapshot has none of them.
SNAPSHOT_VERSION = 2
UNKEYED_WHY = (
    "catalog records must be keyed by item_id (the Kafka message key is the item_id as UTF-8; "
    "freshrec.producer does this) so all records of an item stay in one partition"
)


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
    """What decides whether an item changed: a digest of the record without its timestamp."""
    return hashlib.blake2b(orjson.dumps(item.model_dump(exclude={"ts"}, exclude_none=True)), digest_size=16).digest()


class CatalogPartition:
    """Items of one partition: the record Redis holds for each (the last one whose content
    changed), a digest of its content, and the ids deleted since (so a rebuild of Redis
    removes them too)."""

    def __init__(self, resume: Any | None = None) -> None:
        self._content: dict[str, bytes] = {}
        self._records: dict[str, bytes] = {}
        self._deleted: set[str] = set()
        self.last_offset = -1
        self.topic: str | None = None
        self.partition: int | None = None
        if resume is not None:
            version = resume[0]
            if version != SNAPSHOT_VERSION:
                raise ValueError(
                    f"snapshot v{version} is not readable (this version writes v{SNAPSHOT_VERSION}); clear {STAGE} "
                    "recovery in state_dir/streams and the redis_prefix (`freshrec reset`), then replay the catalog"
                )
            _, records, content, deleted, self.last_offset, self.topic, self.partition = resume
            self._records, self._content, self._deleted = dict(records), dict(content), set(deleted)

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
                self.topic, self.partition = batch.topic, batch.partition
            if msg.offset is not None:
                batch.last_offset = msg.offset
            raw = msg.value or b""
            try:
                record = parse_catalog(raw)
                check_key(msg, record.item_id, "item_id", UNKEYED_WHY)
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
                batch.upserts[item_id] = self._records[item_id] = record.to_bytes()
                self._deleted.discard(item_id)
            else:
                batch.deletes.append(item_id)
                self._records.pop(item_id, None)
                self._deleted.add(item_id)
        self.last_offset = batch.last_offset
        return batch

    def full_batch(self) -> CatalogBatch | None:
        """Every current item as an upsert and every deleted one as a delete, at
        :attr:`last_offset` (None before the first message): to rebuild Redis."""
        if self.topic is None or self.partition is None or self.last_offset < 0:
            return None
        return CatalogBatch(
            self.topic, self.partition, self.last_offset, upserts=dict(self._records), deletes=sorted(self._deleted)
        )

    def snapshot(self) -> tuple[Any, ...]:
        return (
            SNAPSHOT_VERSION, dict(self._records), dict(self._content), frozenset(self._deleted),
            self.last_offset, self.topic, self.partition,
        )
