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


# ---------------------------------------------------------------------------------------
# Dead letters always fit (issue 13, item 2): an 800 kB record's letter was > 1 MB and
# wedged the users flow on MSG_SIZE_TOO_LARGE.

ODD_PAYLOADS: dict[str, bytes] = {
    "empty": b"",
    "600 kB": b"x" * 600_000,
    "1.5 MB": b"y" * 1_500_000,
    "5 MB": b"z" * 5_000_000,
    "invalid UTF-8": b"\xff\xfe\xfa" * 200_000,
    "NULs": b"\x00" * 700_000,
    "deeply nested JSON": b"[" * 300_000 + b"]" * 300_000,
    "JSON array": orjson.dumps([ev()] * 5000),
    "wrong types": orjson.dumps({**ev(), "ts": True, "user_id": 17, "kind": ["click"] * 100_000}),
}


@pytest.mark.parametrize("name", list(ODD_PAYLOADS))
def test_dead_letter_of_any_payload_is_bounded_and_describes_the_original(name: str) -> None:
    import hashlib

    from freshrec.contracts import DEAD_LETTER_RAW_BYTES, MAX_DEAD_LETTER_BYTES

    raw = ODD_PAYLOADS[name]
    try:
        parse_event(raw, now=NOW)
        raise AssertionError("every odd payload must be rejected")
    except InvalidRecord as err:
        letter = DeadLetter.of("streams.users", err, raw, "freshrec.events")
    wire = letter.to_bytes()
    assert len(wire) <= MAX_DEAD_LETTER_BYTES < 64 * 1024  # far below Kafka's 1 MB default
    back = DeadLetter.from_bytes(wire)
    assert back.raw == raw[:DEAD_LETTER_RAW_BYTES]
    assert back.raw_size == len(raw) and back.raw_sha256 == hashlib.sha256(raw).hexdigest()
    assert back.truncated == (len(raw) > DEAD_LETTER_RAW_BYTES)
    assert orjson.loads(wire)["truncated"] == back.truncated
    assert back.reason and back.field


def test_oversize_record_reason_names_size_and_limit() -> None:
    err = rejects(b"x" * 1_500_000, "record")
    assert err.reason.startswith(f"record is 1500000 bytes, over the {MAX_RECORD_BYTES}-byte limit")


def test_dead_letter_strings_are_bounded_even_at_worst_escaping() -> None:
    from freshrec.contracts import MAX_DEAD_LETTER_BYTES

    # Control characters are 6 bytes each in JSON; a lone surrogate cannot be UTF-8 at all.
    huge = "\x01" * 2_000_000 + "\ud800"
    letter = DeadLetter("s" * 10_000, huge, huge, b"\x00" * 5_000_000, "t" * 10_000)
    wire = letter.to_bytes()
    assert len(wire) <= MAX_DEAD_LETTER_BYTES
    assert "chars cut" in DeadLetter.from_bytes(wire).reason


def test_dead_letter_reads_the_old_shape_whole_raw_no_size() -> None:
    import base64
    import hashlib

    raw = b"\xff" * 40_000
    old = orjson.dumps(
        {"stage": "producer", "field": "record", "reason": "r", "source_topic": "events", "at": 1.0,
         "raw_b64": base64.b64encode(raw).decode()}
    )
    back = DeadLetter.from_bytes(old)
    assert back.raw_size == 40_000 and back.truncated and back.raw_sha256 == hashlib.sha256(raw).hexdigest()
    small = DeadLetter.from_bytes(old.replace(base64.b64encode(raw), base64.b64encode(b"{}")))
    assert small.raw == b"{}" and not small.truncated and small.raw_size == 2


def test_an_unknown_field_named_by_a_huge_key_is_still_a_small_letter() -> None:
    from freshrec.contracts import MAX_DEAD_LETTER_BYTES

    raw = orjson.dumps({**ev(), "k" * 400_000: 1})
    err = rejects(raw, "k" * 400_000)
    assert len(DeadLetter.of("producer", err, raw).to_bytes()) <= MAX_DEAD_LETTER_BYTES


# ---------------------------------------------------------------------------------------
# Booleans are not numbers (issue 13, item 8): "ts": true was stored as 1970.


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("name", ["ts", "sent_at"])
def test_event_numbers_refuse_booleans(name: str, value: bool) -> None:
    err = rejects(orjson.dumps(ev(**{name: value})), name, "boolean")
    assert "send a JSON number" in err.reason


@pytest.mark.parametrize("name", ["price", "ts"])
def test_catalog_numbers_refuse_booleans(name: str) -> None:
    with pytest.raises(InvalidRecord) as info:
        parse_catalog(orjson.dumps({"item_id": "1", "title": "x", name: True}))
    assert info.value.field == name and "boolean" in info.value.reason
    with pytest.raises(InvalidRecord) as info:
        parse_catalog({"op": "delete", "item_id": "1", "ts": False})
    assert info.value.field == "ts"


def test_other_records_refuse_boolean_numbers() -> None:
    from pydantic import ValidationError

    from freshrec.contracts import AdapterAnnouncement

    with pytest.raises(ValidationError):
        TrainPair(pair_id="e1", user_id="u1", context_text="a", target_item="i1", weight=True)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        AdapterAnnouncement.model_validate_json(b'{"version": "v1", "path": "p", "created": 1, "metrics": {"ndcg": true}}')


def test_numbers_still_accept_ints_and_numeric_strings() -> None:
    assert parse_event(ev(ts=int(NOW)), now=NOW).ts == NOW
    assert parse_event(ev(ts=str(NOW - 1)), now=NOW).ts == NOW - 1
    item = parse_catalog({"item_id": "1", "title": "x", "price": 0})
    assert isinstance(item, CatalogItem) and item.price == 0.0


def test_wrong_types_of_ids_and_kind_are_rejected() -> None:
    rejects(orjson.dumps(ev(user_id=17)), "user_id", "string")
    rejects(orjson.dumps(ev(item_id=True)), "item_id", "string")
    rejects(orjson.dumps(ev(kind=1)), "kind", "unknown kind")
