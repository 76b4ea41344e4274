"""The collector's pure logic: a body as records, each record checked as every edge checks it,
and the per-record answer (accepted only when confirmed; 200 only when everything landed)."""

from __future__ import annotations

import orjson
import pytest

from freshrec.contracts import MAX_RECORD_BYTES, Event
from collector.batch import (
    REASON_LABELS,
    Accepted,
    BodyError,
    RawRecord,
    Rejected,
    answer,
    check_batch,
    check_record,
    media_type,
    split_body,
)

NOW = 1_700_000_000.0


def _event(n: int = 1, **kw: object) -> dict[str, object]:
    return {"event_id": f"e{n}", "user_id": f"u{n % 3}", "kind": "click", "item_id": f"i{n}", "ts": NOW, **kw}


def _check(obj: object) -> Accepted | Rejected:
    return check_record(RawRecord(0, orjson.dumps(obj)), NOW)


# -- the body -----------------------------------------------------------------------------


def test_a_json_array_is_one_record_per_element_in_order() -> None:
    records = split_body(orjson.dumps([_event(1), "x", _event(2)]), "application/json; charset=utf-8")
    assert [r.index for r in records] == [0, 1, 2]
    assert orjson.loads(records[0].raw) == _event(1)
    assert records[1].raw == b'"x"' and records[1].line is None


def test_a_lone_object_is_a_batch_of_one() -> None:
    assert [orjson.loads(r.raw) for r in split_body(orjson.dumps(_event()), "application/json")] == [_event()]


@pytest.mark.parametrize("body", [b"[{\"event_id\": ", b"42", b"\"a string\""])
def test_a_json_body_that_is_not_an_array_of_json_is_a_body_error(body: bytes) -> None:
    with pytest.raises(BodyError, match="JSON"):
        split_body(body, "application/json")


def test_json_lines_keep_each_lines_bytes_and_number_and_skip_blank_lines() -> None:
    body = b'{"a": 1}\r\n\n   \nnot json\n{"b": 2}\n'
    records = split_body(body, "application/x-ndjson")
    assert [(r.index, r.line, r.raw) for r in records] == [(0, 1, b'{"a": 1}'), (1, 4, b"not json"), (2, 5, b'{"b": 2}')]


def test_another_content_type_is_refused() -> None:
    with pytest.raises(BodyError, match="Content-Type"):
        split_body(b"[]", "text/plain")
    assert media_type("Application/X-NDJSON; charset=utf-8") == "application/x-ndjson"
    assert media_type(None) == ""


# -- one record ---------------------------------------------------------------------------


def test_a_valid_event_is_keyed_by_its_user_and_sent_normalised() -> None:
    checked = _check(_event(7, user_id="  u7  "))
    assert isinstance(checked, Accepted)
    assert checked.event_id == "e7" and checked.key == b"u7"
    assert Event.model_validate_json(checked.value).user_id == "u7"


@pytest.mark.parametrize(
    ("obj", "field", "label", "reason"),
    [
        ({k: v for k, v in _event().items() if k != "user_id"}, "user_id", "user_id", "is required"),
        (_event(ts="yesterday"), "ts", "ts", "number"),
        (_event(ts=True), "ts", "ts", "boolean"),
        (_event(user_id=17), "user_id", "user_id", "string"),
        (_event(kind="like"), "kind", "kind", "unknown kind 'like'"),
        (_event(ts=NOW + 3600), "ts", "ts", "in the future"),
        (_event(colour="red"), "colour", "unknown_field", "Extra inputs"),
        (["an", "array"], "record", "not_object", "must be a JSON object"),
    ],
)
def test_an_invalid_record_is_rejected_with_the_contracts_field_and_reason(
    obj: object, field: str, label: str, reason: str
) -> None:
    checked = _check(obj)
    assert isinstance(checked, Rejected)
    assert checked.error.field == field and reason in checked.error.reason
    assert checked.label == label and checked.label in REASON_LABELS


def test_a_line_that_is_not_json_is_rejected_alone_with_its_raw_bytes() -> None:
    checked = check_record(RawRecord(3, b'{"event_id": "e1", ', 9), NOW)
    assert isinstance(checked, Rejected)
    assert (checked.index, checked.line, checked.label, checked.raw) == (3, 9, "not_json", b'{"event_id": "e1", ')
    assert "not valid JSON" in checked.error.reason


def test_an_oversize_record_is_rejected_before_it_is_parsed() -> None:
    raw = b"x" * (MAX_RECORD_BYTES + 1)  # not JSON either: the size is what it is refused for
    checked = check_record(RawRecord(0, raw), NOW)
    assert isinstance(checked, Rejected) and checked.label == "oversize"
    assert f"{MAX_RECORD_BYTES + 1} bytes, over the {MAX_RECORD_BYTES}-byte limit" in checked.error.reason


def test_the_size_limit_is_the_callers() -> None:
    raw = orjson.dumps(_event(query=None))
    assert isinstance(check_record(RawRecord(0, raw), NOW, max_bytes=len(raw)), Accepted)
    assert isinstance(check_record(RawRecord(0, raw), NOW, max_bytes=len(raw) - 1), Rejected)


def test_an_unknown_fields_name_never_becomes_a_metric_label() -> None:
    labels = {_check(_event(**{f"field{n}": 1})).label for n in range(20)}  # type: ignore[union-attr]
    assert labels == {"unknown_field"}


# -- the answer ---------------------------------------------------------------------------


def _mixed() -> list[Accepted | Rejected]:
    return check_batch(
        [RawRecord(0, orjson.dumps(_event(1))), RawRecord(1, b"nope", 2), RawRecord(2, orjson.dumps(_event(2)))], NOW
    )


def test_all_confirmed_is_a_200_with_one_answer_per_record_in_order() -> None:
    status, body = answer(_mixed(), [True, True, True])
    assert status == 200
    assert (body["accepted"], body["rejected"], body["unconfirmed"]) == (2, 1, 0)
    assert body["results"][0] == {"index": 0, "status": "accepted", "event_id": "e1"}
    assert body["results"][1]["status"] == "rejected" and body["results"][1]["line"] == 2
    assert body["results"][1]["field"] == "record" and body["results"][1]["dead_lettered"] is True
    assert body["results"][2] == {"index": 2, "status": "accepted", "event_id": "e2"}


def test_an_unconfirmed_event_is_never_accepted_and_makes_a_503() -> None:
    status, body = answer(_mixed(), [True, True, False])
    assert status == 503
    assert (body["accepted"], body["unconfirmed"]) == (1, 1)
    assert body["results"][2]["status"] == "unconfirmed" and "resend" in body["results"][2]["reason"]


def test_a_reject_whose_dead_letter_was_not_confirmed_stays_rejected_but_makes_a_503() -> None:
    status, body = answer(_mixed(), [True, False, True])
    assert status == 503
    assert body["results"][1]["status"] == "rejected" and body["results"][1]["dead_lettered"] is False
    assert body["accepted"] == 2


def test_nothing_confirmed_accepts_nothing() -> None:
    status, body = answer(_mixed(), [False, False, False])
    assert status == 503 and body["accepted"] == 0
    assert [r["status"] for r in body["results"]] == ["unconfirmed", "rejected", "unconfirmed"]


def test_confirmations_must_match_the_records() -> None:
    with pytest.raises(ValueError):
        answer(_mixed(), [True])
