"""``ranker`` (and the ranker half of ``full``): the learned ranking stage, prequentially, as served.

The issue asks what *learning in the stream* adds, so the ranker is replayed the way the
running system would train and serve it, never fitted on the future:

1. **Examples, as the collaborative flow emits them.** For every purchase basket of a
   shopper whose state already holds a basket (from ``ranker_eval_history_days`` before
   the first scored basket: the stream emitted those too), the candidates and features
   are computed from the state *before* the basket (:func:`evaluation.collab_replay.basket_features`
   over the contract's per-event state) and labelled by the basket once it is ingested.
   Candidates include ANN (the items nearest the user vector by the current item vectors)
   and the ``sim`` column, as serving computes them; the flow leaves both to whoever
   has the vectors. One :class:`ExampleStream` is shared by every ranker over the same
   vectors, since the examples do not depend on the model.
2. **Scoring, as serving does.** A basket of a shopper with a basket in their state is
   ranked by the *active* ranker over those candidates (every other item -inf: it is
   not a candidate); before any ranker is active, and for shoppers without a basket,
   the blend answers (``SystemMethod.scores``: what ``frozen`` scores), and a cold
   shopper gets popularity, as in every system method.
3. **Updates, as the learner makes them.** After ``ranker_update_baskets`` new examples,
   or ``ranker_update_days`` of event time with any new example, a candidate is trained:
   the newest ``ranker_gate_baskets`` examples are held back, the model trains on the
   ``ranker_window_baskets`` before them (``lgbm``: refit; ``lgbm_continue``: new trees
   on what left the held-back window; ``torch``: more epochs on it), and the gate
   compares candidate and active ranker (or the blend, computed from the same feature
   columns, before the first) by Recall@10 per held-back basket against the whole
   basket: the learner's own ``learner.gate.judge_ranker`` (adopt only if the paired
   mean gain is above 0 and above ``gate_z`` standard errors, on at least
   ``ranker_min_gate_baskets`` baskets).

Models are ``models.ranker.fit_ranker`` with ``RankerParams.from_settings`` (the family
from ``ranker_family``, each update seeded ``seed + update``); the families are what
docs/ranker_family.md compares.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from freshrec.settings import Settings
from learner.gate import judge_ranker
from models.ranker import RankerModel, RankerParams, fit_ranker
from ranking.features import COLUMN, FEATURE_NAMES, FEATURE_SCHEMA, similarity_column
from ranking.scoring import LogBlendWeights, weights_from_settings
from ranking.user_state import DAY_S, Interaction, UserState

from .collab_replay import BasketFeatures, CollabReplay, VectorSpace, basket_features, purchase_baskets
from .data import EventLog
from .feature_cache import FeatureCache, space_digest

K = 10


# -- examples ---------------------------------------------------------------------------------


@dataclass
class Example:
    """One labelled basket: the candidates' rows and labels, and what recomputing ``sim`` needs."""

    seq: int
    user_id: str
    ts: float
    items: list[str]
    features: np.ndarray  # float32 (n, 17)
    labels: np.ndarray  # float32 (n,)
    basket_size: int  # all bought items, candidates or not: the Recall@10 denominator
    history: tuple[Interaction, ...]
    last_ts: float
    space_version: int


class VectorSource(Protocol):
    """What an example stream reads item vectors from: a ``SystemMethod`` (its ``vectors`` change in ``full``)."""

    vectors: np.ndarray
    similarity_scale: Any


