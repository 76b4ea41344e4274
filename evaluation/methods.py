"""``frozen`` and ``full``: the system itself, replayed in accelerated event time.

Both run the system's own components in process (no Kafka or Redis: the same pure
code the flows and serving call, fed from the event log):

- user state and fresh popularity: ``ranking.user_state`` (``apply_event``,
  ``Popularity``) with the flow's rules from Settings, so a cancel subtracts a purchase
  from the shopper's frequency and from popularity, exactly as in the streams flow;
- train pairs: ``ranking.pairs.pair_for`` (context = recent items' titles, most recent
  first, strictly earlier than the event, so one basket's lines are never each other's
  context);
- scoring: ``ranking.scoring`` — the user vector is ``user_vector(history_weights(...))``
  over the candidate pool serving uses (repeats, history, the nearest and the most
  popular items). The blend is the one serving is configured with (``blend_mode``,
  ``ranking.scoring.weights_from_settings``): with ``"log"`` (the default) every
  candidate is scored by :func:`evaluation.blend.log_blend`, the vectorised
  ``ranking.scoring.log_blend`` (same formula function; a unit test checks they agree),
  with new arrivals (first seen within ``blend_new_days``, tracked by ``Popularity``
  exactly as the streams flow tracks it) added to the pool; with ``"linear"`` by
  :func:`evaluation.blend.dense_blend`, the vectorised ``ranking.scoring.blend``. Fresh
  popularity uses the system's ``popularity_half_life_days`` and the repeat signal is
  the user state's basket count (``UserState.basket_scores`` with ``repeat_basket_decay``),
  as serving reads it;
- similarity: cosine to the user vector, mapped by the version's
  ``ranking.scoring.SimilarityScale`` fitted on its item vectors, as serving's pair
  builder fits it on each index it builds;
- item vectors: the PyTorch encoder (``models.encoder.TorchEncoder``); ``frozen`` uses
  the base weights, ``full`` the LoRA adapter of ``learner.trainer.LoraTrainer`` trained
  in the stream: at every ``eval_train_every_days`` boundary of event time it trains on
  (a bounded sample of) the pairs made since its last update, then re-encodes the
  catalog, and later baskets are scored with the new vectors if the learner's publish
  gate passes them (``learner.publish.decide_publish`` on the newest
  ``learner_eval_window`` pairs, held out of training as the learner holds them;
  setting ``eval_gate``). Before the first basket it catches up on the pairs of the
  last ``eval_pretrain_days`` of history.

The ONNX int8 back end serving uses is not used here (not available when this was
written); int8 quantisation moves cosines by ~1e-2, far below the blend's margins.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from freshrec.contracts import Event, TrainPair
from freshrec.settings import Settings
from learner.evaluate import ActiveEncoder, ItemMatrix, TargetPopularity
from learner.gate import judge_candidate, publish_candidate
from learner.intake import HoldoutWindow
from models.registry import AdapterRegistry
from ranking.scoring import (
    BlendWeights,
    LogBlendWeights,
    history_weights,
    scale_from_settings,
    user_vector,
    weights_from_settings,
)
from ranking.pairs import PairDraft, PairRules, pair_for
from ranking.user_state import DAY_S, Popularity, StateRules, UserState, apply_event, popularity_weight

from .blend import candidate_pool, dense_blend, log_blend
from .data import KIND_NAMES, EventLog

Encode = Callable[[list[str]], np.ndarray]


class SystemReplay:
    """The system's shared state (user states, popularity, train pairs) for one replay.

    ``frozen`` and ``full`` read the same state; only their item vectors differ. Each
    timestamp is applied once however many methods call :meth:`observe`.
    """

    def __init__(self, log: EventLog, settings: Settings, pairs_from: float | None = None) -> None:
        self.log = log
        self.settings = settings
        self.rules = StateRules.from_settings(settings)
        self.pair_rules = PairRules.from_settings(settings)
        self.states: dict[int, UserState] = {}
        self.popularity = Popularity(settings.popularity_half_life_days * DAY_S)
        self.pop = np.zeros(log.n_items, dtype=np.float64)
        # Per item index, ``Popularity.first_seen`` as an array (the log blend's "new arrival").
        self.first_seen = np.full(log.n_items, np.inf)
        self._pop_dirty = True
        self.item_index = {iid: k for k, iid in enumerate(log.item_ids)}
        self.pairs_from = pairs_from
        self.drafts: list[PairDraft] = []
        self._applied_until = 0

    def observe(self, log: EventLog, start: int, stop: int) -> None:
        if start < self._applied_until:
            return
        self._applied_until = stop
        want_pairs = self.pairs_from is not None and float(log.ts[start]) >= self.pairs_from
        for k in range(start, stop):
            u = int(log.user[k])
            state = self.states.get(u)
            if state is None:
                state = self.states[u] = UserState(log.user_ids[u])
            kind = KIND_NAMES[int(log.kind[k])]
            item = log.item_ids[int(log.item[k])]
            ts = float(log.ts[k])
            # Trusted input (already validated when the log was built): skip pydantic.
            event = Event.model_construct(event_id=log.event_ids[k], user_id=state.user_id, kind=kind, ts=ts, item_id=item)
            if want_pairs:
                draft = pair_for(state, event, self.pair_rules)
                if draft is not None:
                    self.drafts.append(draft)
            # The flow's popularity rule, judged before the event is applied: a purchase
            # adds one, a cancel subtracts one only if it undoes that shopper's purchase.
            pop_weight = popularity_weight(state, event)
            if not apply_event(state, event, self.rules):
                continue
            # The flow's popularity bookkeeping (streams.user_partition): every applied
            # event moves "now" and may be the item's first sighting.
            self.popularity.observe(ts)
            if self.popularity.see(item, ts):
                self.first_seen[int(log.item[k])] = ts
            if pop_weight:
                self.popularity.add(item, pop_weight, ts)
                self._pop_dirty = True

    def popularity_vector(self) -> np.ndarray:
        """Fresh popularity per item index, normalised to max 1 (as serving's cache holds it)."""
        if self._pop_dirty:
            self.pop[:] = 0.0
            for item, v in self.popularity.scores().items():
                self.pop[self.item_index[item]] = v
            top = self.pop.max(initial=0.0)
            if top > 0:
                self.pop /= top
            self._pop_dirty = False
        return self.pop

    def take_pairs(self) -> list[TrainPair]:
        """The pairs made since the last call, completed with catalog titles."""
        titles = {iid: self.log.titles[k] for iid, k in self.item_index.items()}
        out = [d.complete(titles, titles) for d in self.drafts]
        self.drafts = []
        return out


@dataclass(frozen=True, slots=True)
class Signals:
    """One shopper's blend inputs, one value per item index (``SystemMethod.signals``)."""

    repeat: np.ndarray  # basket-decayed purchase count, raw (0 = never bought)
    similarity: np.ndarray  # cosine to the user vector (0 without one)
    popularity: np.ndarray  # fresh popularity, max 1
    is_new: np.ndarray  # 1 for items first seen within blend_new_days
    history: list[int]  # item indices of the user vector's history


class SystemMethod:
    """The system's /recommend ranking with one set of item vectors (``frozen`` or ``full``)."""

    def __init__(
        self,
        name: str,
        replay: SystemReplay,
        vectors: np.ndarray,
        weights: BlendWeights | LogBlendWeights,
        candidates: int,
    ) -> None:
        self.name = name
        self.replay = replay
        self.set_vectors(vectors)
        self.weights = weights
        self.candidates = candidates
        s = replay.settings
        self.user_half_life_s = s.user_vector_half_life_days * DAY_S
        self.basket_decay = s.repeat_basket_decay
        self.index = replay.item_index
        self.new_s = s.blend_new_days * DAY_S

    def set_vectors(self, vectors: np.ndarray) -> None:
        """New item vectors and, as serving's pair builder does, their similarity scale.

        The scale is fitted on the rows in item-id order, the order serving's builder
        reads its index in, so the same vectors give the same random pairs and scale.
        """
        self.vectors = vectors
        ids = self.replay.log.item_ids
        by_id = sorted(range(len(ids)), key=ids.__getitem__)
        self.similarity_scale = scale_from_settings(vectors[by_id], self.replay.settings)

    def observe(self, log: EventLog, start: int, stop: int) -> None:
        self.replay.observe(log, start, stop)

    def advance(self, now: float) -> None:
        pass

    def signals(self, user: int, now: float) -> Signals | None:
        """What the blend sees for ``user`` before a basket at ``now``; None for a cold shopper."""
        state = self.replay.states.get(user)
        if state is None:
            return None
        n = self.vectors.shape[0]
        repeat = np.zeros(n)
        for item, v in state.basket_scores(self.basket_decay).items():
            repeat[self.index[item]] = v
        hw = history_weights(state.history, state.last_ts, self.user_half_life_s)
        sim = np.zeros(n)
        if hw:
            uvec = user_vector(hw, {i: self.vectors[self.index[i]] for i in hw})
            if uvec is not None:
                sim = self.similarity_scale.apply((self.vectors @ uvec).astype(np.float64))
        # ranking.scoring.new_arrivals as a mask; "now" is the basket's time, where
        # serving uses the newest event time seen (the request's time in event time).
        is_new = ((now - self.replay.first_seen) <= self.new_s).astype(np.float64)
        return Signals(repeat, sim, self.replay.popularity_vector(), is_new, [self.index[i] for i in hw])

    def scores(self, user: int, now: float) -> np.ndarray:
        sig = self.signals(user, now)
        if sig is None:
            return self.replay.popularity_vector().copy()  # a cold shopper gets popularity, as serving answers them
        return self.blend(sig)

    def blend(self, sig: Signals) -> np.ndarray:
        """Serving's blend over its candidate pool (-inf outside the pool)."""
        if isinstance(self.weights, LogBlendWeights):
            pool = candidate_pool(sig.repeat, sig.similarity, sig.popularity, sig.history, self.candidates, sig.is_new)
            return log_blend(sig.repeat, sig.similarity, sig.popularity, sig.is_new, self.weights, pool)
        pool = candidate_pool(sig.repeat, sig.similarity, sig.popularity, sig.history, self.candidates)
        return dense_blend(sig.repeat, sig.similarity, sig.popularity, self.weights, pool)


def leaving_window(window: HoldoutWindow, pairs: list[TrainPair]) -> list[TrainPair]:
    """Push ``pairs`` (in event order) into the gate's window; return those pushed out, now trainable.

    ``learner.intake.Intake`` does the same one pair at a time: the newest
    ``learner_eval_window`` pairs stay held out for the publish gate, and a pair is
    trained only once newer ones push it out.
    """
    return [left for pair in pairs if (left := window.push(pair)) is not None]


@dataclass
class StreamLearner:
    """Trains the adapter in event time, gates each candidate, re-encodes the catalog.

    Bounded work, so a replay fits its time limit: at most ``max_pairs`` pairs per update
    (a uniform sample seeded by ``seed`` and the update number when there are more), in
    shuffled batches of ``batch_size``, for ``epochs`` passes. Training dominates the
    run time (measured: 449 s of a 771 s replay on online_retail_ii), so these budgets
    are what keeps ``freshrec eval`` inside 30 minutes on two cores.

    With ``gate`` (setting ``eval_gate``, on by default) an update is adopted only as the
    learner process would publish it: the newest ``learner_eval_window`` pairs are held
    out of training, the candidate and the active version are ranked on them by
    ``learner.evaluate.window_metrics`` with serving's item-side blend, and
    ``learner.publish.decide_publish`` decides. A published candidate goes through the
    adapter registry (a temporary one) and is loaded back, as serving would load it; a
    held one keeps training, and baskets are scored with the active version meanwhile.
    """

    trainer: object  # learner.trainer.LoraTrainer (imported lazily: torch is heavy)
    replay: SystemReplay
    method: SystemMethod
    every_s: float
    max_pairs: int
    pretrain_pairs: int
    batch_size: int
    epochs: int
    seed: int
    gate: Gate | None = None
    next_update: float | None = None
    updates: int = 0
    pairs_trained: int = 0
    train_seconds: float = 0.0
    encode_seconds: float = 0.0
    gate_seconds: float = 0.0

    def advance(self, now: float) -> None:
        if self.next_update is None:
            self._update(self.pretrain_pairs)
            self.next_update = now - (now % self.every_s) + self.every_s
        elif now >= self.next_update:
            self._update(self.max_pairs)
            while self.next_update <= now:
                self.next_update += self.every_s

    def _update(self, budget: int) -> None:
        pairs = self.replay.take_pairs()
        if self.gate is not None:
            pairs = self.gate.intake(pairs)
        if len(pairs) > budget:
            rng = np.random.default_rng(self.seed + self.updates)
            keep = np.sort(rng.choice(len(pairs), size=budget, replace=False))
            pairs = [pairs[k] for k in keep]
        if len(pairs) < 2:
            return
        t0 = time.perf_counter()
        rng = np.random.default_rng(self.seed + 1000 + self.updates)
        for _ in range(self.epochs):
            order = rng.permutation(len(pairs))
            for b in range(0, len(order) - 1, self.batch_size):
                batch = [pairs[k] for k in order[b : b + self.batch_size]]
                if len(batch) >= 2:
                    self.trainer.train_step(batch)  # type: ignore[attr-defined]
        t1 = time.perf_counter()
        vectors = encode_catalog(self.trainer.encoder().encode, self.replay.log.titles)  # type: ignore[attr-defined]
        t2 = time.perf_counter()
        self.encode_seconds += t2 - t1
        self.train_seconds += t1 - t0
        self.pairs_trained += len(pairs)
        self.updates += 1
        if self.gate is None or self.gate.judge(self.trainer, vectors, pairs):
            self.method.set_vectors(vectors)
        self.gate_seconds += time.perf_counter() - t2


@dataclass
class Gate:
    """The learner process's publish gate, run on the evaluation's stream (:class:`StreamLearner`).

    Keeps the held-out window, the learner's target popularity and the active version
    (its encoder and item matrix), and judges and publishes with the learner's own
    ``learner.gate`` functions; every judgement's reason sentence is appended to
    ``decisions``, so a run can say what was published and why.
    """

    settings: Settings
    item_ids: list[str]
    index: dict[str, int]  # item id -> row, as SystemReplay.item_index
    device: str
    registry: AdapterRegistry
    popularity: TargetPopularity
    active: ActiveEncoder
    active_matrix: ItemMatrix
    window: HoldoutWindow
    trained_since_publish: int = 0
    published: int = 0
    decisions: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, replay: SystemReplay, base_vectors: np.ndarray, device: str, registry_root: str) -> Gate:
        from models.encoder import BASE_VERSION

        settings, item_ids, index = replay.settings, list(replay.log.item_ids), replay.item_index
        registry = AdapterRegistry(registry_root)
        return cls(
            settings, item_ids, index, device, registry,
            TargetPopularity.days(settings.popularity_half_life_days),
            ActiveEncoder.load(BASE_VERSION, registry.root, device),
            ItemMatrix(BASE_VERSION, "eval", item_ids, base_vectors, index),
            HoldoutWindow(settings.learner_eval_window),
        )

    def intake(self, new_pairs: list[TrainPair]) -> list[TrainPair]:
        """Add the new pairs behind the window; return the pairs that left it (now trainable)."""
        return leaving_window(self.window, new_pairs)

    def judge(self, trainer: Any, vectors: np.ndarray, trained: list[TrainPair]) -> bool:
        """Publish the trained candidate (True) or hold it (False), as ``learner.loop`` does.

        ``trainer`` is the ``learner.trainer.LoraTrainer`` that made ``vectors``.
        """
        for pair in trained:
            self.popularity.add(pair.target_item, pair.ts)
        self.trained_since_publish += len(trained)
        cand_matrix = ItemMatrix("candidate", "eval", self.item_ids, vectors, self.index)
        judgement = judge_candidate(
            trainer.encoder(), cand_matrix, self.active, self.active_matrix, self.window.pairs(),
            self.popularity, self.settings, self.trained_since_publish,
        )
        self.decisions.append(judgement.decision.reason)
        if not judgement.decision.publish:
            return False
        _, self.active = publish_candidate(
            self.registry, trainer.peft_model, trainer.pairs_trained, self.active.version, judgement, cand_matrix,
            self.device,
        )
        self.active_matrix = cand_matrix
        self.trained_since_publish = 0
        self.published += 1
        return True


