"""Changed items in, item vectors out: the indexer's pure logic (no Kafka, no files).

A micro-batch of ``changed-items`` records is reduced to the last record of each item
(a record is the item's whole current state, so earlier ones in the batch are moot),
invalid records are set aside for the dead-letter topic, upserts are encoded in one
call, and every item yields one :class:`~freshrec.contracts.ItemVector` tagged with the
encoder's version (vector ``None`` for a delete).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from freshrec.contracts import CatalogDelete, CatalogItem, InvalidRecord, ItemVector, parse_catalog

from models.encoder import TextEncoder


@dataclass
class ChangeBatch:
    """The last record of each item in a micro-batch, plus what failed validation."""

    upserts: dict[str, CatalogItem] = field(default_factory=dict)
    deletes: dict[str, CatalogDelete] = field(default_factory=dict)
    invalid: list[tuple[InvalidRecord, bytes]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.upserts) + len(self.deletes)


def collect_changes(raw_records: Iterable[bytes]) -> ChangeBatch:
    """Parse records in topic order; a later record of an item replaces an earlier one."""
    batch = ChangeBatch()
    for raw in raw_records:
        try:
            record = parse_catalog(raw)
        except InvalidRecord as err:
            batch.invalid.append((err, raw))
            continue
        batch.upserts.pop(record.item_id, None)
        batch.deletes.pop(record.item_id, None)
        if isinstance(record, CatalogDelete):
            batch.deletes[record.item_id] = record
        else:
            batch.upserts[record.item_id] = record
    return batch


def micro_batches(batch: ChangeBatch, size: int) -> Iterator[ChangeBatch]:
    """The deletes first (nothing to encode), then the upserts ``size`` at a time."""
    if batch.deletes:
        yield ChangeBatch(deletes=dict(batch.deletes))
    ids = list(batch.upserts)
    for start in range(0, len(ids), size):
        yield ChangeBatch(upserts={i: batch.upserts[i] for i in ids[start : start + size]})


def item_vectors(encoder: TextEncoder, batch: ChangeBatch, batch_size: int = 64) -> list[ItemVector]:
    """Encode the batch's upserts with ``encoder``; deletes become vector ``None``."""
    out: list[ItemVector] = [ItemVector(d.item_id, encoder.version, None, d.ts) for d in batch.deletes.values()]
    items = list(batch.upserts.values())
    if items:
        vectors = encoder.encode([i.text() for i in items], batch_size=batch_size)
        out.extend(ItemVector(i.item_id, encoder.version, v, i.ts) for i, v in zip(items, vectors))
    return out
