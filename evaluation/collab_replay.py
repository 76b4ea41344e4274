"""The collaborative state of a replay, and the gatherer of a shopper's ranking inputs.

``freshrec eval`` must rank exactly as serving ranks and label examples exactly as the
collaborative flow labels them, so this module is the contract's per-event rule
(docs/ranking_stage_contract.md) run in process over the event log, and nothing else:

    state = states[user] (UserState, created empty)
    if event.event_id in state.recent_ids: skip
    collab.apply(state, event)          # the state BEFORE the event
    served popularity: popularity_weight(state, event), then observe / see / add
    apply_event(state, event, StateRules)
    after a purchase: ShopperIndex.upsert(user, shopper_vector(state))

It keeps its own user states rather than sharing ``evaluation.methods.SystemReplay``'s:
``CollabState.apply`` needs each shopper's state *before every event* (which basket a
line joins), while ``SystemReplay.observe`` applies a whole timestamp in one loop that
cannot be hooked without editing it. Both apply the same ``apply_event`` with the same
rules, so the two copies are equal (tests/unit/test_features_paths.py checks it); the
cost is a second pass of a cheap function.

Shopper vectors are upserted once per timestamp, after its events, rather than after
each purchase line: the evaluation only searches between timestamps, where both give
the same index. (The flow upserts per line; a search by another shopper at the same
timestamp could see half a basket there. The protocol never scores at a timestamp
after part of it was applied, so it cannot tell.)

:func:`ranking_inputs` builds the :class:`~ranking.features.ShopperView` and
:class:`~ranking.features.ShopView` for a shopper at a basket's time, word for word as
the contract's "Ranking example" says; :func:`basket_features` adds the candidates
(with ANN when item vectors are given) and the feature matrix, the one function the
evaluation's ranker, its examples and the parity test call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from freshrec.contracts import Event
from freshrec.settings import Settings
from ranking.collab import CollabRules, CollabState, ShopperIndex, shopper_vector
from ranking.features import (
    FeatureRules,
    ShopperView,
    ShopView,
    candidates,
    feature_matrix,
    rows_needed,
    shop_view_at,
    shopper_signals,
    similarity_column,
)
from ranking.recency import Recency
from ranking.scoring import IDENTITY_SCALE, SimilarityScale, history_weights, user_vector
from ranking.user_state import DAY_S, Popularity, StateRules, UserState, apply_event, popularity_weight

from .data import KIND_NAMES, PURCHASE, EventLog


class GroupListener(Protocol):
    """Told by :meth:`CollabReplay.observe` around each timestamp group it applies."""

    def before_group(self, log: EventLog, start: int, stop: int) -> None: ...

    def after_group(self, log: EventLog, start: int, stop: int) -> None: ...


class CollabReplay:
    """User states, collaborative state, served popularity and the shopper index of one replay.

    Keyed by user and item *ids* (the contract's and serving's keys), not the log's
    indices. :meth:`observe` is idempotent per timestamp group, so several methods can
    share one replay and each call it.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_rules = StateRules.from_settings(settings)
        self.collab_rules = CollabRules.from_settings(settings)
        self.feature_rules = FeatureRules.from_settings(settings)
        self.neighbours = settings.collab_neighbours
        self.states: dict[str, UserState] = {}
        self.collab = CollabState(self.collab_rules)
        self.served = Popularity(settings.popularity_half_life_days * DAY_S)
        self.index = ShopperIndex(self.collab_rules.shopper_dim)
        self.retention_s = settings.stream_retention_days * DAY_S  # shoppers silent this long are forgotten
        self.recency = Recency()
        self.newest_ts = 0.0  # the newest applied event time (the flow's ``flow_ts``)
        self.version = 0  # bumped by every applied group: cached shop views go stale
        # told before and after each timestamp group is applied (ExampleStreams sharing this replay)
        self.listeners: list[GroupListener] = []
        self._applied_until = 0
        self._shop: tuple[float, int, ShopView] | None = None

    # -- the per-event rule --------------------------------------------------------------

    def apply(self, event: Event) -> bool:
        """The contract's per-event rule for one event; False for a duplicate (skipped)."""
        self._forget_as_of(event.ts)
        state = self.states.get(event.user_id)
        if state is None:
            state = self.states[event.user_id] = UserState(event.user_id)
        if event.event_id in state.recent_ids:
            return False
        self.recency.touch(event.user_id, event.ts)
        self.newest_ts = max(self.newest_ts, event.ts)
        self.collab.apply(state, event)
        weight = popularity_weight(state, event)
        if not apply_event(state, event, self.state_rules):
            return False
        # The users flow's served popularity (as evaluation.methods.SystemReplay keeps it).
        self.served.observe(event.ts)
        if event.item_id is not None:
            self.served.see(event.item_id, event.ts)
            if weight:
                self.served.add(event.item_id, weight, event.ts)
        self.version += 1
        return True

    def forget(self, cutoff: float) -> None:
        """Forget shoppers whose newest event is before ``cutoff``, as the collaborative flow
        does before each event (``streams.collab_partition.CollabPartition._forget``)."""
        for user in self.recency.expired(cutoff):
            self.states.pop(user, None)
            self.index.remove(user)
            self.version += 1

    def _forget_as_of(self, ts: float) -> None:
        """Forget the shoppers that retention drops by ``ts`` (or the newest applied event, if later)."""
        if self.retention_s > 0:
            self.forget(max(ts, self.newest_ts) - self.retention_s)

    def upsert_shopper(self, user_id: str) -> None:
        """Refresh a shopper's vector in the index (after their purchases)."""
        state = self.states.get(user_id)
        if state is not None:
            self.index.upsert(user_id, shopper_vector(state, self.collab_rules))

    def apply_events(self, events: Sequence[Event]) -> None:
        """Apply events of one timestamp in order, then upsert the vectors of their buyers."""
        buyers: dict[str, None] = {}
        for event in events:
            if self.apply(event) and event.kind == "purchase":
                buyers[event.user_id] = None
        for user_id in buyers:
            self.upsert_shopper(user_id)

    def observe(self, log: EventLog, start: int, stop: int) -> None:
        """Apply ``log[start:stop]`` (one timestamp) once, however many callers ask.

        Every listener sees the state before the group (``before_group``) and after it
        (``after_group``), whichever caller came first: that is what lets several example
        streams share one replay (each labels its examples from the state *before*).
        """
        if start < self._applied_until:
            return
        self._applied_until = stop
        for listener in self.listeners:
            listener.before_group(log, start, stop)
        self.apply_events(list(log_events(log, start, stop)))
        for listener in self.listeners:
            listener.after_group(log, start, stop)

    def present(self, user_id: str, ts: float) -> bool:
        """Whether the shopper has a state at ``ts``: the flow forgets at a basket's first line,
        before it computes the basket's example."""
        self._forget_as_of(ts)
        return user_id in self.states

    # -- gathering -------------------------------------------------------------------------

    def shop_view(self, ts: float) -> ShopView:
        """Shop-wide inputs at ``ts`` (cached until the next applied event)."""
        cached = self._shop
        if cached is not None and cached[0] == ts and cached[1] == self.version:
            return cached[2]
        view = shop_view(self.collab, self.served, ts, self.feature_rules)
        self._shop = (ts, self.version, view)
        return view

    def shopper_view(self, user_id: str, ts: float) -> ShopperView | None:
        """The shopper's inputs at ``ts``; None for a shopper without a state."""
        if not self.present(user_id, ts):
            return None
        state = self.states[user_id]
        return shopper_view(state, self.states, self.collab, self.index, ts, self.feature_rules, self.collab_rules, self.neighbours)


