"""A request body as records, each record checked, and the per-record answer: pure logic.

The collector is one more edge of the system, so it validates exactly as the others do
(:func:`freshrec.contracts.parse_event`, the same size limit and the same reasons) and
sends what it accepts keyed by ``user_id``, normalised as :class:`~freshrec.producer.
RecordProducer` sends it. Nothing here touches Kafka or HTTP: :mod:`collector.sink`
sends, :mod:`collector.app` answers.

Two body shapes, chosen by Content-Type:

* ``application/json``: a JSON array of event objects (a lone object is a batch of one).
  The array is parsed whole, so a body that is not valid JSON is refused as a whole
  (:class:`BodyError`, a 400): there is no way to tell where one record ends. Each
  element is re-serialised (compact orjson) for its size check and its dead letter.
* ``application/x-ndjson`` (also ``application/jsonl``): one event per line, each line
  its own record with its original bytes: a line that is not JSON is rejected alone and
  the others go on. Blank lines separate nothing and are skipped, as in ``freshrec produce``.

The answer's rule: a record is ``accepted`` only when the broker confirmed it, and the
request is a 200 only when every record is either on the events topic (accepted) or in
the dead letter (rejected, and that dead letter confirmed). Anything else is a 503 with
the records the broker did not confirm marked ``unconfirmed``: the client resends them,
and their ``event_id`` makes a resend count once (the flows' dedupe window), even when
the first send did arrive after the collector stopped waiting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from freshrec.contracts import MAX_RECORD_BYTES, Event, InvalidRecord, oversize, parse_event

JSON_TYPES = frozenset({"application/json"})
LINES_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/json-lines", "application/x-jsonlines"})

# Labels of freshrec_collector_rejected: a fixed set, whatever a client sends (an unknown
# field's name is the client's text, so it is never a label value itself).
EVENT_FIELDS = frozenset(Event.model_fields)
REASON_LABELS = frozenset({"oversize", "not_json", "not_object", "unknown_field", "record"} | EVENT_FIELDS)

UNCONFIRMED_REASON = "the broker did not confirm this event in time; resend it (its event_id makes a resend count once)"


class BodyError(ValueError):
    """A body that is not a batch at all (not JSON, not an array): the whole request is a 400."""


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record as it came: ``index`` counts records in the request (from 0);
    ``line`` is its 1-based line in a JSON-lines body, None in a JSON array."""

    index: int
    raw: bytes
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    """A valid event, ready to send: keyed by its user, its normalised bytes as the value."""

    index: int
    event_id: str
    key: bytes
    value: bytes
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """An invalid record: the reason in the contract's words, the raw bytes for its dead letter."""

    index: int
    error: InvalidRecord
    raw: bytes
    label: str  # one of REASON_LABELS, for the metrics
    line: int | None = None


Checked = Accepted | Rejected


def media_type(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` -> ``application/json`` (lower case, no parameters)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def split_body(body: bytes, content_type: str) -> list[RawRecord]:
    """The records of a request body; raise :class:`BodyError` when it is not a batch.

    ``content_type`` is a media type from :data:`JSON_TYPES` or :data:`LINES_TYPES`; the
    app answers any other with a 415 before calling this.
    """
    kind = media_type(content_type)
    if kind in LINES_TYPES:
        return _split_lines(body)
    if kind in JSON_TYPES:
        return _split_array(body)
    raise BodyError(f"unsupported Content-Type {content_type!r}; send application/json or application/x-ndjson")


def _split_lines(body: bytes) -> list[RawRecord]:
    records: list[RawRecord] = []
    for number, line in enumerate(body.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if line.strip():
            records.append(RawRecord(len(records), line, number))
    return records


def _split_array(body: bytes) -> list[RawRecord]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BodyError(
            f"the body is not valid JSON ({exc}); send a JSON array of event objects, or one event per line "
            "with Content-Type: application/x-ndjson so that a bad line is rejected alone"
        ) from None
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise BodyError(f"the body is a JSON {type(doc).__name__}; send a JSON array of event objects")
    return [RawRecord(i, orjson.dumps(element)) for i, element in enumerate(doc)]


def check_record(record: RawRecord, now: float, max_bytes: int = MAX_RECORD_BYTES) -> Checked:
    """Validate one record as every edge does; never raises for what a client sent.

    The size is checked before parsing (a 5 MB record is not worth decoding to refuse
    it); ``now`` is the receiver's clock for the future-timestamp rule.
    """
    raw = record.raw
    if len(raw) > max_bytes:
        return _reject(record, oversize(len(raw), max_bytes), "oversize")
    try:
        obj: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _reject(record, InvalidRecord("record", f"not valid JSON ({exc})"), "not_json")
    if not isinstance(obj, dict):
        return _reject(record, InvalidRecord("record", f"an event must be a JSON object, got {type(obj).__name__}"), "not_object")
    try:
        event = parse_event(obj, now=now)
    except InvalidRecord as err:
        label = err.field if err.field in REASON_LABELS else "unknown_field"
        return _reject(record, err, label)
    value = event.to_bytes()
    if len(value) > max_bytes:  # normalising never grows a record in practice; kept exact anyway
        return _reject(record, oversize(len(value), max_bytes), "oversize")
    return Accepted(record.index, event.event_id, event.user_id.encode(), value, record.line)


def _reject(record: RawRecord, error: InvalidRecord, label: str) -> Rejected:
    return Rejected(record.index, error, record.raw, label, record.line)


def check_batch(records: Sequence[RawRecord], now: float, max_bytes: int = MAX_RECORD_BYTES) -> list[Checked]:
    """:func:`check_record` for each record, in order."""
    return [check_record(r, now, max_bytes) for r in records]


def answer(checked: Sequence[Checked], confirmed: Sequence[bool]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body for a batch whose sends the broker confirmed or not.

    ``confirmed[i]`` says whether record i reached its topic: the events topic for an
    :class:`Accepted`, the dead letter for a :class:`Rejected`. 200 when all did, else 503.
    """
    if len(confirmed) != len(checked):
        raise ValueError(f"{len(confirmed)} confirmations for {len(checked)} records")
    results: list[dict[str, Any]] = []
    counts = {"accepted": 0, "rejected": 0, "unconfirmed": 0}
    for record, ok in zip(checked, confirmed):
        entry: dict[str, Any] = {"index": record.index}
        if record.line is not None:
            entry["line"] = record.line
        if isinstance(record, Accepted):
            status = "accepted" if ok else "unconfirmed"
            entry.update(status=status, event_id=record.event_id)
            if not ok:
                entry["reason"] = UNCONFIRMED_REASON
        else:
            status = "rejected"
            entry.update(status=status, field=record.error.field, reason=record.error.reason, dead_lettered=ok)
        counts[status] += 1
        results.append(entry)
    code = 200 if all(confirmed) else 503
    return code, {**counts, "results": results}
