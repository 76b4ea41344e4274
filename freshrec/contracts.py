"""Records that cross a process boundary, and the rules that decide what is valid.

Validation happens at the edge (producer, flow input, HTTP request) and everything
inside trusts these types. A rejected record raises :class:`InvalidRecord`, whose
``field`` and ``reason`` go verbatim into the dead-letter record, so an operator can
see which field was wrong and why without reading code.

On the wire every record is one orjson object.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

EventKind = Literal["view", "click", "cart", "purchase", "cancel", "search"]
EVENT_KINDS: tuple[str, ...] = ("view", "click", "cart", "purchase", "cancel", "search")

# Far above any valid record, below Kafka's 1 MB default message size; field limits say more.
MAX_RECORD_BYTES = 512 * 1024
MAX_ID_CHARS = 128
MAX_TITLE_CHARS = 1_000
MAX_DESCRIPTION_CHARS = 10_000
MAX_QUERY_CHARS = 1_000
# Producers' clocks drift; an event up to this far ahead of the receiver's clock is accepted.
MAX_FUTURE_SKEW_S = 300.0

# How much each kind says about what the shopper wants (train-pair weights, history weights).
KIND_WEIGHT: dict[str, float] = {
    "view": 0.25,
    "click": 0.5,
    "search": 0.5,
    "cart": 0.75,
    "purchase": 1.0,
    "cancel": 0.0,
}


class InvalidRecord(ValueError):
    """A record that must not enter the system; ``field`` names the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(exclude_none=True))