class FullMethod(SystemMethod):
    """``full``: :class:`SystemMethod` whose vectors come from the adapter learned in the stream."""

    learner: StreamLearner

    def advance(self, now: float) -> None:
        self.learner.advance(now)


def encode_catalog(encode: Encode, titles: list[str]) -> np.ndarray:
    """Encode every item text, shortest first (less padding per batch), in item order."""
    order = sorted(range(len(titles)), key=lambda k: (len(titles[k]), k))
    vecs = np.asarray(encode([titles[k] for k in order]), dtype=np.float32)
    out = np.empty_like(vecs)
    out[np.asarray(order)] = vecs
    return out


def build_system_methods(
    log: EventLog,
    settings: Settings,
    eval_from: float,
    names: list[str],
    device: str = "cpu",
) -> list[SystemMethod]:
    """``frozen`` and/or ``full`` over one shared :class:`SystemReplay`."""
    import torch

    from models.encoder import TorchEncoder

    torch.manual_seed(settings.seed)
    weights = weights_from_settings(settings)
    pairs_from = eval_from - settings.eval_pretrain_days * DAY_S if "full" in names else None
    replay = SystemReplay(log, settings, pairs_from)
    out: list[SystemMethod] = []
    base = None
    if "frozen" in names or "full" in names:
        base = encode_catalog(TorchEncoder(device=device).encode, log.titles)
    if "frozen" in names:
        out.append(SystemMethod("frozen", replay, base, weights, settings.recommend_candidates))
    if "full" in names:
        from learner.trainer import LoraTrainer

        full = FullMethod("full", replay, base.copy(), weights, settings.recommend_candidates)
        trainer = LoraTrainer(settings, device)
        # As the learner process does: random catalog items as extra negatives. In-batch
        # negatives alone pulled retrieval below the frozen encoder (learner/README.md).
        trainer.set_catalog(log.titles)
        gate = None
        if settings.eval_gate:
            registry = tempfile.mkdtemp(prefix="freshrec-eval-registry-")
            atexit.register(shutil.rmtree, registry, True)
            gate = Gate.start(replay, base, device, registry)
        full.learner = StreamLearner(
            trainer=trainer,
            replay=replay,
            method=full,
            every_s=settings.eval_train_every_days * DAY_S,
            max_pairs=settings.eval_pairs_per_update,
            pretrain_pairs=settings.eval_pretrain_pairs,
            batch_size=settings.learner_batch_size,
            epochs=settings.eval_epochs,
            seed=settings.seed,
            gate=gate,
        )
        out.append(full)
    return out
