"""All user state of one Kafka partition of ``events``, and how a batch of messages moves it.

Why state is keyed by Kafka partition and not by user: one Python call per batch of
messages instead of one per user per batch (Bytewax's per-key overhead dominates at
tens of thousands of events per second), and one atomic Redis write per batch that also
records the partition's offset. The producer keys events by user id, so a user's events
all live in one partition and arrive in offset order. A message without a key, or whose
key is not its ``user_id``, breaks that promise (an unkeyed user's events spread over
partitions, whose states would overwrite each other in Redis) and goes to dead-letter
with a reason that says how to key it.

How exactly-once holds (invariant 2 of DESIGN.md):

1. Bytewax recovery snapshots this object (:meth:`UserPartition.snapshot`) together with
   the Kafka offsets of the same epoch. After a crash, even a SIGKILL, the flow resumes
   from the last complete snapshot and re-reads the events after it, so the in-flow
   state applies each event exactly once.
2. Every update is a deterministic function of the snapshot and the events in offset
   order (event time, not the wall clock; validation's "too far in the future" is judged
   against the message's Kafka timestamp), so the replay recomputes byte-identical states.
3. Each batch is written to Redis, by the stateful step itself
   (:mod:`streams.partition_writer`), as one Lua call that overwrites the changed users'
   whole states and sets the partition's applied offset, and refuses any offset not
   beyond the one already stored (:func:`stores.user_store.write_partition_batch`).
   Writes of the replayed stretch, which Redis already holds, are therefore skipped;
   the first batch past the stored offset carries states that include every earlier
   event. Redis thus always equals "the state after exactly the events up to the
   applied offset" per partition: nothing lost, nothing counted twice, never moving back.
4. Redis may lose data the flow already wrote (restarted without persistence, replaced
   by an empty one, AOF's last second). The same Lua call notices that Redis holds less
   than this partition's offset *before* the batch, writes nothing, and the writer then
   sends :meth:`UserPartition.full_batch` (every user, all popularity and first-seen
   times of the partition) with the batch's offset in one call: Redis is again "the
   state after exactly the events up to the applied offset". An idle flow checks every
   ``stream_redis_check_s`` too. While Redis is unreachable the writer retries forever
   (:mod:`stores.redis_retry`): the flow stalls, and loses nothing.
5. The offsets are only meaningful for the incarnation of the topic they were read from
   (:mod:`freshrec.epochs`): Redis records the topic id beside them and refuses writes
   of another one; the flow then stops with :class:`~freshrec.epochs.EpochMismatch`.
6. Duplicate *events* (same ``event_id`` at another offset: a producer retry, the same
   file replayed twice) are dropped within the partition's last ``stream_dedupe_window``
   event ids (:mod:`streams.dedupe`), and per user within a short window of recent ids
   (:mod:`ranking.user_state`).

7. What the partition forgets (shoppers and items silent for ``stream_retention_days``,
   popularity beyond the top ``stream_popularity_items``: :mod:`streams.retention`) is
   decided in event time at points fixed by the event order, so a replay forgets the
   same; the batch carries what was forgotten and the same Lua call deletes it from Redis.

Train pairs and dead letters go to Kafka at least once: a replay re-sends those of the
replayed stretch, and consumers dedupe on ``pair_id`` (the event id).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from freshrec.contracts import DeadLetter, InvalidRecord, parse_event
from ranking.pairs import PairDraft, PairRules, pair_for
from ranking.user_state import DAY_S, Popularity, StateRules, UserState, apply_event, popularity_weight

from .dedupe import EventIdWindow
from .retention import Recency, popularity_to_cut

STAGE = "streams.users"
# v2 added popularity's first-seen times; a v1 snapshot lacks them, so resuming from it
# would call every old item "new" at its next event: refuse it instead. v3 added the
# partition's event-id window and its topic and partition (to rebuild Redis while idle);
# a v2 snapshot would accept every replayed event again. v4 added the recency orders that
# retention forgets by; a v3 snapshot is read with orders rebuilt from the states.
SNAPSHOT_VERSION = 4
UNKEYED_WHY = (
    "events must be keyed by user_id (the Kafka message key is the user_id as UTF-8; "
    "freshrec.producer and `freshrec produce` do this) so all of a user's events stay in one partition"
)


class SourceMessage(Protocol):
    """What the partition needs of a Kafka message (Bytewax's KafkaSourceMessage has it)."""

    key: bytes | None
    value: bytes | None
    topic: str | None
    offset: int | None
    partition: int | None
    timestamp: tuple[int, int] | None


def check_key(msg: SourceMessage, record_id: str, id_field: str, why: str) -> None:
    """Refuse a message without a Kafka key or whose key is not its record's id.

    Partition state is only right if every record of one id lands in one partition, which
    is what the key decides; ``why`` says that in the dead letter's own words. An unkeyed
    message is refused too: producers spread those over partitions.
    """
    if msg.key is None:
        raise InvalidRecord("key", f"message has no key; {why}")
    if msg.key != record_id.encode():
        raise InvalidRecord("key", f"message key {msg.key[:64]!r} is not the {id_field} {record_id!r}; {why}")


@dataclass
class UserBatch:
    """What one batch of messages changed: written to Redis and Kafka by the flow's sink."""

    topic: str
    partition: int
    last_offset: int
    first_offset: int = -1
    users: dict[str, bytes] = field(default_factory=dict)
    popularity: dict[str, tuple[float, float]] = field(default_factory=dict)
    newest_ts: float = 0.0
    first_seen: dict[str, float] = field(default_factory=dict)  # items whose first-seen time changed
    pairs: list[PairDraft] = field(default_factory=list)
    # Forgotten by retention (streams.retention): deleted from Redis in the same write.
    gone_users: set[str] = field(default_factory=set)
    gone_items: set[str] = field(default_factory=set)  # popularity entry and first-seen time
    gone_popularity: set[str] = field(default_factory=set)  # popularity entry only (top-N cut)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0


def message_time(msg: SourceMessage) -> float:
    """The message's Kafka timestamp in seconds (wall clock if the broker gave none)."""
    ts = msg.timestamp
    if ts is not None and ts[0] != 0 and ts[1] > 0:
        return ts[1] / 1000.0
    return time.time()


class UserPartition:
    """Users of one partition: apply batches of raw messages, snapshot, restore."""

    def __init__(
        self,
        rules: StateRules,
        pair_rules: PairRules,
        popularity_half_life_s: float,
        resume: Any | None = None,
        dedupe_window: int = 1_000_000,
        retention_s: float = 0.0,
        popularity_items: int = 100_000,
        live_states: int = 10_000,
    ) -> None:
        self.rules = rules
        self.pair_rules = pair_rules
        self.retention_s = retention_s  # 0: keep everything
        self.popularity_items = popularity_items
        self.live_states = live_states
        # Decoded states, least recently used first: a cache over _encoded, at most
        # live_states of them between batches (the encoded form is the state).
        self._live: dict[str, UserState] = {}
        self._encoded: dict[str, bytes] = {}
        self.popularity = Popularity(popularity_half_life_s)
        self.user_recency = Recency()
        self.item_recency = Recency()
        self.last_offset = -1
        # Known from the first message on (and from the snapshot): what the partition's
        # Redis keys are named after, needed to rebuild Redis before any new message.
        self.topic: str | None = None
        self.partition: int | None = None
        window: bytes | None = None
        if resume is not None:
            version = resume[0]
            if version == 3:
                resume = _from_v3(resume)
                version = resume[0]
            if version != SNAPSHOT_VERSION:
                raise ValueError(
                    f"snapshot v{version} is not readable (this version writes v{SNAPSHOT_VERSION}); "
                    f"clear {STAGE} recovery in state_dir/streams and the redis_prefix (`freshrec reset`), "
                    "then replay the events topic"
                )
            (_, encoded, entries, newest_ts, first_seen, last_offset, self.topic, self.partition, window,
             user_last, item_last) = resume
            self.user_recency = Recency(user_last)
            self.item_recency = Recency(item_last)
            self._encoded = dict(encoded)
            self.popularity.entries = dict(entries)
            self.popularity.newest_ts = newest_ts
            self.popularity.first_seen = dict(first_seen)
            self.last_offset = last_offset
        self.seen_ids = EventIdWindow(dedupe_window, window)

    @classmethod
    def from_settings(cls, settings: Any, resume: Any | None = None) -> UserPartition:
        return cls(
            StateRules.from_settings(settings),
            PairRules.from_settings(settings),
            settings.popularity_half_life_days * DAY_S,
            resume,
            settings.stream_dedupe_window,
            settings.stream_retention_days * DAY_S,
            settings.stream_popularity_items,
            settings.stream_live_states,
        )

    def state(self, user_id: str) -> UserState | None:
        live = self._live.pop(user_id, None)
        if live is None:
            raw = self._encoded.get(user_id)
            if raw is None:
                return None
            live = UserState.from_bytes(raw)
        self._live[user_id] = live  # most recently used last
        return live

    def users(self) -> dict[str, UserState]:
        """Every user of this partition (decodes all; for tests and tools)."""
        return {u: self.state(u) for u in self._encoded}  # type: ignore[misc]

    def apply(self, messages: Iterable[SourceMessage]) -> UserBatch:
        """Validate and apply messages in order; return what changed (and what was forgotten)."""
        batch: UserBatch | None = None
        changed: dict[str, UserState] = {}
        pop_changed: set[str] = set()
        seen_changed: set[str] = set()
        rules = self.rules
        popularity = self.popularity
        for msg in messages:
            if batch is None:
                batch = UserBatch(msg.topic or "", msg.partition or 0, self.last_offset, msg.offset or 0)
                self.topic, self.partition = batch.topic, batch.partition
            if msg.offset is not None:
                batch.last_offset = msg.offset
            raw = msg.value or b""
            try:
                event = parse_event(raw, now=message_time(msg))
                check_key(msg, event.user_id, "user_id", UNKEYED_WHY)
            except InvalidRecord as err:
                batch.dead_letters.append(DeadLetter.of(STAGE, err, raw, msg.topic or ""))
                continue
            if not self.seen_ids.add(event.event_id):
                batch.duplicates += 1
                continue
            user = event.user_id
            state = changed.get(user) or self.state(user)
            if state is None:
                state = self._live[user] = UserState(user)
            pop_weight = popularity_weight(state, event)
            if not apply_event(state, event, rules):
                batch.duplicates += 1
                continue
            batch.applied += 1
            changed[user] = state
            batch.gone_users.discard(user)  # forgotten earlier in this batch and back: SET replaces
            day = popularity.newest_ts // DAY_S
            popularity.observe(event.ts)
            self.user_recency.touch(user, event.ts)
            item = event.item_id
            if item is not None:
                self.item_recency.touch(item, event.ts)
                if item in batch.gone_items:  # back within the batch: first-seen is rewritten,
                    batch.gone_items.discard(item)  # the old popularity entry must still go
                    batch.gone_popularity.add(item)
                if popularity.see(item, event.ts):
                    seen_changed.add(item)
                if pop_weight:
                    popularity.add(item, pop_weight, event.ts)
                    pop_changed.add(item)
                    batch.gone_popularity.discard(item)
            pair = pair_for(state, event, self.pair_rules)
            if pair is not None:
                batch.pairs.append(pair)
            if self.retention_s > 0:
                self._forget(batch, changed, pop_changed, seen_changed)
            if popularity.newest_ts // DAY_S > day:
                self._cut_popularity(batch, pop_changed)
        if batch is None:
            return UserBatch("", 0, self.last_offset)
        for user, state in changed.items():
            self._encoded[user] = batch.users[user] = state.to_bytes()
        entries = popularity.entries
        batch.popularity = {i: entries[i] for i in pop_changed if i in entries}
        batch.newest_ts = popularity.newest_ts
        first_seen = popularity.first_seen
        batch.first_seen = {i: first_seen[i] for i in seen_changed if i in first_seen}
        self.last_offset = batch.last_offset
        self._trim_live()
        return batch

    def _forget(
        self, batch: UserBatch, changed: dict[str, UserState], pop_changed: set[str], seen_changed: set[str]
    ) -> None:
        """Forget shoppers and items with no event within the retention (:mod:`streams.retention`)."""
        cutoff = self.popularity.newest_ts - self.retention_s
        for user in self.user_recency.expired(cutoff):
            self._encoded.pop(user, None)
            self._live.pop(user, None)
            changed.pop(user, None)
            batch.gone_users.add(user)
        popularity = self.popularity
        for item in self.item_recency.expired(cutoff):
            popularity.entries.pop(item, None)
            popularity.first_seen.pop(item, None)
            pop_changed.discard(item)
            seen_changed.discard(item)
            batch.gone_popularity.discard(item)
            batch.gone_items.add(item)

    def _cut_popularity(self, batch: UserBatch, pop_changed: set[str]) -> None:
        """Keep the ``popularity_items`` largest popularity entries (once per event-time day)."""
        p = self.popularity
        for item in popularity_to_cut(p.entries, p.newest_ts, p.half_life_s, self.popularity_items):
            del p.entries[item]
            pop_changed.discard(item)
            batch.gone_popularity.add(item)

    def _trim_live(self) -> None:
        """Drop the least recently used decoded states beyond ``live_states`` (all are encoded)."""
        live = self._live
        excess = len(live) - self.live_states
        if excess > 0:
            for user in list(itertools.islice(live, excess)):
                del live[user]

    def full_batch(self) -> UserBatch | None:
        """The partition's whole state as one batch at :attr:`last_offset` (None before
        the first message): what Redis must hold of this partition, to rebuild it."""
        if self.topic is None or self.partition is None or self.last_offset < 0:
            return None
        return UserBatch(
            self.topic,
            self.partition,
            self.last_offset,
            users=dict(self._encoded),
            popularity=dict(self.popularity.entries),
            newest_ts=self.popularity.newest_ts,
            first_seen=dict(self.popularity.first_seen),
        )

    def snapshot(self) -> tuple[Any, ...]:
        """An immutable copy for Bytewax recovery: encoded states (cheap to copy and to
        pickle), popularity with first-seen times, the last offset applied, the topic and
        partition, and the event-id window (8 bytes per id)."""
        return (
            SNAPSHOT_VERSION,
            dict(self._encoded),
            dict(self.popularity.entries),
            self.popularity.newest_ts,
            dict(self.popularity.first_seen),
            self.last_offset,
            self.topic,
            self.partition,
            self.seen_ids.snapshot(),
            dict(self.user_recency.last),
            dict(self.item_recency.last),
        )


def _from_v3(resume: tuple[Any, ...]) -> tuple[Any, ...]:
    """A v3 snapshot in v4's form: the recency orders it lacks, rebuilt.

    Shoppers are ordered by their states' newest event times (exact). Items' last events
    were not kept, so every item counts as seen at the partition's newest time: none is
    forgotten before a whole retention has passed from here.
    """
    _, encoded, entries, newest_ts, first_seen, last_offset, topic, partition, window = resume
    users = sorted((UserState.from_bytes(raw).last_ts, user) for user, raw in encoded.items())
    items = sorted(set(first_seen) | set(entries))
    return (
        SNAPSHOT_VERSION, encoded, entries, newest_ts, first_seen, last_offset, topic, partition, window,
        {user: ts for ts, user in users}, dict.fromkeys(items, newest_ts),
    )