class ExampleStream:
    """The labelled examples of one replay over one source of item vectors, shared by every ranker.

    ``features(user_id, ts)`` is cached per (shopper, basket time), so scoring a basket and
    recording it as an example compute it once; only the newest ``keep`` examples stay in
    memory (the rankers' window plus their held-back baskets). Several streams may share
    one :class:`CollabReplay` (``ranker`` and ``full`` in one run): each registers as its
    listener, so each builds its examples from the state before a group whichever stream
    applies it. With a :class:`~evaluation.feature_cache.FeatureCache`, features computed
    over the same vectors by another stream, run or worker process are read, not recomputed.
    """

    def __init__(
        self,
        collab: CollabReplay,
        source: VectorSource,
        item_ids: Sequence[str],
        item_index: dict[str, int],
        user_ids: Sequence[str],
        record_from: float,
        keep: int,
        cache: FeatureCache | None = None,
    ) -> None:
        self.collab = collab
        self.feature_cache = cache
        self._space_key = ""
        self.user_ids = user_ids
        self.source = source
        self.item_ids = item_ids
        self.item_index = item_index
        self.record_from = record_from
        self.examples: deque[Example] = deque(maxlen=keep)
        self.next_seq = 0
        self.space_version = 0
        self.feature_seconds = 0.0
        self._matrix: np.ndarray | None = None
        self._space: VectorSpace | None = None
        self._cache: dict[tuple[str, float], BasketFeatures] = {}
        self._pending: list[tuple[str, set[str], BasketFeatures, tuple[Interaction, ...], float]] = []
        collab.listeners.append(self)

    def space(self) -> VectorSpace:
        """The source's current vectors as a :class:`VectorSpace` (rebuilt when they change)."""
        if self._space is None or self.source.vectors is not self._matrix:
            self._matrix = self.source.vectors
            self._space = VectorSpace(self._matrix, self.item_ids, self.item_index, self.source.similarity_scale)
            self.space_version += 1
            if self.feature_cache is not None:
                self._space_key = space_digest(self._space)
        return self._space

    def features(self, user_id: str, ts: float) -> BasketFeatures | None:
        """Candidates and features of a shopper before a basket at ``ts``; None without a state."""
        key = (user_id, ts)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        space = self.space()
        shared = self.feature_cache
        if shared is not None and self.collab.present(user_id, ts):
            out = shared.get(self._space_key, user_id, ts)
            if out is not None:
                self._cache[key] = out
                self.feature_seconds += time.perf_counter() - t0
                return out
        view = self.collab.shopper_view(user_id, ts)
        if view is None:
            return None
        out = basket_features(view, self.collab.shop_view(ts), self.collab.feature_rules, space)
        if shared is not None:
            shared.put(self._space_key, user_id, ts, out)
        self._cache[key] = out
        self.feature_seconds += time.perf_counter() - t0
        return out

    def observe(self, log: EventLog, start: int, stop: int) -> None:
        """Apply this timestamp to the collaborative replay (once, whichever stream asks first);
        the examples are built and labelled by :meth:`before_group` and :meth:`after_group`."""
        self.collab.observe(log, start, stop)

    def before_group(self, log: EventLog, start: int, stop: int) -> None:
        """The candidates and features of this timestamp's baskets, from the state before it."""
        ts = float(log.ts[start])
        self._pending = []
        if ts < self.record_from:
            return
        for user_id, basket in purchase_baskets(log, start, stop).items():
            state = self.collab.states.get(user_id)
            if state is None or not state.baskets:
                continue
            bf = self.features(user_id, ts)
            if bf is not None:
                self._pending.append((user_id, basket, bf, tuple(state.history), state.last_ts))

    def after_group(self, log: EventLog, start: int, stop: int) -> None:
        """Label the pending baskets' candidates by what was bought (the state has moved on)."""
        self._cache.clear()
        ts = float(log.ts[start])
        version = self.space_version
        for user_id, basket, bf, hist, last_ts in self._pending:
            bought = np.fromiter((1.0 if i in basket else 0.0 for i in bf.items), dtype=np.float32, count=len(bf.items))
            self.examples.append(
                Example(self.next_seq, user_id, ts, bf.items, bf.features, bought, len(basket), hist, last_ts, version)
            )
            self.next_seq += 1
        self._pending = []

    def refresh_sim(self, ex: Example) -> np.ndarray:
        """The example's rows with ``sim`` from the current vectors (the learner fills it with the active adapter's)."""
        space = self.space()
        if ex.space_version == self.space_version:
            return ex.features
        state = UserState(ex.user_id, history=list(ex.history), last_ts=ex.last_ts)
        out = ex.features.copy()
        out[:, COLUMN["sim"]] = similarity_column(state, ex.items, space.rows(), self.collab.feature_rules, space.scale)
        return out


