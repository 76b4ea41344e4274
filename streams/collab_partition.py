"""The collaborative flow's state: the whole shop in one stateful partition, and how a batch moves it.

**Why one partition for the shop.** Co-purchase rows pair items bought by *any* shopper,
and a ranking example needs the nearest shoppers among *all* shoppers and the shop's
popularity: every event may read or change state that every other event touches. Split
by Kafka partition (as user state is), each part would see a quarter of the shop and the
parts would have to be merged for every example. So every message of every partition of
``events`` is keyed to one key (``"shop"``) and this object holds:

* a :class:`~ranking.user_state.UserState` per shopper, moved by the users flow's rules
  (``StateRules.from_settings``; the same ``apply_event``);
* a :class:`~ranking.collab.CollabState` (co-purchase rows with their memory bound, item
  statistics, popularity at a short and a long horizon with first-seen times);
* a :class:`~ranking.collab.ShopperIndex` of shopper vectors (exact search);
* served popularity (``Popularity(popularity_half_life_days)`` fed by ``popularity_weight``,
  as the users flow feeds it: what the ``log_pop`` feature and ``popular_top`` read);
* the event-id window (:mod:`streams.dedupe`) over the whole shop;
* the shoppers in order of their newest event (:class:`ranking.recency.Recency`): a shopper
  silent for ``stream_retention_days`` is forgotten before the next event (:meth:`_forget`),
  so memory and snapshots grow with the active shoppers (docs/scale.md);
* per source partition the last applied offset, and the open baskets awaiting their label.

The per-event rule and the example rule are docs/ranking_stage_contract.md's, word for
word (:meth:`CollabPartition._apply_event`).

**How exactly-once holds**, as for user state (:mod:`streams.user_partition`), plus one
thing user state does not need: a *deterministic order across source partitions*. The
messages of the four partitions reach the one stateful step interleaved in whatever order
Bytewax fetched them, and the collaborative state is not order-free: a co-purchase row cut
back to its top-k, a nearest-shopper search, a popularity order and so every ranking
example depend on which shoppers' events came first. A replay after a crash would fetch
another interleaving and compute other examples than the ones already sent, and rows that
disagree with what Redis already holds. So:

1. Each batch records its application order as runs ``[(partition, last offset), ...]``
   (:attr:`CollabBatch.runs`), and the writer stores them in Redis (``collab:order``, the
   last ``collab_order_log`` batches) in the same Lua call that writes the batch's state
   and the applied offsets of every source partition (:mod:`stores.collab_store`).
2. Bytewax snapshots this object (:meth:`snapshot`) with the Kafka offsets. On restart the
   flow reads the order log from Redis and :meth:`follow` s it: messages are held back per
   partition (:attr:`pending`, part of the snapshot) and applied in the recorded order up
   to what Redis holds; beyond it, in arrival order again. The replayed stretch is thus
   recomputed exactly: the same state and the same examples as the first time.
3. A batch whose offsets Redis already holds is not written (a replay). The offsets of
   all batches lie on one path (prefixes of one order), so Redis's offsets are either
   behind, inside or beyond a batch; a batch that straddles them writes its changed rows,
   which include every row changed since Redis's point. If Redis holds something off the
   path (lost data, a trimmed log), the writer rewrites the whole shop (:meth:`full_batch`).

Rank examples and shopper vectors go to Kafka at least once (a replay re-sends those of
the replayed stretch, identical); consumers dedupe on ``example_id`` / keep the latest
vector per shopper.

**Measured** (``python -m streams.collab_partition``, :func:`measure`: the bundled sample,
78,139 events, batches of 2,000, one process on the shared 2-core machine, 2026-12-03):

* apply: **727 events/s** here against **24,866 events/s** for the users partition's apply
  over the same messages in the same run (34x slower; 1,994 examples emitted). A profile
  of the first 20,000 events: ~40 % computing examples (per basket three popularity
  decays over every item, the nearest-shopper search, candidates and features), ~35 %
  co-purchase pairing in ``ranking.collab`` (a line pairs with up to 63 earlier lines,
  and rows past ``row_cap`` are sorted back to ``top_k``), ~10 % shopper vectors. The
  flow keeps up with the sample replayed at 1,500 events/s (the integration test), not
  with ``freshrec replay --speedup 20000``, which it then trails, losing nothing.
* memory after the whole sample (tracemalloc of each part rebuilt from its snapshot form):
  the collaborative state **30.0 MB** for 2,759 items and 191,932 co-purchase entries
  (of at most ``items x collab_row_cap`` = 275,900 at the row cap of 100 then): **156
  bytes per entry**, so at most ~31 kB per item at today's full row of 200 (rows are cut
  by cosine since 2026-12-05 and keep twice as many partners), plus up to ~6.5 kB per row
  read since its last change (``CoPurchase``'s cached arrays, not snapshotted); the shoppers' states **24.8 MB** for 2,023
  shoppers, **12.3 kB per shopper** as Python objects (2.7 kB encoded, kept beside them
  for the snapshot); the shopper index 1 kB per shopper (256 float32, grown by doubling:
  2.1 MB here); the event-id window 86 bytes per event id (:mod:`streams.dedupe`). The
  snapshot holds the encoded states and 6.6 MB of orjson for the collaborative state.
"""