def log_events(log: EventLog, start: int, stop: int) -> Iterator[Event]:
    """``log[start:stop]`` as wire events (trusted input, validated when the log was built)."""
    for k in range(start, stop):
        yield Event.model_construct(
            event_id=log.event_ids[k],
            user_id=log.user_ids[int(log.user[k])],
            kind=KIND_NAMES[int(log.kind[k])],
            ts=float(log.ts[k]),
            item_id=log.item_ids[int(log.item[k])],
        )


def purchase_baskets(log: EventLog, start: int, stop: int) -> dict[str, set[str]]:
    """Per buyer id, the item ids bought in ``log[start:stop]`` (one timestamp: their basket)."""
    out: dict[str, set[str]] = {}
    for k in range(start, stop):
        if int(log.kind[k]) == PURCHASE:
            out.setdefault(log.user_ids[int(log.user[k])], set()).add(log.item_ids[int(log.item[k])])
    return out


def shop_view(collab: CollabState, served: Popularity, ts: float, rules: FeatureRules) -> ShopView:
    """The contract's ShopView at ``ts``, as the collab flow computes it (:func:`ranking.features.shop_view_at`)."""
    return shop_view_at(collab, served, ts, rules)


def shopper_view(
    state: UserState,
    states: Mapping[str, UserState],
    collab: CollabState,
    index: ShopperIndex,
    ts: float,
    rules: FeatureRules,
    collab_rules: CollabRules,
    k: int,
) -> ShopperView:
    """The contract's ShopperView: co-purchase rows of :func:`rows_needed`, the ``k`` nearest shoppers."""
    rows = {item: collab.copurchase.row(item, ts) for item in rows_needed(state, rules)}
    vec = shopper_vector(state, collab_rules)
    found = [] if vec is None else index.search(vec, k, exclude=state.user_id)
    neighbours = [(sim, states[u]) for u, sim in found if u in states]
    return ShopperView(state, rows, neighbours)