# -- models: models.ranker, trained as the learner trains them ----------------------------------------


FAMILIES = ("lgbm", "lgbm_continue", "torch")  # settings.ranker_family


class Scorer(Protocol):
    def score(self, x: np.ndarray) -> np.ndarray: ...


class ModelScorer:
    """A trained ``models.ranker.RankerModel`` scoring this module's rows (schema checked by the model)."""

    def __init__(self, model: RankerModel) -> None:
        self.model = model

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.model.score(x, schema=FEATURE_SCHEMA)


class BlendScorer:
    """The log blend over the feature columns it is made of (the gate's "active" before any ranker)."""

    def __init__(self, weights: LogBlendWeights) -> None:
        self.w = weights

    def score(self, x: np.ndarray) -> np.ndarray:
        w = self.w
        return (
            w.repeat * x[:, COLUMN["log_repeat"]].astype(np.float64)
            + w.popularity * x[:, COLUMN["log_pop"]]
            + w.similarity * x[:, COLUMN["sim"]]
            + w.new * x[:, COLUMN["new"]]
        )


# -- the method -------------------------------------------------------------------------------------


@dataclass
class UpdateLog:
    """What each update did, for the report."""

    fit_seconds: list[float] = field(default_factory=list)
    gate_seconds: list[float] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)
    adopted: int = 0


class Fallback(Protocol):
    """What answers when no ranker may: ``SystemMethod`` (blend; popularity for a cold shopper)."""

    name: str

    def observe(self, log: EventLog, start: int, stop: int) -> None: ...

    def advance(self, now: float) -> None: ...

    def scores(self, user: int, now: float) -> np.ndarray: ...


class SystemLike(Fallback, VectorSource, Protocol):
    """``evaluation.methods.SystemMethod``: a fallback that also holds the item vectors."""