from __future__ import annotations

import base64
import heapq
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from freshrec.contracts import DeadLetter, Event, InvalidRecord, parse_event
from ranking.collab import CollabRules, CollabState, ShopperIndex, shopper_vector
from ranking.features import (
    FEATURE_SCHEMA,
    FeatureRules,
    ShopperView,
    ShopView,
    candidates,
    feature_matrix,
    labels,
    rows_needed,
    shop_view_at,
    shopper_signals,
)
from ranking.recency import Recency
from ranking.user_state import DAY_S, Popularity, StateRules, UserState, apply_event, popularity_weight

from .dedupe import EventIdWindow
from .user_partition import UNKEYED_WHY, SourceMessage, check_key, message_time

STAGE = "streams.collab"
# v2 adds the shoppers' recency order (retention); v1 is read with it rebuilt from the
# states' newest event times. Any other version is refused (clear the recovery and the
# prefix, replay).
SNAPSHOT_VERSION = 2
# An open basket is labelled and sent when the shopper's next event has a larger time, or
# when the flow's event time passes the basket's time by this much (the contract's rule).
BASKET_CLOSE_S = 3600.0


@dataclass(frozen=True, slots=True)
class Message:
    """A Kafka message as plain data: what the partition holds back while it follows a recorded order."""

    key: bytes | None
    value: bytes | None
    topic: str | None
    offset: int | None
    partition: int | None
    timestamp: tuple[int, int] | None

    @classmethod
    def of(cls, msg: SourceMessage) -> Message:
        if isinstance(msg, Message):
            return msg
        return cls(msg.key, msg.value, msg.topic, msg.offset, msg.partition, msg.timestamp)

    def astuple(self) -> tuple[Any, ...]:
        return (self.key, self.value, self.topic, self.offset, self.partition, self.timestamp)


@dataclass(slots=True)
class OpenBasket:
    """A ranking example computed at a basket's first line, waiting for the basket's other lines."""

    user_id: str
    ts: float
    items: list[str]
    sources: bytes  # uint8 per item
    features: bytes  # float32 little-endian, row-major (n x 17)
    history: list[list[Any]]
    basket: list[str] = field(default_factory=list)

    def record(self) -> bytes:
        """The contract's rank-examples value."""
        return orjson.dumps({
            "example_id": example_id(self.user_id, self.ts),
            "user_id": self.user_id,
            "ts": self.ts,
            "schema": FEATURE_SCHEMA,
            "items": self.items,
            "sources": list(self.sources),
            "features_f32": base64.b64encode(self.features).decode(),
            "labels": [int(v) for v in labels(self.items, self.basket)],
            "basket": self.basket,
            "history": self.history,
        })

    def astuple(self) -> tuple[Any, ...]:
        return (self.user_id, self.ts, self.items, self.sources, self.features, self.history, list(self.basket))


def example_id(user_id: str, ts: float) -> str:
    """``<user_id>@<ts>``: one example per shopper and basket time (repr keeps the float exact)."""
    return f"{user_id}@{ts!r}"


