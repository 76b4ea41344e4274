"""What the user-state flow keeps per shopper, and the pure rules that update it.

No Kafka, Redis or Bytewax in here: :func:`apply_event` is a plain function over a
:class:`UserState`, so the rules below are unit-tested in microseconds and the flow,
the tests' in-memory reference computation and a replay after a crash all run the very
same code.

Rules (all decided by the event's own fields and the order events reach the flow, never
by the wall clock, so replaying the same events gives the same state byte for byte):

* **History** holds the last ``history_size`` item interactions (view, click, cart,
  purchase, cancel) ordered by event time, most recent first. An event that arrives
  late (older than some already applied) is inserted at its event-time position; one
  older than everything in a full history is not kept (it still counts in ``freq``).
  Events with equal times (a basket: one invoice, many lines) keep arrival order, the
  later-arriving one counting as more recent.
* **freq** is the user's decayed purchase count per item *as of* ``freq_ts`` (half-life
  ``repeat_half_life_days``): each purchase at time t adds ``2 ** -((freq_ts - t) / h)``.
  Since that sum does not depend on the order of its terms, a late purchase is simply
  added with its own decay; a newer one first moves ``freq_ts`` forward. A ``cancel``
  subtracts one purchase of that item at the cancel's time (floored at zero: a cancel of
  something never bought changes nothing). Entries that decay below
  :data:`FREQ_EPSILON` are dropped and at most ``max_freq_items`` are kept. It decides
  whether a cancel undoes one of the shopper's purchases (:func:`cancel_undoes_purchase`,
  which popularity follows); serving ranks by the baskets below instead.
* **Baskets** (the repeat signal serving ranks by): a basket is the set of the
  shopper's purchases at one event time (one invoice). ``baskets`` holds the times of
  their ``baskets_kept`` most recent baskets, newest first, and ``basket_bits`` one
  integer per item whose bit *j* says "in the *j*-th newest basket". An item's repeat
  score (:meth:`UserState.basket_scores`) is ``sum over its baskets of decay ** j``:
  how often it was in the shopper's recent baskets, counted in baskets rather than in
  days (after Hu et al., SIGIR 2020, "Modeling Personalized Item Frequency Information
  for Next-basket Recommendation"), so a weekly re-orderer and a twice-a-year one are
  both ranked by their own last few orders. The state is a function of the *set* of
  (item, basket time) pairs seen, so arrival order, late lines and duplicate lines of
  one item in a basket change nothing (up to the ``max_freq_items`` cap, which drops
  the weakest items as they come); a basket older than every kept one is not kept
  (its weight would be below ``decay ** baskets_kept``). A cancel does not
  remove the item from its basket: on online_retail_ii, basket counts that ignore
  returns ranked re-orders better than purchase counts with returns subtracted
  (docs/eval_online_retail_ii.md; that comparison also dedupes lines, and the two
  differences were not measured apart).
* **search** events do not enter the history (they have no item); the latest query and
  its time are kept so a following click can be paired with the query that led to it.
* **Duplicates**: the ids of the last ``dedupe_ids`` applied events are kept; an event
  whose id is among them is ignored (a producer retry or a re-sent batch). Repeats
  further apart (the same file replayed twice) are caught before this, by the partition's
  window of the last ``stream_dedupe_window`` event ids (:mod:`streams.dedupe`). Crash
  replays are not handled here but by offsets, see :mod:`streams.user_partition`.

Wire format (the one place it is defined; :mod:`stores.user_store` reads and writes
it under the key ``<redis_prefix>user:<user_id>``), one orjson object::

    {"v": 2, "user_id": "u1",
     "history": [["item", "purchase", 1301000000.0], ...],   # most recent first
     "freq": {"item": 1.83, ...}, "freq_ts": 1301000000.0,
     "baskets": [1301000000.0, ...],                          # newest first
     "basket_bits": {"item": 5, ...},                         # bit j: in baskets[j]
     "last_ts": 1301000000.0, "events": 42,                  # events applied so far
     "query": "red mug" | null, "query_ts": 0.0,
     "last_event_id": "ds:17", "recent_ids": ["ds:16", "ds:17"]}

Popularity (:class:`Popularity`) uses the same decayed-count arithmetic per item, with
its own half-life, for the purchase counts of everyone. A cancel lowers it only when it
undid one of the user's own purchases (:func:`cancel_undoes_purchase`), a per-user fact,
so the partial counters of different partitions add up to the same total.

Popularity also keeps each item's **first-seen time**: the earliest event time of any
applied event of the item (view, click, cart, purchase or cancel). Serving's log blend
calls an item first seen within ``blend_new_days`` a new arrival. A minimum does not
depend on the order events arrive in (a late event can only lower it) and the minima of
partitions merge by taking the minimum, so it keeps exactly-once and merges exactly,
like the counts.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from freshrec.contracts import Event

FORMAT_VERSION = 2
DAY_S = 86_400.0
# A decayed count below this is indistinguishable from "never bought" for scoring.
FREQ_EPSILON = 1e-3
# basket_bits are plain ints in the wire format; orjson writes integers up to 64 bits.
MAX_BASKETS_KEPT = 63
HISTORY_KINDS = frozenset({"view", "click", "cart", "purchase", "cancel"})


@dataclass(frozen=True, slots=True)
class Interaction:
    """One item interaction in a user's history."""

    item_id: str
    kind: str
    ts: float


