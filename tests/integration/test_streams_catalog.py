"""The catalog flow against the real broker and Redis: records, deletes, changed items,
dead letters, restart after SIGKILL, and 2 workers equal to 1."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from freshrec.contracts import CatalogItem, DeadLetter, parse_catalog
from freshrec.dataset import locate, read_items
from freshrec.producer import RecordProducer
from freshrec.settings import Settings
from stores import catalog_store
from streams.flow_process import FlowProcess, wait_applied
from stores.redis_client import connect
from tests.integration.helpers import read_topic

pytestmark = pytest.mark.integration


def _send(settings: Settings, records: list[tuple[bytes | None, bytes]]) -> int:
    with RecordProducer(settings, client_id="test-catalog") as producer:
        for key, value in records:
            producer.send(settings.topics.catalog, key, value)
        assert producer.flush().failed == 0
    return len(records)


def _catalog_records(sample_dir: Path) -> list[tuple[bytes | None, bytes]]:
    files = locate(sample_dir)
    assert files.items is not None
    return [(r["item_id"].encode(), orjson.dumps(r)) for r in read_items(files.items)]


def test_catalog_flow_keeps_current_records_and_emits_changes(fresh_settings: Settings, sample_dir: Path) -> None:
    settings = fresh_settings.model_copy(update={"stream_snapshot_seconds": 0.5})
    records = _catalog_records(sample_dir)
    first_id = records[0][0].decode()
    second_id = records[1][0].decode()
    updates: list[tuple[bytes | None, bytes]] = [
        records[2],  # the same record again: not a change
        (first_id.encode(), orjson.dumps({"item_id": first_id, "title": "RENAMED THING", "ts": 5.0})),
        (second_id.encode(), orjson.dumps({"op": "delete", "item_id": second_id})),
        (b"ghost", orjson.dumps({"op": "delete", "item_id": "ghost"})),  # unknown: nothing changes
        (b"bad", b"[1, 2]"),
        (b"bad2", orjson.dumps({"item_id": "bad2", "title": ""})),
        (b"other", orjson.dumps({"item_id": "mismatch", "title": "Key is wrong"})),
    ]
    want = {}
    for key, value in records:
        item = parse_catalog(value)
        want[item.item_id] = item
    want[first_id] = CatalogItem(item_id=first_id, title="RENAMED THING", ts=5.0)
    del want[second_id]

    sent = _send(settings, records)
    flow = FlowProcess(settings, "catalog").start()
    try:
        wait_applied(settings, "catalog", sent, timeout=60, procs=[flow])
        # A crash, then more changes: nothing is lost or repeated in Redis.
        flow.kill()
        sent += _send(settings, updates)
        flow = FlowProcess(settings, "catalog").start()
        wait_applied(settings, "catalog", sent, timeout=60, procs=[flow])
        flow.check_alive()
        assert catalog_store.all_items(connect(settings), settings) == want

        changed = [parse_catalog(v) for v in read_topic(settings, settings.topics.changed_items, len(records) + 2)]
        # At least once, in order per item (one item is in one partition): every item is
        # there, and each item's last change is its current record, or its delete.
        last = {c.item_id: c for c in changed}
        assert set(last) == {r[0].decode() for r in records}
        assert all(last[i] == item for i, item in want.items())
        assert last[second_id].op == "delete"
        # At least once, not more: a kill before the first snapshot replays the catalog once.
        assert len(changed) <= 2 * len(records) + 2

        letters = [DeadLetter.from_bytes(v) for v in read_topic(settings, settings.topics.dead_letter, 3)]
        assert len(letters) == 3
        assert {d.stage for d in letters} == {"streams.catalog"}
        assert {d.field for d in letters} == {"record", "title", "key"}
    finally:
        flow.stop()


def test_two_workers_give_the_same_catalog_as_one(fresh_settings: Settings, sample_dir: Path) -> None:
    records = _catalog_records(sample_dir)
    sent = _send(fresh_settings, records)
    results = []
    for tag, flags in (("w1", []), ("w2", ["-w", "2"])):
        s = fresh_settings.model_copy(
            update={"redis_prefix": f"{fresh_settings.redis_prefix}{tag}:", "state_dir": fresh_settings.state_dir / tag}
        )
        with FlowProcess(s, "catalog", flags) as flow:
            wait_applied(s, "catalog", sent, timeout=60, procs=[flow])
        results.append(catalog_store.all_items(connect(s), s))
    assert len(results[0]) == len(records)
    assert results[0] == results[1]