@dataclass
class CollabBatch:
    """What one batch changed: Redis writes (by the stateful step) and Kafka records (by the sink).

    ``rows`` are the changed co-purchase rows as stored (orjson ``{other: [value, as_of]}``);
    ``vectors`` the changed shopper vectors (float32 bytes; None: the shopper has none any more).
    """

    topic: str
    offsets: dict[str, int]
    prev_offsets: dict[str, int]
    runs: list[tuple[int, int]] = field(default_factory=list)
    rows: dict[str, bytes] = field(default_factory=dict)
    stats: dict[str, tuple[int, int]] = field(default_factory=dict)
    pop_short: dict[str, tuple[float, float]] = field(default_factory=dict)
    pop_long: dict[str, tuple[float, float]] = field(default_factory=dict)
    first_seen: dict[str, float] = field(default_factory=dict)
    newest_ts: float = 0.0
    vectors: dict[str, bytes | None] = field(default_factory=dict)
    examples: list[tuple[str, bytes]] = field(default_factory=list)  # (user_id, record)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0
    forgotten: int = 0  # shoppers forgotten by retention (their vectors are None in ``vectors``)

    @property
    def empty(self) -> bool:
        return not self.topic or self.offsets == self.prev_offsets


def vector_bytes(vec: np.ndarray | None) -> bytes | None:
    return None if vec is None else vec.astype("<f4").tobytes()


