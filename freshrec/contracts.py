"""Records that cross a process boundary, and the rules that decide what is valid.

Validation happens at the edge (producer, flow input, HTTP request) and everything
inside trusts these types. A rejected record raises :class:`InvalidRecord`, whose
``field`` and ``reason`` go verbatim into the dead-letter record, so an operator can
see which field was wrong and why without reading code.

On the wire every record is one orjson object.
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

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

# A dead letter must always fit where a rejected record did not: Kafka's default message
# limit is 1 MB, and a rejected record may be any size (a 5 MB line, an 800 kB record
# written straight to the topic). So a dead letter keeps only this prefix of the raw
# bytes, plus the whole record's size and SHA-256 to find the original at its source.
# 16 kB holds every valid record whole (the largest valid catalog record is ~12k chars)
# and is enough to see what a broken one looked like; base64 makes it ~21.9 kB.
DEAD_LETTER_RAW_BYTES = 16 * 1024
# Reasons quote inputs (an unknown kind, an unknown field's name), which may be huge.
DEAD_LETTER_REASON_CHARS = 1_000
DEAD_LETTER_FIELD_CHARS = 200
DEAD_LETTER_NAME_CHARS = 300  # stage and source topic (Kafka topic names are <= 249 chars)
# The hard bound on a serialized dead letter: the base64 prefix, every string at its
# char limit with JSON's worst escaping (6 bytes a char, "\u0000"), the numbers and keys.
MAX_DEAD_LETTER_BYTES = (
    4 * ((DEAD_LETTER_RAW_BYTES + 2) // 3)
    + 6 * (DEAD_LETTER_REASON_CHARS + DEAD_LETTER_FIELD_CHARS + 2 * DEAD_LETTER_NAME_CHARS)
    + 512
)

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


def _refuse_bool(value: Any) -> Any:
    # pydantic's lax mode turns true/false into 1.0/0.0: "ts": true would be stored as
    # 1970. Only booleans are refused; numeric strings and numpy scalars stay accepted.
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got the boolean {str(value).lower()}; send a JSON number")
    return value


# A float that refuses booleans: every numeric field of a record crossing a boundary.
Number = Annotated[float, BeforeValidator(_refuse_bool)]


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
    ts: Number = Field(description="event time, Unix seconds")
    item_id: str | None = None
    query: str | None = Field(None, max_length=MAX_QUERY_CHARS)
    sent_at: Number | None = Field(None, description="producer wall clock at send, for freshness probes")

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
    price: Number | None = Field(None, ge=0)
    ts: Number = 0.0

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
    ts: Number = 0.0

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
    weight: Number = 1.0
    ts: Number = 0.0


class AdapterAnnouncement(_Record):
    """Published on the adapters topic when the registry holds a new immutable version."""

    version: str
    parent: str | None = None
    path: str
    created: Number
    metrics: dict[str, Number] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Parsing at the edge


def oversize(size: int, limit: int = MAX_RECORD_BYTES) -> InvalidRecord:
    """The rejection of a record of ``size`` bytes over ``limit``; one wording everywhere."""
    return InvalidRecord(
        "record", f"record is {size} bytes, over the {limit}-byte limit; shorten its fields or split it"
    )


def _loads(raw: bytes | str | dict[str, Any], what: str) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        # A lone surrogate cannot be UTF-8; keep it visible instead of raising.
        raw = raw.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_RECORD_BYTES:
        raise oversize(len(raw))
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


def _bounded(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` chars (saying how much was cut), encodable as UTF-8."""
    # A lone surrogate (from a str record) would make orjson refuse the whole letter;
    # escaped first, so the cut below also bounds the escapes.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        keep = limit - 40
        text = f"{text[:keep]}... ({len(text) - keep} chars cut)"
    return text


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejected record with the reason, small enough to always be delivered.

    ``raw`` keeps at most :data:`DEAD_LETTER_RAW_BYTES` of the original bytes (base64 on
    the wire); ``raw_size`` and ``raw_sha256`` describe the whole original, so a record
    cut short can still be found and matched at its source. Every string is bounded too,
    so :meth:`to_bytes` is never longer than :data:`MAX_DEAD_LETTER_BYTES` (~32 kB),
    whatever was rejected: the dead letter of a record refused for its size must not be
    refused for its own. The cut happens on construction, so every way of building one
    (``of``, the constructor, ``from_bytes``) keeps the bound.
    """

    stage: str
    field: str
    reason: str
    raw: bytes
    source_topic: str = ""
    at: float = dataclass_field(default_factory=time.time)
    # Of the whole original; left at their defaults they are computed from ``raw``.
    raw_size: int = -1
    raw_sha256: str = ""

    def __post_init__(self) -> None:
        raw = bytes(self.raw)
        if self.raw_size < 0:
            object.__setattr__(self, "raw_size", len(raw))
            object.__setattr__(self, "raw_sha256", hashlib.sha256(raw).hexdigest())
        object.__setattr__(self, "raw", raw[:DEAD_LETTER_RAW_BYTES])
        object.__setattr__(self, "stage", _bounded(str(self.stage), DEAD_LETTER_NAME_CHARS))
        object.__setattr__(self, "field", _bounded(str(self.field), DEAD_LETTER_FIELD_CHARS))
        object.__setattr__(self, "reason", _bounded(str(self.reason), DEAD_LETTER_REASON_CHARS))
        object.__setattr__(self, "source_topic", _bounded(str(self.source_topic), DEAD_LETTER_NAME_CHARS))
        object.__setattr__(self, "raw_sha256", _bounded(str(self.raw_sha256), 64))

    @property
    def truncated(self) -> bool:
        """True when ``raw`` is only a prefix of the rejected record."""
        return len(self.raw) < self.raw_size

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "stage": self.stage,
                "field": self.field,
                "reason": self.reason,
                "source_topic": self.source_topic,
                "at": self.at,
                "raw_b64": base64.b64encode(self.raw).decode(),
                "raw_size": self.raw_size,
                "raw_sha256": self.raw_sha256,
                "truncated": self.truncated,
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> DeadLetter:
        """Read a dead letter; one written before ``raw_size`` existed held the whole raw."""
        obj = orjson.loads(raw)
        data = base64.b64decode(obj["raw_b64"])
        size = obj.get("raw_size")
        if size is None:  # the old shape: the whole original, so size and hash come from it
            return cls(obj["stage"], obj["field"], obj["reason"], data, obj["source_topic"], obj["at"])
        return cls(
            obj["stage"], obj["field"], obj["reason"], data, obj["source_topic"], obj["at"],
            min(max(int(size), 0), 2**63 - 1), str(obj.get("raw_sha256", "")),
        )

    @classmethod
    def of(cls, stage: str, error: InvalidRecord, raw: bytes | str, source_topic: str = "") -> DeadLetter:
        data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
        return cls(stage, error.field, error.reason, data, source_topic)