def _check_id(value: str, name: str) -> str:
    if not value:
        raise ValueError(f"{name} must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise ValueError(f"{name} is {len(value)} characters, the limit is {MAX_ID_CHARS}")
    return value


class Event(_Record):
    """One behaviour event. ``event_id`` is unique per event and makes replays idempotent."""

    event_id: str
    user_id: str
    kind: EventKind
    ts: float = Field(description="event time, Unix seconds")
    item_id: str | None = None
    query: str | None = Field(None, max_length=MAX_QUERY_CHARS)
    sent_at: float | None = Field(None, description="producer wall clock at send, for freshness probes")

    @field_validator("event_id", "user_id")
    @classmethod
    def _ids(cls, v: str, info: Any) -> str:
        return _check_id(v, info.field_name)

    @field_validator("ts")
    @classmethod
    def _ts(cls, v: float) -> float:
        if not np.isfinite(v) or v < 0:
            raise ValueError("must be a finite, non-negative Unix time in seconds")
        return v

    @model_validator(mode="after")
    def _kind_fields(self) -> Event:
        if self.kind == "search":
            if not self.query:
                raise ValueError("query: a search event needs non-empty query text")
        elif not self.item_id:
            raise ValueError(f"item_id: a {self.kind} event needs an item_id")
        if self.item_id is not None:
            _check_id(self.item_id, "item_id")
        return self


class CatalogItem(_Record):
    """An item upsert: the whole current record of one item."""

    op: Literal["upsert"] = "upsert"
    item_id: str
    title: str = Field(max_length=MAX_TITLE_CHARS)
    category: str = Field("", max_length=MAX_TITLE_CHARS)
    description: str = Field("", max_length=MAX_DESCRIPTION_CHARS)
    price: float | None = Field(None, ge=0)
    ts: float = 0.0

    @field_validator("item_id")
    @classmethod
    def _id(cls, v: str) -> str:
        return _check_id(v, "item_id")

    @field_validator("title")
    @classmethod
    def _title(cls, v: str) -> str:
        if not v:
            raise ValueError("title must not be empty")
        return v

    def text(self) -> str:
        """The text the encoder sees: title first, since it is the densest signal."""
        parts = [self.title]
        if self.category:
            parts.append(self.category)
        if self.description:
            parts.append(self.description)
        return " | ".join(parts)


class CatalogDelete(_Record):
    op: Literal["delete"] = "delete"
    item_id: str
    ts: float = 0.0

    @field_validator("item_id")
    @classmethod
    def _id(cls, v: str) -> str:
        return _check_id(v, "item_id")


CatalogRecord = CatalogItem | CatalogDelete


class TrainPair(_Record):
    """What the learner trains on: a context that led to a target item."""

    pair_id: str = Field(description="the event id it came from; the learner dedupes on it")
    user_id: str
    context_items: list[str] = Field(default_factory=list, description="most recent first")
    context_text: str
    context_texts: list[str] = Field(
        default_factory=list,
        description="each context item's text, in context_items order; the learner averages their vectors as "
        "serving builds a user vector (empty for a search-query context: context_text is the query)",
    )
    target_item: str
    target_text: str = ""
    weight: float = 1.0
    ts: float = 0.0


class AdapterAnnouncement(_Record):
    """Published on the adapters topic when the registry holds a new immutable version."""

    version: str
    parent: str | None = None
    path: str
    created: float
    metrics: dict[str, float] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Parsing at the edge


def _loads(raw: bytes | str | dict[str, Any], what: str) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        raw = raw.encode()
    if len(raw) > MAX_RECORD_BYTES:
        raise InvalidRecord("record", f"{len(raw)} bytes, the limit is {MAX_RECORD_BYTES}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRecord("record", f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InvalidRecord("record", f"a {what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _from_validation_error(exc: ValidationError) -> InvalidRecord:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "record"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    # Cross-field rules name their field in the message ("query: ...").
    if loc == "record" and ": " in msg and msg.split(": ", 1)[0].isidentifier():
        loc, msg = msg.split(": ", 1)
    if err["type"] == "literal_error" and loc == "kind":
        msg = f"unknown kind {err.get('input')!r}; expected one of {', '.join(EVENT_KINDS)}"
    if err["type"] == "missing":
        msg = "is required"
    return InvalidRecord(loc, msg)


def parse_event(raw: bytes | str | dict[str, Any], now: float | None = None) -> Event:
    """Validate one behaviour event; raise :class:`InvalidRecord` naming the field."""
    obj = _loads(raw, "event")
    try:
        event = Event.model_validate(obj)
    except ValidationError as exc:
        raise _from_validation_error(exc) from None
    now = time.time() if now is None else now
    if event.ts > now + MAX_FUTURE_SKEW_S:
        raise InvalidRecord("ts", f"{event.ts:.0f} is {event.ts - now:.0f} s in the future")
    return event


def parse_catalog(raw: bytes | str | dict[str, Any]) -> CatalogRecord:
    """Validate one catalog record (``op`` is ``upsert``, the default, or ``delete``)."""
    obj = _loads(raw, "catalog record")
    op = obj.get("op", "upsert")
    model: type[CatalogItem] | type[CatalogDelete]
    if op == "upsert":
        model = CatalogItem
    elif op == "delete":
        model = CatalogDelete
    else:
        raise InvalidRecord("op", f"unknown op {op!r}; expected 'upsert' or 'delete'")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise _from_validation_error(exc) from None


# ---------------------------------------------------------------------------------------
# Item vectors and dead letters: plain dataclasses with hand-rolled codecs, since they are
# hot (one per item per adapter version) and a float list in JSON would be 4x larger.


@dataclass(frozen=True, slots=True)
class ItemVector:
    item_id: str
    adapter_version: str
    vector: np.ndarray | None  # float32, L2-normalised; None means the item was deleted
    ts: float = 0.0

    def to_bytes(self) -> bytes:
        vec = None
        if self.vector is not None:
            vec = base64.b64encode(np.asarray(self.vector, dtype=np.float32).tobytes()).decode()
        return orjson.dumps(
            {"item_id": self.item_id, "adapter_version": self.adapter_version, "vector": vec, "ts": self.ts}
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> ItemVector:
        obj = orjson.loads(raw)
        vec = obj.get("vector")
        arr = None if vec is None else np.frombuffer(base64.b64decode(vec), dtype=np.float32)
        return cls(obj["item_id"], obj["adapter_version"], arr, float(obj.get("ts", 0.0)))


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejected record with the reason; ``raw`` keeps the original bytes (base64)."""

    stage: str
    field: str
    reason: str
    raw: bytes
    source_topic: str = ""
    at: float = field(default_factory=time.time)

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "stage": self.stage,
                "field": self.field,
                "reason": self.reason,
                "source_topic": self.source_topic,
                "at": self.at,
                "raw_b64": base64.b64encode(self.raw).decode(),
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> DeadLetter:
        obj = orjson.loads(raw)
        return cls(
            obj["stage"], obj["field"], obj["reason"], base64.b64decode(obj["raw_b64"]), obj["source_topic"], obj["at"]
        )

    @classmethod
    def of(cls, stage: str, error: InvalidRecord, raw: bytes | str, source_topic: str = "") -> DeadLetter:
        data = raw.encode() if isinstance(raw, str) else raw
        return cls(stage, error.field, error.reason, data, source_topic)