class CollabPartition:
    """The shop's collaborative state: apply batches of raw messages, snapshot, restore."""

    def __init__(
        self,
        state_rules: StateRules,
        collab_rules: CollabRules,
        feature_rules: FeatureRules,
        neighbours: int,
        popularity_half_life_s: float,
        resume: Any | None = None,
        dedupe_window: int = 1_000_000,
        retention_s: float = 0.0,
    ) -> None:
        self.state_rules = state_rules
        # Shoppers with no event for this long (event time) are forgotten (0: keep all):
        # :meth:`_forget` and docs/ranking_stage_contract.md.
        self.retention_s = retention_s
        self.recency = Recency()
        self.collab_rules = collab_rules
        self.feature_rules = feature_rules
        self.neighbours = neighbours
        self.states: dict[str, UserState] = {}
        self._encoded: dict[str, bytes] = {}
        self.collab = CollabState(collab_rules)
        self.index = ShopperIndex(collab_rules.shopper_dim)
        self.served = Popularity(popularity_half_life_s)
        self.offsets: dict[str, int] = {}  # str(partition) -> last applied offset
        self.topic: str | None = None
        self.flow_ts = 0.0  # the newest event time applied: closes baskets by timeout
        self.open: dict[tuple[str, float], OpenBasket] = {}
        self._deadlines: list[tuple[float, str]] = []  # (basket ts, user_id), a heap
        self.plan: deque[tuple[int, int]] = deque()
        self.pending: dict[int, deque[Message]] = {}
        self._version = 0  # applied events: a cached shop view is stale once it moves
        self._shop: tuple[float, int, ShopView] | None = None
        window: bytes | None = None
        if resume is not None:
            window = self._restore(resume)
        self.seen_ids = EventIdWindow(dedupe_window, window)

    @classmethod
    def from_settings(cls, settings: Any, resume: Any | None = None) -> CollabPartition:
        return cls(
            StateRules.from_settings(settings),
            CollabRules.from_settings(settings),
            FeatureRules.from_settings(settings),
            settings.collab_neighbours,
            settings.popularity_half_life_days * DAY_S,
            resume,
            settings.stream_dedupe_window,
            settings.stream_retention_days * DAY_S,
        )

    # -- following a recorded order --------------------------------------------------------

    def follow(self, entries: Iterable[tuple[Mapping[str, int], Sequence[tuple[int, int]]]]) -> bool:
        """Apply the next messages in the recorded order ``entries`` (``(offsets before, runs)``
        per batch, oldest first: the Redis order log), as far as it goes beyond this state.

        False (and nothing planned) when the log does not reach back to this state's offsets
        (trimmed, or written by another run): then the flow applies in arrival order and the
        writer rewrites the whole shop at the first batch that Redis's offsets do not fit.
        """
        entries = list(entries)
        pos = {int(p): o for p, o in self.offsets.items()}
        if not entries:
            return True
        start = entries[0][0]
        if any(pos.get(int(p), -1) < o for p, o in start.items()):
            return False
        plan: list[tuple[int, int]] = []
        for _, runs in entries:
            for p, last in runs:
                if last > pos.get(p, -1):
                    pos[p] = last
                    if plan and plan[-1][0] == p:
                        plan[-1] = (p, last)
                    else:
                        plan.append((p, last))
        self.plan = deque(plan)
        return True

    # -- applying ----------------------------------------------------------------------------

    def apply(self, messages: Iterable[SourceMessage]) -> CollabBatch:
        """Validate and apply messages (in the recorded order while one is planned); what changed."""
        batch = CollabBatch(self.topic or "", dict(self.offsets), dict(self.offsets))
        changed = _Changes()
        for raw in messages:
            msg = Message.of(raw)
            p = msg.partition or 0
            if msg.offset is not None and msg.offset <= self.offsets.get(str(p), -1):
                continue  # applied already (a redelivery below the resumed offsets)
            if self.plan or any(self.pending.values()):
                self.pending.setdefault(p, deque()).append(msg)
            else:
                self._apply_message(msg, batch, changed)
        self._drain(batch, changed)
        self._finish(batch, changed)
        return batch

    def _drain(self, batch: CollabBatch, changed: _Changes) -> None:
        """Apply held-back messages along the plan; once it is done, the rest in partition order."""
        while self.plan:
            p, last = self.plan[0]
            queue = self.pending.get(p)
            while queue and (queue[0].offset or 0) <= last:
                self._apply_message(queue.popleft(), batch, changed)
            if self.offsets.get(str(p), -1) >= last:
                self.plan.popleft()
            else:
                return  # this partition's next messages have not arrived yet
        for p in sorted(self.pending):
            queue = self.pending[p]
            while queue:
                self._apply_message(queue.popleft(), batch, changed)
        self.pending = {}

    def _apply_message(self, msg: Message, batch: CollabBatch, changed: _Changes) -> None:
        p = msg.partition or 0
        if not batch.topic:
            batch.topic = self.topic = msg.topic or ""
        if msg.offset is not None:
            self.offsets[str(p)] = msg.offset
            if batch.runs and batch.runs[-1][0] == p:
                batch.runs[-1] = (p, msg.offset)
            else:
                batch.runs.append((p, msg.offset))
        raw = msg.value or b""
        try:
            event = parse_event(raw, now=message_time(msg))
            check_key(msg, event.user_id, "user_id", UNKEYED_WHY)
        except InvalidRecord as err:
            batch.dead_letters.append(DeadLetter.of(STAGE, err, raw, msg.topic or ""))
            return
        if not self.seen_ids.add(event.event_id):
            batch.duplicates += 1
            return
        if self.apply_event(event, batch, changed):
            batch.applied += 1
        else:
            batch.duplicates += 1

    def apply_event(self, event: Event, batch: CollabBatch, changed: _Changes) -> bool:
        """The contract's per-event rule and example rule for one valid event; False for a duplicate."""
        user = event.user_id
        if self.retention_s > 0:
            self._forget(max(event.ts, self.flow_ts) - self.retention_s, batch, changed)
        state = self.states.get(user)
        if state is None:
            state = self.states[user] = UserState(user)
        if event.event_id in state.recent_ids:
            return False
        ts = event.ts
        self.recency.touch(user, ts)
        self._close_user(user, ts, batch)
        if event.kind == "purchase":
            key = (user, ts)
            if ts not in state.baskets and state.baskets and key not in self.open:
                self._open(state, ts)
            basket = self.open.get(key)
            if basket is not None and event.item_id not in basket.basket:
                basket.basket.append(event.item_id)  # type: ignore[arg-type]
        item = event.item_id
        seen_before = self.collab.pop_long.first_seen.get(item) if item is not None else None
        touched = self.collab.apply(state, event)
        weight = popularity_weight(state, event)
        apply_event(state, event, self.state_rules)
        self.served.observe(ts)
        if item is not None:
            self.served.see(item, ts)
            if weight:
                self.served.add(item, weight, ts)
            if self.collab.pop_long.first_seen.get(item) != seen_before:
                changed.first_seen.add(item)
            if weight:
                changed.pop.add(item)
        if event.kind == "purchase":
            changed.rows |= touched
            changed.stats.add(item)  # type: ignore[arg-type]
            vec = shopper_vector(state, self.collab_rules)
            self.index.upsert(user, vec)
            changed.vectors[user] = vec
        changed.users.add(user)
        self._version += 1
        if ts > self.flow_ts:
            self.flow_ts = ts
            self._close_timed_out(batch)
        return True

    def _forget(self, cutoff: float, batch: CollabBatch, changed: _Changes) -> None:
        """Forget the shoppers whose newest event is before ``cutoff``: their state, their row
        in the shopper index and (through the batch) their vector in Redis and on Kafka.

        Run before each event, with the cutoff its time (or the newest applied, if later)
        minus the retention: the points and the shoppers forgotten are fixed by the event
        sequence, so a replay forgets what the first run forgot and the evaluation's replay
        (:mod:`evaluation.collab_replay`) forgets the same shoppers before the same baskets.
        A shopper who comes back starts afresh. Items are not forgotten: their rows are
        top-k bounded and their count is the catalog's.
        """
        for user in self.recency.expired(cutoff):
            self._close_user(user, float("inf"), batch)  # none is open unless the retention is under an hour
            self.states.pop(user, None)
            self._encoded.pop(user, None)
            self.index.remove(user)
            changed.users.discard(user)
            changed.vectors[user] = None
            batch.forgotten += 1

    def _open(self, state: UserState, ts: float) -> None:
        """Compute the example of the basket at ``ts`` from ``state`` *before* its first line."""
        rules = self.feature_rules
        rows = {i: self.collab.copurchase.row(i, ts) for i in rows_needed(state, rules)}
        vec = shopper_vector(state, self.collab_rules)
        found = [] if vec is None else self.index.search(vec, self.neighbours, exclude=state.user_id)
        view = ShopperView(state, rows, [(sim, self.states[u]) for u, sim in found])
        shop = self.shop_view(ts)
        sig = shopper_signals(view, ts, rules, shop)
        cands = candidates(sig, shop, rules)
        x = feature_matrix(sig, shop, cands.items, np.zeros(len(cands)), rules)
        history = [[i.item_id, i.kind, i.ts] for i in state.history]
        self.open[(state.user_id, ts)] = OpenBasket(
            state.user_id, ts, list(cands.items), cands.sources.astype(np.uint8).tobytes(),
            np.ascontiguousarray(x, dtype="<f4").tobytes(), history,
        )
        heapq.heappush(self._deadlines, (ts, state.user_id))

    def shop_view(self, ts: float) -> ShopView:
        """The contract's ShopView at ``ts``: popularity at three horizons, item stats, orders
        (cached until the next applied event: baskets of one second share it)."""
        cached = self._shop
        if cached is not None and cached[0] == ts and cached[1] == self._version:
            return cached[2]
        view = self._shop_view(ts)
        self._shop = (ts, self._version, view)
        return view

    def _shop_view(self, ts: float) -> ShopView:
        return shop_view_at(self.collab, self.served, ts, self.feature_rules)

    def _close_user(self, user: str, ts: float, batch: CollabBatch) -> None:
        """The shopper's event at ``ts`` closes their open baskets of an earlier time."""
        # Open baskets are few (the last hour's of the shop): a scan is cheaper than a second index.
        for key in [k for k in self.open if k[0] == user and k[1] < ts]:
            batch.examples.append((user, self.open.pop(key).record()))

    def _close_timed_out(self, batch: CollabBatch) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] + BASKET_CLOSE_S < self.flow_ts:
            ts, user = heapq.heappop(deadlines)
            basket = self.open.pop((user, ts), None)
            if basket is not None:
                batch.examples.append((user, basket.record()))

    def _finish(self, batch: CollabBatch, changed: _Changes) -> None:
        batch.offsets = dict(self.offsets)
        batch.topic = self.topic or ""
        rows = self.collab.copurchase.rows
        batch.rows = {i: stored_row(rows[i]) for i in changed.rows if i in rows}
        stats = self.collab.stats
        batch.stats = {i: (stats.baskets.get(i, 0), stats.buyers.get(i, 0)) for i in changed.stats}
        short, long = self.collab.pop_short.entries, self.collab.pop_long.entries
        batch.pop_short = {i: short[i] for i in changed.pop if i in short}
        batch.pop_long = {i: long[i] for i in changed.pop if i in long}
        seen = self.collab.pop_long.first_seen
        batch.first_seen = {i: seen[i] for i in changed.first_seen}
        batch.newest_ts = self.collab.pop_long.newest_ts
        batch.vectors = {u: vector_bytes(v) for u, v in changed.vectors.items()}
        for u in changed.users:
            self._encoded[u] = self.states[u].to_bytes()

    # -- whole state ---------------------------------------------------------------------------

    def full_batch(self) -> CollabBatch | None:
        """The shop's whole collaborative state as one batch at :attr:`offsets` (None before any message)."""
        if not self.topic or not self.offsets:
            return None
        stats = self.collab.stats
        return CollabBatch(
            # "before" = its own offsets: the order log restarts here (nothing before it can be followed)
            self.topic, dict(self.offsets), dict(self.offsets),
            rows={i: stored_row(r) for i, r in self.collab.copurchase.rows.items()},
            stats={i: (stats.baskets.get(i, 0), stats.buyers.get(i, 0)) for i in stats.baskets.keys() | stats.buyers.keys()},
            pop_short=dict(self.collab.pop_short.entries),
            pop_long=dict(self.collab.pop_long.entries),
            first_seen=dict(self.collab.pop_long.first_seen),
            newest_ts=self.collab.pop_long.newest_ts,
            vectors={u: vector_bytes(shopper_vector(self.states[u], self.collab_rules)) for u in self.index.ids},
        )

    def snapshot(self) -> tuple[Any, ...]:
        """An immutable copy for Bytewax recovery (encoded shopper states, the collaborative state
        as orjson bytes, served popularity, the index's shopper order, offsets, open baskets,
        held-back messages and the plan, the event-id window, the shoppers' recency order)."""
        return (
            SNAPSHOT_VERSION,
            dict(self._encoded),
            orjson.dumps(self.collab.to_dict()),
            (dict(self.served.entries), self.served.newest_ts, dict(self.served.first_seen)),
            list(self.index.ids),
            dict(self.offsets),
            self.topic,
            self.flow_ts,
            [b.astuple() for b in self.open.values()],
            {p: [m.astuple() for m in q] for p, q in self.pending.items() if q},
            list(self.plan),
            self.seen_ids.snapshot(),
            list(self.recency.last.items()),
        )

    def _restore(self, resume: Any) -> bytes:
        if resume[0] not in (1, SNAPSHOT_VERSION):
            raise ValueError(
                f"snapshot v{resume[0]} is not readable (this version writes v{SNAPSHOT_VERSION}); clear {STAGE} "
                "recovery in state_dir/streams and the redis_prefix (`freshrec reset`), then replay the events topic"
            )
        (_, encoded, collab, served, ids, offsets, topic, flow_ts, open_baskets, pending, plan, window) = resume[:12]
        self._encoded = dict(encoded)
        self.states = {u: UserState.from_bytes(b) for u, b in self._encoded.items()}
        if resume[0] >= 2:
            self.recency = Recency(dict(resume[12]))
        else:  # v1 kept no order: by newest event, which is the touch order unless events came late
            self.recency = Recency(dict(sorted(((u, s.last_ts) for u, s in self.states.items()), key=lambda kv: kv[1])))
        self.collab = CollabState.from_dict(orjson.loads(collab), self.collab_rules)
        entries, newest, first_seen = served
        self.served.entries, self.served.newest_ts, self.served.first_seen = dict(entries), newest, dict(first_seen)
        for u in ids:  # the same rows in the same order: search ties break alike
            self.index.upsert(u, shopper_vector(self.states[u], self.collab_rules))
            if u not in self.index.rows:  # a shopper whose vector was None when first seen cannot be in ids
                raise ValueError(f"snapshot lists shopper {u!r} in the index without a vector")
        self.offsets = dict(offsets)
        self.topic = topic
        self.flow_ts = flow_ts
        for user, ts, items, sources, features, history, basket in open_baskets:
            self.open[(user, ts)] = OpenBasket(user, ts, list(items), sources, features, history, list(basket))
            heapq.heappush(self._deadlines, (ts, user))
        self.pending = {int(p): deque(Message(*m) for m in q) for p, q in pending.items()}
        self.plan = deque((int(p), int(o)) for p, o in plan)
        return window