# -- item vectors: ANN and the sim column ---------------------------------------------------------


class RowMap(Mapping[str, np.ndarray]):
    """Item id -> row of an item-vector matrix, without copying it (what ``user_vector`` reads)."""

    def __init__(self, matrix: np.ndarray, index: Mapping[str, int]) -> None:
        self.matrix = matrix
        self.index = index

    def __getitem__(self, item: str) -> np.ndarray:
        return self.matrix[self.index[item]]

    def __contains__(self, item: object) -> bool:
        return item in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


@dataclass(frozen=True)
class VectorSpace:
    """One version's item vectors (rows in ``item_ids`` order) and its similarity scale."""

    matrix: np.ndarray
    item_ids: Sequence[str]
    index: Mapping[str, int]
    scale: SimilarityScale = IDENTITY_SCALE

    def rows(self) -> RowMap:
        return RowMap(self.matrix, self.index)


def ann_items(state: UserState, space: VectorSpace, seen: Mapping[str, float], n: int, rules: FeatureRules) -> list[str]:
    """The ``n`` items nearest the shopper's user vector (as the blend builds it), among items seen.

    Serving asks its FAISS index; here the index is exact. Items never seen before are
    left out, as the protocol cannot score them (and the live index would not have
    been sent a never-sold item in a replay).
    """
    if n <= 0:
        return []
    hw = history_weights(state.history, state.last_ts, rules.user_half_life_s)
    uvec = user_vector(hw, space.rows())
    if uvec is None:
        return []
    cos = space.matrix @ uvec
    seen_rows = np.fromiter((space.index[i] for i in seen if i in space.index), dtype=np.int64)
    if seen_rows.size == 0:
        return []
    vals = cos[seen_rows]
    take = min(n, seen_rows.size)
    top = np.argpartition(-vals, take - 1)[:take] if take < seen_rows.size else np.arange(seen_rows.size)
    order = sorted(top.tolist(), key=lambda r: (-float(vals[r]), int(seen_rows[r])))
    return [space.item_ids[int(seen_rows[r])] for r in order]


@dataclass(frozen=True)
class BasketFeatures:
    """A shopper's candidates at a basket's time, their sources and the feature rows."""

    items: list[str]
    sources: np.ndarray
    features: np.ndarray  # float32, (len(items), len(FEATURE_NAMES))


def basket_features(
    shopper: ShopperView, shop: ShopView, rules: FeatureRules, space: VectorSpace | None = None
) -> BasketFeatures:
    """Candidates and features from gathered inputs: the stream's way without vectors, serving's with.

    Without ``space`` this is exactly the collaborative flow's example (no ANN, ``sim`` 0);
    with it, ANN candidates join and ``sim`` is :func:`ranking.features.similarity_column`
    over the version's vectors and scale.
    """
    sig = shopper_signals(shopper, shop.now_ts, rules, shop)
    ann = [] if space is None else ann_items(shopper.state, space, shop.first_seen, rules.ann, rules)
    cands = candidates(sig, shop, rules, ann)
    if space is None:
        sim = np.zeros(len(cands))
    else:
        sim = similarity_column(shopper.state, cands.items, space.rows(), rules, space.scale)
    x = feature_matrix(sig, shop, cands.items, sim, rules)
    return BasketFeatures(cands.items, cands.sources, x)
