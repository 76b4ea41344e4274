"""Every validation rule of the edge contracts, one case each."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from freshrec.contracts import (
    MAX_RECORD_BYTES,
    CatalogDelete,
    CatalogItem,
    DeadLetter,
    InvalidRecord,
    ItemVector,
    TrainPair,
    parse_catalog,
    parse_event,
)

NOW = 1_700_000_000.0


def ev(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "kind": "click", "ts": NOW - 10}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def rejects(raw: object, field: str, fragment: str = "") -> InvalidRecord:
    with pytest.raises(InvalidRecord) as info:
        parse_event(raw, now=NOW)  # type: ignore[arg-type]
    assert info.value.field == field, str(info.value)
    assert fragment in info.value.reason, info.value.reason
    return info.value


def test_valid_event_round_trips() -> None:
    event = parse_event(orjson.dumps(ev()), now=NOW)
    assert event.user_id == "u1" and event.kind == "click"
    assert parse_event(event.to_bytes(), now=NOW) == event


@pytest.mark.parametrize("kind", ["view", "click", "cart", "purchase", "cancel"])
def test_every_item_kind_is_accepted(kind: str) -> None:
    assert parse_event(ev(kind=kind), now=NOW).kind == kind


def test_search_needs_query_but_no_item() -> None:
    event = parse_event(ev(kind="search", item_id=None, query="red lunch bag"), now=NOW)
    assert event.query == "red lunch bag" and event.item_id is None
    rejects(ev(kind="search", item_id=None), "query", "search event needs")


def test_bad_json() -> None:
    rejects(b'{"event_id": "e1", ', "record", "not valid JSON")


def test_non_object_json() -> None:
    rejects(b"[1, 2]", "record", "JSON object")


def test_missing_user() -> None:
    rejects(ev(user_id=None), "user_id", "required")


def test_empty_user() -> None:
    rejects(ev(user_id="  "), "user_id", "must not be empty")


def test_empty_event_id() -> None:
    rejects(ev(event_id=""), "event_id", "must not be empty")


def test_oversized_id() -> None:
    rejects(ev(user_id="u" * 500), "user_id", "limit")


def test_unknown_kind() -> None:
    rejects(ev(kind="like"), "kind", "unknown kind 'like'")


def test_item_kind_without_item() -> None:
    rejects(ev(item_id=None), "item_id", "needs an item_id")


def test_future_time() -> None:
    rejects(ev(ts=NOW + 3600), "ts", "in the future")


def test_small_clock_skew_is_tolerated() -> None:
    assert parse_event(ev(ts=NOW + 60), now=NOW).ts == NOW + 60


def test_negative_time() -> None:
    rejects(ev(ts=-5), "ts", "non-negative")


def test_non_numeric_time() -> None:
    rejects(ev(ts="yesterday"), "ts")


def test_unknown_field() -> None:
    rejects(ev(color="red"), "color", "")


def test_oversized_query() -> None:
    rejects(ev(kind="search", item_id=None, query="q" * 5000), "query", "at most")


def test_oversized_record() -> None:
    raw = orjson.dumps(ev(kind="search", item_id=None, query="x" * (MAX_RECORD_BYTES + 10)))
    rejects(raw, "record", "limit")


def test_catalog_upsert_and_text() -> None:
    item = parse_catalog({"item_id": "85123A", "title": "WHITE HANGING HEART", "category": "decor", "price": 2.55})
    assert isinstance(item, CatalogItem)
    assert item.text() == "WHITE HANGING HEART | decor"


def test_catalog_delete() -> None:
    rec = parse_catalog({"op": "delete", "item_id": "85123A"})
    assert isinstance(rec, CatalogDelete)


@pytest.mark.parametrize(
    ("record", "field", "fragment"),
    [
        ({"item_id": "1", "title": "t" * 100_000}, "title", "at most"),
        ({"item_id": "1", "title": ""}, "title", "must not be empty"),
        ({"item_id": "", "title": "x"}, "item_id", "must not be empty"),
        ({"title": "x"}, "item_id", "required"),
        ({"item_id": "1", "title": "x", "price": -1}, "price", "greater than or equal"),
        ({"op": "merge", "item_id": "1"}, "op", "unknown op"),
        ({"item_id": "1", "title": "x", "description": "d" * 20_000}, "description", "at most"),
    ],
)
def test_catalog_rules(record: dict[str, object], field: str, fragment: str) -> None:
    with pytest.raises(InvalidRecord) as info:
        parse_catalog(record)
    assert info.value.field == field
    assert fragment in info.value.reason


def test_item_vector_round_trip() -> None:
    vec = np.arange(384, dtype=np.float32) / 384
    back = ItemVector.from_bytes(ItemVector("i1", "v1", vec, 5.0).to_bytes())
    assert back.item_id == "i1" and back.adapter_version == "v1"
    assert back.vector is not None and np.array_equal(back.vector, vec)
    assert ItemVector.from_bytes(ItemVector("i1", "v1", None).to_bytes()).vector is None


def test_dead_letter_keeps_original_bytes() -> None:
    raw = b"\xff\xfe not json"
    err = InvalidRecord("record", "not valid JSON")
    back = DeadLetter.from_bytes(DeadLetter.of("producer", err, raw, "events").to_bytes())
    assert back.raw == raw and back.field == "record" and back.source_topic == "events"


def test_train_pair_defaults() -> None:
    pair = TrainPair(pair_id="e1", user_id="u1", context_text="a", target_item="i1")
    assert orjson.loads(pair.to_bytes())["weight"] == 1.0