@dataclass(slots=True)
class UserState:
    """One shopper's recent behaviour, as serving and the train-pair builder need it.

    ``history`` is most recent first; ``freq`` is as of ``freq_ts``; ``baskets`` and
    ``basket_bits`` are the recent baskets (see module doc). ``events`` counts applied
    events; ``recent_ids`` is the duplicate window.
    """

    user_id: str
    history: list[Interaction] = field(default_factory=list)
    freq: dict[str, float] = field(default_factory=dict)
    freq_ts: float = 0.0
    last_ts: float = 0.0
    events: int = 0
    query: str | None = None
    query_ts: float = 0.0
    last_event_id: str | None = None
    recent_ids: list[str] = field(default_factory=list)
    baskets: list[float] = field(default_factory=list)
    basket_bits: dict[str, int] = field(default_factory=dict)

    # -- scoring helpers ---------------------------------------------------------------

    def basket_scores(self, decay: float) -> dict[str, float]:
        """Per item, ``sum of decay ** j`` over the kept baskets *j* (0 = newest) holding it.

        The repeat signal serving and the evaluation rank by; only relative values matter
        (the blend divides by the shopper's maximum).
        """
        powers = [decay**j for j in range(len(self.baskets))]
        out: dict[str, float] = {}
        for item, bits in self.basket_bits.items():
            total = 0.0
            while bits:
                low = bits & -bits
                total += powers[low.bit_length() - 1]
                bits ^= low
            out[item] = total
        return out

    def recent_items(self, limit: int | None = None, before_ts: float | None = None) -> list[str]:
        """Distinct item ids of the history, most recent first, cancels left out.

        ``before_ts`` keeps only interactions strictly earlier than it, which is how the
        items of one basket are kept out of each other's context.
        """
        out: list[str] = []
        seen: set[str] = set()
        start = 0 if before_ts is None else first_before(self.history, before_ts)
        for it in itertools.islice(self.history, start, None):
            if it.kind == "cancel" or it.item_id in seen:
                continue
            seen.add(it.item_id)
            out.append(it.item_id)
            if limit is not None and len(out) >= limit:
                break
        return out

    # -- (de)serialisation -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "user_id": self.user_id,
            "history": [[i.item_id, i.kind, i.ts] for i in self.history],
            "freq": self.freq,
            "freq_ts": self.freq_ts,
            "last_ts": self.last_ts,
            "events": self.events,
            "query": self.query,
            "query_ts": self.query_ts,
            "last_event_id": self.last_event_id,
            "recent_ids": self.recent_ids,
            "baskets": self.baskets,
            "basket_bits": self.basket_bits,
        }

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> UserState:
        version = obj.get("v", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"user state format v{version} is not readable by this version (v{FORMAT_VERSION}); "
                "replay the events topic into a fresh redis_prefix"
            )
        return cls(
            user_id=obj["user_id"],
            history=[Interaction(i, k, float(t)) for i, k, t in obj.get("history", ())],
            freq={k: float(v) for k, v in obj.get("freq", {}).items()},
            freq_ts=float(obj.get("freq_ts", 0.0)),
            last_ts=float(obj.get("last_ts", 0.0)),
            events=int(obj.get("events", 0)),
            query=obj.get("query"),
            query_ts=float(obj.get("query_ts", 0.0)),
            last_event_id=obj.get("last_event_id"),
            recent_ids=list(obj.get("recent_ids", ())),
            baskets=[float(t) for t in obj.get("baskets", ())],
            basket_bits={k: int(v) for k, v in obj.get("basket_bits", {}).items()},
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> UserState:
        return cls.from_dict(orjson.loads(raw))


@dataclass(frozen=True, slots=True)
class StateRules:
    """The knobs of :func:`apply_event`, taken from Settings once per flow."""

    history_size: int = 100
    repeat_half_life_s: float = 180 * DAY_S  # Settings.repeat_half_life_days
    dedupe_ids: int = 64
    max_freq_items: int = 256
    baskets_kept: int = 63  # Settings.stream_baskets_kept, at most MAX_BASKETS_KEPT

    def __post_init__(self) -> None:
        if not 1 <= self.baskets_kept <= MAX_BASKETS_KEPT:
            raise ValueError(f"baskets_kept is {self.baskets_kept}; it must be 1..{MAX_BASKETS_KEPT} (bits of one int)")

    @classmethod
    def from_settings(cls, settings: Any) -> StateRules:
        return cls(
            history_size=settings.history_size,
            repeat_half_life_s=settings.repeat_half_life_days * DAY_S,
            dedupe_ids=settings.stream_dedupe_ids,
            max_freq_items=settings.stream_max_freq_items,
            baskets_kept=settings.stream_baskets_kept,
        )


DEFAULT_RULES = StateRules()


def first_before(history: list[Interaction], ts: float) -> int:
    """Index of the first interaction strictly older than ``ts`` (history is newest first).

    A binary search: a basket of hundreds of lines would otherwise be rescanned per line.
    """
    return bisect.bisect_right(history, -ts, key=_neg_ts)


def _neg_ts(it: Interaction) -> float:
    return -it.ts


def decay_factor(age_s: float, half_life_s: float) -> float:
    """Weight of something ``age_s`` seconds old under exponential decay."""
    return math.exp2(-age_s / half_life_s)


def decayed_add(value: float, value_ts: float, weight: float, ts: float, half_life_s: float) -> tuple[float, float]:
    """Add ``weight`` at time ``ts`` to a decayed count ``value`` held as of ``value_ts``.

    Returns the new ``(value, as_of)``; the result does not depend on the order in which
    weights are added (up to float rounding), which is what makes late events harmless.
    """
    if ts >= value_ts:
        return value * decay_factor(ts - value_ts, half_life_s) + weight, ts
    return value + weight * decay_factor(value_ts - ts, half_life_s), value_ts


def _advance_freq(state: UserState, ts: float, rules: StateRules) -> None:
    """Move ``freq`` forward to ``ts`` (no-op for an equal or older time)."""
    if ts <= state.freq_ts:
        return
    if state.freq:
        factor = decay_factor(ts - state.freq_ts, rules.repeat_half_life_s)
        state.freq = {k: v * factor for k, v in state.freq.items() if v * factor >= FREQ_EPSILON}
    state.freq_ts = ts


def _update_freq(state: UserState, item_id: str, sign: float, ts: float, rules: StateRules) -> None:
    if sign < 0 and item_id not in state.freq:
        return
    _advance_freq(state, ts, rules)
    weight = decay_factor(state.freq_ts - ts, rules.repeat_half_life_s)
    value = state.freq.get(item_id, 0.0) + sign * weight
    if value < FREQ_EPSILON:
        state.freq.pop(item_id, None)
        return
    state.freq[item_id] = value
    if len(state.freq) > rules.max_freq_items:
        # Drop the weakest, an eighth at a time so a heavy buyer does not pay a full
        # scan per purchase; ties by item id keep the choice deterministic.
        keep = rules.max_freq_items - rules.max_freq_items // 8
        ranked = sorted(state.freq.items(), key=lambda kv: (-kv[1], kv[0]))[:keep]
        state.freq = dict(ranked)


def _add_to_basket(state: UserState, item_id: str, ts: float, rules: StateRules) -> None:
    """Mark ``item_id`` as in the shopper's basket at ``ts`` (see "Baskets" in the module doc)."""
    baskets = state.baskets
    # Position = number of kept baskets newer than ts (the list is newest first).
    pos = bisect.bisect_left(baskets, -ts, key=_neg)
    if pos >= len(baskets) or baskets[pos] != ts:
        if pos >= rules.baskets_kept:
            return  # older than every kept basket
        baskets.insert(pos, ts)
        # Baskets from pos on move one place older: shift their bits up by one.
        keep = (1 << rules.baskets_kept) - 1
        low = (1 << pos) - 1
        bits = state.basket_bits
        for other, b in list(bits.items()):
            moved = ((b & ~low) << 1 | (b & low)) & keep
            if moved:
                bits[other] = moved
            else:
                del bits[other]
        del baskets[rules.baskets_kept :]
    state.basket_bits[item_id] = state.basket_bits.get(item_id, 0) | (1 << pos)
    if len(state.basket_bits) > rules.max_freq_items:
        # As for freq: drop the weakest an eighth at a time; weakest = in the fewest kept
        # baskets, then the least recently bought (the state knows no decay: that is a
        # scoring setting), then by item id so the choice is deterministic.
        keep_n = rules.max_freq_items - rules.max_freq_items // 8
        ranked = sorted(state.basket_bits.items(), key=lambda kv: (-kv[1].bit_count(), _newest_bit(kv[1]), kv[0]))
        state.basket_bits = dict(ranked[:keep_n])


def _newest_bit(bits: int) -> int:
    return (bits & -bits).bit_length() - 1


def _neg(ts: float) -> float:
    return -ts


def _insert_history(state: UserState, interaction: Interaction, history_size: int) -> None:
    history = state.history
    ts = interaction.ts
    if not history or ts >= history[0].ts:
        history.insert(0, interaction)
    else:
        # First position whose time is <= ts: a late event goes after everything newer
        # and before older ones or equal-time ones that arrived earlier.
        pos = next((i for i, it in enumerate(history) if it.ts <= ts), len(history))
        if pos >= history_size:
            return
        history.insert(pos, interaction)
    if len(history) > history_size:
        del history[history_size:]


def apply_event(state: UserState, event: Event, rules: StateRules = DEFAULT_RULES) -> bool:
    """Apply one valid event of ``state.user_id`` in place; False if it was a duplicate.

    See the module docstring for the rules (late events, baskets, cancel, search).
    """
    if event.user_id != state.user_id:
        raise ValueError(f"event {event.event_id} is for user {event.user_id!r}, not {state.user_id!r}")
    if event.event_id in state.recent_ids:
        return False
    kind = event.kind
    ts = event.ts
    if kind == "search":
        if ts >= state.query_ts:
            state.query, state.query_ts = event.query, ts
    elif event.item_id is not None and kind in HISTORY_KINDS:
        _insert_history(state, Interaction(event.item_id, kind, ts), rules.history_size)
        if kind == "purchase":
            _update_freq(state, event.item_id, 1.0, ts, rules)
            _add_to_basket(state, event.item_id, ts, rules)
        elif kind == "cancel":
            _update_freq(state, event.item_id, -1.0, ts, rules)
    if ts > state.last_ts:
        state.last_ts = ts
    state.events += 1
    state.last_event_id = event.event_id
    if rules.dedupe_ids > 0:
        state.recent_ids.append(event.event_id)
        if len(state.recent_ids) > rules.dedupe_ids:
            del state.recent_ids[: len(state.recent_ids) - rules.dedupe_ids]
    return True


def cancel_undoes_purchase(state: UserState, event: Event) -> bool:
    """Whether a cancel (judged before applying it) takes back a purchase of this user."""
    return event.kind == "cancel" and event.item_id in state.freq


def popularity_weight(state: UserState, event: Event) -> float:
    """What an event (judged before applying it) adds to everyone's popularity of its item."""
    if event.kind == "purchase":
        return 1.0
    if cancel_undoes_purchase(state, event):
        return -1.0
    return 0.0


def replay_events(events: Iterable[Event], rules: StateRules = DEFAULT_RULES) -> dict[str, UserState]:
    """States of every user after applying ``events`` in order (the reference computation)."""
    states: dict[str, UserState] = {}
    for event in events:
        state = states.get(event.user_id)
        if state is None:
            state = states[event.user_id] = UserState(event.user_id)
        apply_event(state, event, rules)
    return states


# ---------------------------------------------------------------------------------------
# Popularity: everyone's purchases, decayed


@dataclass(slots=True)
class Popularity:
    """Decayed purchase counts per item; each entry is ``(count, as_of_ts)``; and first-seen times.

    Entries carry their own time so that partial counters (one per Kafka partition) can
    be merged exactly by :meth:`merge` and read at any later time. ``first_seen`` maps an
    item to the earliest event time of any of its events (see the module docstring).
    """

    half_life_s: float
    entries: dict[str, tuple[float, float]] = field(default_factory=dict)
    newest_ts: float = 0.0
    first_seen: dict[str, float] = field(default_factory=dict)

    def observe(self, ts: float) -> None:
        """Note an event time (of any kind): popularity is read as of the newest one."""
        if ts > self.newest_ts:
            self.newest_ts = ts

    def see(self, item_id: str, ts: float) -> bool:
        """Note an event of ``item_id`` at ``ts`` (any kind); True if that is its earliest yet.

        The caller writes the items for which this returned True: only those changed.
        """
        old = self.first_seen.get(item_id)
        if old is not None and old <= ts:
            return False
        self.first_seen[item_id] = ts
        return True

    def add(self, item_id: str, weight: float, ts: float) -> None:
        """Count a purchase (+1) or an undone purchase (-1) of ``item_id`` at ``ts``.

        Plain linear arithmetic, no flooring: partial counters may dip below zero and
        still add up exactly; :meth:`scores` floors the total. The event also counts as
        a sighting of the item (:meth:`see`).
        """
        self.observe(ts)
        self.see(item_id, ts)
        value, as_of = self.entries.get(item_id, (0.0, ts))
        self.entries[item_id] = decayed_add(value, as_of, weight, ts, self.half_life_s)

    def scores(self, now_ts: float | None = None) -> dict[str, float]:
        """Every item's count decayed to ``now_ts`` (default: the newest event time seen)."""
        now = self.newest_ts if now_ts is None else now_ts
        # max(value, 0.0) * decay_factor(max(now - as_of, 0.0), h), inlined: the same float
        # operations in the same order (bit-identical), at half the time. This runs over
        # every item for every basket in the collab flow and the evaluation (profile:
        # docs/scale.md), so the call overhead of two max() and decay_factor mattered.
        h = self.half_life_s
        exp2 = math.exp2
        return {
            item: (0.0 if value < 0.0 else value) * exp2(-(0.0 if (age := now - as_of) < 0.0 else age) / h)
            for item, (value, as_of) in self.entries.items()
        }

    @staticmethod
    def merge(
        parts: Iterable[Mapping[str, tuple[float, float]]],
        half_life_s: float,
        newest_ts: float = 0.0,
        first_seen_parts: Iterable[Mapping[str, float]] = (),
    ) -> Popularity:
        """One counter from partial ones (exact: decayed sums add, first-seen times take the minimum)."""
        out = Popularity(half_life_s, newest_ts=newest_ts, first_seen=merge_first_seen(first_seen_parts))
        for part in parts:
            for item, (value, as_of) in part.items():
                if as_of > out.newest_ts:
                    out.newest_ts = as_of
                old = out.entries.get(item)
                if old is None:
                    out.entries[item] = (value, as_of)
                else:
                    out.entries[item] = decayed_add(old[0], old[1], value, as_of, half_life_s)
        return out


def merge_first_seen(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Per item, the earliest of the partial first-seen times (each partition saw some events)."""
    out: dict[str, float] = {}
    for part in parts:
        for item, ts in part.items():
            old = out.get(item)
            if old is None or ts < old:
                out[item] = ts
    return out