class RankerMethod:
    """A protocol method: the learned ranker over :class:`ExampleStream`'s candidates, updated and gated in event time."""

    seeded = True

    def __init__(
        self,
        name: str,
        stream: ExampleStream,
        fallback: Fallback,
        settings: Settings,
        seed: int,
        family: str | None = None,
        drive_fallback: bool = False,
        train_from: float | None = None,
    ) -> None:
        self.name = name
        self.stream = stream
        self.fallback = fallback
        self.seed = seed
        self.family = family or settings.ranker_family
        self.drive_fallback = drive_fallback  # ``full``: advancing the adapter's learner is ours to do
        # a stream shared with rankers of a longer history records earlier examples than this
        # one's own ranker_eval_history_days would: they are not this ranker's to train on
        self.train_from = train_from
        if self.family not in FAMILIES:
            raise ValueError(f"unknown ranker family {self.family!r}; choose from {', '.join(FAMILIES)}")
        self.settings = settings.model_copy(update={"ranker_family": self.family})
        self.params = RankerParams.from_settings(self.settings)
        self.candidate: RankerModel | None = None  # the learner's latest model, adopted or held
        self.active: RankerModel | None = None
        self.active_version = "blend"
        self.updates = 0
        self.trained_since_adopt = 0
        self.blend = BlendScorer(log_blend_weights(settings))
        self.update_baskets = settings.ranker_update_baskets
        self.update_s = settings.ranker_update_days * DAY_S
        self.window = settings.ranker_window_baskets
        self.held = settings.ranker_gate_baskets
        self.negatives = settings.ranker_train_negatives
        self.user_ids = stream.user_ids
        self.n_items = len(stream.item_ids)
        self.log = UpdateLog()
        self.score_seconds = 0.0
        self.ranked = 0
        self.fallbacks = 0
        self._seen_seq = 0  # examples up to here were counted by the last update
        self._trained_seq = 0  # examples below here have been trained on
        self._last_update: float | None = None
        self.progress: Callable[[str], None] | None = None

    # -- protocol ---------------------------------------------------------------------------

    def observe(self, log: EventLog, start: int, stop: int) -> None:
        self.fallback.observe(log, start, stop)
        self.stream.observe(log, start, stop)

    def advance(self, now: float) -> None:
        if self.drive_fallback:
            self.fallback.advance(now)
        new = self.stream.next_seq - self._seen_seq
        if new <= 0:
            return
        if self._last_update is None or new >= self.update_baskets or now - self._last_update >= self.update_s:
            self.update(now)

    def scores(self, user: int, now: float) -> np.ndarray:
        user_id = self.user_ids[user]
        state = self.stream.collab.states.get(user_id)
        if self.active is None or state is None or not state.baskets:
            self.fallbacks += 1
            return self.fallback.scores(user, now)
        bf = self.stream.features(user_id, now)
        if bf is None or not bf.items:
            self.fallbacks += 1
            return self.fallback.scores(user, now)
        t0 = time.perf_counter()
        s = self.active.score(bf.features, schema=FEATURE_SCHEMA)
        self.score_seconds += time.perf_counter() - t0
        self.ranked += 1
        out = np.full(self.n_items, -np.inf)
        index = self.stream.item_index
        out[np.fromiter((index[i] for i in bf.items), dtype=np.int64, count=len(bf.items))] = s
        return out

    # -- learning ---------------------------------------------------------------------------------

    def update(self, now: float) -> None:
        """Train a candidate on the window, judge it on the held-back baskets, adopt it if it passes.

        ``lgbm`` refits on the newest ``ranker_window_baskets`` trainable examples each
        time; ``lgbm_continue`` and ``torch`` continue the learner's latest model (adopted
        or held, as the adapter learner keeps training a held candidate) on the examples
        that left the held-back window since the last update.
        """
        self._last_update = now
        self._seen_seq = self.stream.next_seq
        examples = list(self.stream.examples)
        if self.train_from is not None:
            examples = [ex for ex in examples if ex.ts >= self.train_from]
        if len(examples) <= self.held:
            return
        held, trainable = examples[-self.held :], examples[: -self.held]
        incremental = self.family != "lgbm" and self.candidate is not None
        train = [ex for ex in trainable if ex.seq >= self._trained_seq] if incremental else trainable
        train = [ex for ex in train[-self.window :] if ex.labels.any()]
        if not train:
            return
        x, y, groups = self.training_set(train)
        t0 = time.perf_counter()
        parent = self.candidate if incremental else None
        self.candidate = fit_ranker(x, y, groups, self.seed + self.updates, FEATURE_NAMES, FEATURE_SCHEMA, self.params, parent)
        t1 = time.perf_counter()
        self.updates += 1
        self._trained_seq = trainable[-1].seq + 1
        self.trained_since_adopt += len(train)
        rows = [self.stream.refresh_sim(ex) for ex in held]
        hx = np.concatenate(rows)
        active: Scorer = ModelScorer(self.active) if self.active is not None else self.blend
        judgement = judge_ranker(
            self.candidate.score(hx, schema=FEATURE_SCHEMA), active.score(hx), np.concatenate([ex.labels for ex in held]),
            [len(r) for r in rows], self.settings, self.trained_since_adopt, self.active_version,
            relevant=[ex.basket_size for ex in held],
        )
        decision = judgement.decision
        self.log.fit_seconds.append(t1 - t0)
        self.log.gate_seconds.append(time.perf_counter() - t1)
        self.log.decisions.append(f"{len(train)} baskets, {len(y):,} rows, fit {t1 - t0:.1f} s; {decision.reason}")
        if self.progress is not None:
            self.progress(f"{self.name} update {self.updates}: {self.log.decisions[-1]}")
        if decision.publish:
            self.active = self.candidate
            self.active_version = f"update {self.updates}"
            self.trained_since_adopt = 0
            self.log.adopted += 1

    def training_set(self, train: Sequence[Example]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Rows of ``train``: every bought candidate and at most ``negatives`` others per basket (seeded)."""
        rng = np.random.default_rng([self.seed, self.updates])
        xs, ys, groups = [], [], []
        for ex in train:
            rows = self.stream.refresh_sim(ex)
            pos = np.flatnonzero(ex.labels > 0)
            neg = np.flatnonzero(ex.labels == 0)
            if neg.size > self.negatives:
                neg = np.sort(rng.choice(neg, size=self.negatives, replace=False))
            keep = np.concatenate((pos, neg))
            xs.append(rows[keep])
            ys.append(ex.labels[keep])
            groups.append(int(keep.size))
        return np.concatenate(xs), np.concatenate(ys), groups

    def report(self) -> str:
        """One line for ``freshrec eval``'s summary."""
        fits = self.log.fit_seconds
        per = 1000 * self.score_seconds / max(self.ranked, 1)
        return (
            f"{self.family} seed {self.seed}: {len(fits)} updates, {self.log.adopted} adopted, fit {sum(fits):.0f} s "
            f"(mean {np.mean(fits) if fits else 0:.1f} s), scoring {per:.2f} ms per basket, "
            f"{self.ranked} ranked / {self.fallbacks} by the fallback, features {self.stream.feature_seconds:.0f} s (shared)"
        )


def log_blend_weights(settings: Settings) -> LogBlendWeights:
    """The log blend's weights (the settings' own when they choose the log blend): the feature
    columns it reads are ranking examples' columns, so the gate can score "the blend" before any ranker."""
    w = weights_from_settings(settings)
    return w if isinstance(w, LogBlendWeights) else LogBlendWeights.from_settings(settings)


# -- building ---------------------------------------------------------------------------------------


def example_stream(log: EventLog, settings: Settings, source: VectorSource, eval_from: float,
                   collab: CollabReplay | None = None, cache: FeatureCache | None = None) -> ExampleStream:
    """One stream of examples over ``source``'s vectors (a fresh :class:`CollabReplay` unless given)."""
    collab = collab or CollabReplay(settings)
    index = {iid: k for k, iid in enumerate(log.item_ids)}
    return ExampleStream(
        collab, source, log.item_ids, index, log.user_ids,
        record_from=eval_from - settings.ranker_eval_history_days * DAY_S,
        keep=settings.ranker_window_baskets + settings.ranker_gate_baskets,
        cache=cache,
    )


def build_ranker_methods(
    log: EventLog,
    settings: Settings,
    eval_from: float,
    frozen: SystemLike,
    seeds: Sequence[int],
    families: Sequence[str] | None = None,
    name: Callable[[str, int], str] | None = None,
    collab: CollabReplay | None = None,
    cache: FeatureCache | None = None,
) -> list[RankerMethod]:
    """``ranker`` for each seed (and family), over ``frozen``'s base vectors and blend, sharing one example stream."""
    stream = example_stream(log, settings, frozen, eval_from, collab, cache)
    fams = list(families or [settings.ranker_family])
    label = name or (lambda fam, seed: "ranker" if len(seeds) == 1 and len(fams) == 1 else f"ranker[{fam},{seed}]")
    return [RankerMethod(label(fam, seed), stream, frozen, settings, seed, fam) for fam in fams for seed in seeds]


def build_full_ranker(
    log: EventLog, settings: Settings, eval_from: float, full: SystemLike, seed: int,
    name: str = "full", collab: CollabReplay | None = None, cache: FeatureCache | None = None,
) -> RankerMethod:
    """``full``: the ranker over the adapter method's item vectors as its learner changes them.

    ``full`` is ``evaluation.methods.FullMethod`` (blend over the adapter's vectors, its
    ``advance`` trains the adapter): this method advances it, reads its current vectors
    for ANN and ``sim``, recomputes ``sim`` of its window with them before each update,
    and falls back to it. List it *instead of* the blend-only ``full``.
    """
    stream = example_stream(log, settings, full, eval_from, collab, cache)
    return RankerMethod(name, stream, full, settings, seed, drive_fallback=True)