@dataclass
class _Changes:
    rows: set[str] = field(default_factory=set)
    stats: set[str] = field(default_factory=set)
    pop: set[str] = field(default_factory=set)
    first_seen: set[str] = field(default_factory=set)
    vectors: dict[str, np.ndarray | None] = field(default_factory=dict)
    users: set[str] = field(default_factory=set)


def stored_row(row: Mapping[str, tuple[float, float]]) -> bytes:
    """A co-purchase row as Redis stores it: orjson ``{other: [value, as_of]}`` (the item's own count included)."""
    return orjson.dumps({k: [v, t] for k, (v, t) in row.items()})


# -- measurement --------------------------------------------------------------------------------


def measure(sample_dir: str = "freshrec/sample") -> dict[str, float]:
    """Events/s of this partition's apply and of the users partition's on the same messages, and memory."""
    import tracemalloc

    from freshrec.dataset import locate, read_events
    from freshrec.settings import Settings

    from .user_partition import UserPartition

    settings = Settings()
    files = locate(sample_dir)
    events = list(read_events(files.events, files.name))
    msgs = [
        Message(e["user_id"].encode(), orjson.dumps(e), "events", k, 0, (1, int(e["ts"] * 1000)))
        for k, e in enumerate(events)
    ]
    out: dict[str, float] = {"events": float(len(msgs))}
    users = UserPartition.from_settings(settings)
    t0 = time.perf_counter()
    for chunk in _chunks(msgs, 2000):
        users.apply(chunk)
    out["users_events_per_s"] = len(msgs) / (time.perf_counter() - t0)
    collab = CollabPartition.from_settings(settings)
    examples = 0
    t0 = time.perf_counter()
    for chunk in _chunks(msgs, 2000):
        examples += len(collab.apply(chunk).examples)
    out["collab_events_per_s"] = len(msgs) / (time.perf_counter() - t0)
    out["examples"] = float(examples)
    # Each part rebuilt from its snapshot form under tracemalloc: what it holds, not what applying allocated.
    blob, encoded = orjson.dumps(collab.collab.to_dict()), dict(collab._encoded)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    rebuilt = CollabState.from_dict(orjson.loads(blob), collab.collab_rules)
    collab_bytes = tracemalloc.get_traced_memory()[0] - base
    states = {u: UserState.from_bytes(raw) for u, raw in encoded.items()}
    state_bytes = tracemalloc.get_traced_memory()[0] - base - collab_bytes
    tracemalloc.stop()
    entries = rebuilt.copurchase.entries()
    out.update(
        shoppers=float(len(states)), items=float(len(rebuilt.copurchase.rows)), copurchase_entries=float(entries),
        collab_bytes=float(collab_bytes), bytes_per_entry=collab_bytes / max(entries, 1),
        state_bytes=float(state_bytes), bytes_per_shopper=state_bytes / max(len(states), 1),
        encoded_bytes_per_shopper=sum(map(len, encoded.values())) / max(len(encoded), 1),
        index_bytes=float(collab.index.matrix.nbytes), snapshot_collab_bytes=float(len(blob)),
    )
    return out


def _chunks(seq: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    return (seq[i : i + n] for i in range(0, len(seq), n))


if __name__ == "__main__":
    for k, v in measure().items():
        print(f"{k:>24}: {v:,.1f}")
