"""``frozen`` and ``full``: the system itself, replayed in accelerated event time.

Both run the system's own components in process (no Kafka or Redis: the same pure
code the flows and serving call, fed from the event log):

- user state and fresh popularity: ``ranking.user_state`` (``apply_event``,
  ``Popularity``) with the flow's rules from Settings, so a cancel subtracts a purchase
  from the shopper's frequency and from popularity, exactly as in the streams flow;
- train pairs: ``ranking.pairs.pair_for`` (context = recent items' titles, most recent
  first, strictly earlier than the event, so one basket's lines are never each other's
  context);
- ranking: each basket is ranked by the functions serving's ``/recommend`` calls,
  ``ranking.scoring.recommend`` (``ranking.scoring.popular`` for a shopper serving
  deems cold), with the inputs serving would read at that moment: the shopper's state,
  serving's ``PopularityView`` of the replay's popularity (new arrivals judged against
  the newest event applied, serving's "now"), the configured blend
  (``weights_from_settings``), ``recommend_candidates``, and the version's space and
  similarity scale. :func:`rank_scores` hands serving's order to the protocol unchanged
  (its ties are broken by item id, the protocol's by index). No part of the ranking is
  re-implemented here; tests/integration/test_eval_serving_parity.py checks that the
  top ten equals a real serving app's ``/recommend`` for the same Redis state and
  version, ids, order and scores;
- item vectors: serving's encoder and index (:mod:`evaluation.item_space`): the ONNX
  export at ``encoder_precision`` (int8 on a CPU) encodes the catalog into a
  ``LiveIndex`` searched by FAISS, the scale fitted as serving's pair builder fits it.
  ``frozen`` uses the base version; ``full`` trains the LoRA adapter of
  ``learner.trainer.LoraTrainer`` in the stream: at every ``eval_train_every_days``
  boundary of event time it trains on (a bounded sample of) the pairs made since its
  last update, the learner's publish gate judges the candidate in PyTorch as the learner
  process does (``learner.publish.decide_publish`` on the newest ``learner_eval_window``
  pairs, held out of training as the learner holds them; setting ``eval_gate``), and a
  published version is exported and served like serving would serve it. Before the
  first basket it catches up on the pairs of the last ``eval_pretrain_days`` of history.

Measured on online_retail_ii, validation window (``--until 2011-06-01 --eval-from
2011-03-01``, 3,991 baskets, ``frozen``), all / warm / explore Recall@10:

====================================================  ======  ======  =======
scoring                                               all     warm    explore
====================================================  ======  ======  =======
before: vectorised blend, PyTorch fp32 vectors        0.2869  0.3058  0.1101
serving's functions, ONNX fp32 vectors                0.2870  0.3058  0.1101
serving's functions, ONNX int8 vectors (used)         0.2869  0.3057  0.1107
====================================================  ======  ======  =======

int8 moves Recall@10 by under 0.001 on every slice (the standard error of a slice
is ~0.005), and calling serving's per-request functions changed nothing measurable.
Time of ``frozen`` on that window, 2 shared cores: 84 s wall (63 s replay and
ranking) against 144 s (84 s) before: ``recommend`` per basket costs more than the
vectorised blend, but the int8 catalog encode is far cheaper than PyTorch's and FAISS
on serving's one thread removed OpenMP spinning. Each version ``full`` adopts costs an
export (5 s) and an int8 encode of the 4.4k items (9 s).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from freshrec.contracts import Event, TrainPair
from freshrec.settings import Settings
from learner.evaluate import ActiveEncoder, ItemMatrix, TargetPopularity
from learner.gate import judge_candidate, publish_candidate
from learner.intake import HoldoutWindow
from models.registry import AdapterRegistry
from ranking import scoring
from ranking.pairs import PairDraft, PairRules, pair_for
from ranking.scoring import (
    BlendWeights,
    LogBlendWeights,
    SimilarityScale,
    history_weights,
    user_vector,
    weights_from_settings,
)
from ranking.user_state import DAY_S, Popularity, StateRules, UserState, apply_event, popularity_weight
from serving.shopper_data import PopularityView

from .data import KIND_NAMES, EventLog
from .item_space import ItemText, ServingEncoders, VersionSpace, catalog_of, encode_space, limit_faiss_threads

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
        self.new_s = settings.blend_new_days * DAY_S
        self._view: PopularityView | None = None
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
            self.popularity.see(item, ts)
            if pop_weight:
                self.popularity.add(item, pop_weight, ts)
            self._view = None

    def popularity_view(self) -> PopularityView:
        """What serving's popularity cache would hold now: ``serving.shopper_data.PopularityView.of``
        over the counts and first-seen times Redis would hold, "now" the newest event time applied."""
        if self._view is None:
            p = self.popularity
            self._view = PopularityView.of(p.scores(), 0.0, first_seen=p.first_seen, now_ts=p.newest_ts, new_s=self.new_s)
        return self._view

    def take_pairs(self) -> list[TrainPair]:
        """The pairs made since the last call, completed with catalog titles."""
        titles = {iid: self.log.titles[k] for iid, k in self.item_index.items()}
        out = [d.complete(titles, titles) for d in self.drafts]
        self.drafts = []
        return out


@dataclass(frozen=True, slots=True)
class Signals:
    """One shopper's blend inputs, one value per item index, and serving's ranking of them.

    The arrays are features for studies (``bench.ranker_study``); ``served`` is what
    :meth:`SystemMethod.scores` returns for the same shopper and state: the ranking of
    ``ranking.scoring.recommend`` itself, not a re-computation from the arrays.
    """

    repeat: np.ndarray  # basket-decayed purchase count, raw (0 = never bought)
    similarity: np.ndarray  # scaled cosine to the user vector (0 without one)
    popularity: np.ndarray  # fresh popularity, max 1
    is_new: np.ndarray  # 1 for items first seen within blend_new_days
    history: list[int]  # item indices of the user vector's history
    served: np.ndarray  # SystemMethod.scores: serving's order as descending numbers, -inf outside its pool


def rank_scores(ranked: Sequence[tuple[str, float]], index: Mapping[str, int], n: int) -> np.ndarray:
    """A ranking as one score per item index: n_ranked for the first, down to 1; -inf for the rest.

    The protocol breaks score ties by item index, serving breaks them by item id; scoring
    by position hands the protocol serving's order exactly, ties included.
    """
    out = np.full(n, -np.inf)
    if ranked:
        rows = np.fromiter((index[i] for i, _ in ranked), dtype=np.int64, count=len(ranked))
        out[rows] = np.arange(len(ranked), 0, -1, dtype=np.float64)
    return out


class SystemMethod:
    """The system's /recommend ranking over one version's item space (``frozen`` or ``full``).

    Each basket is ranked by the functions serving's ``/recommend`` calls, with the inputs
    serving would read for that shopper at that moment: ``ranking.scoring.recommend`` (or
    ``ranking.scoring.popular`` for a cold shopper, by serving's rule for "cold") over
    serving's ``PairSpace`` of the version's ``LiveIndex``, the version's similarity scale,
    and the replay's :meth:`SystemReplay.popularity_view` (serving's ``PopularityView``).
    """

    def __init__(
        self,
        name: str,
        replay: SystemReplay,
        vectors: np.ndarray | VersionSpace,
        weights: BlendWeights | LogBlendWeights,
        candidates: int,
    ) -> None:
        self.name = name
        self.replay = replay
        self.weights = weights
        self.candidates = candidates
        s = replay.settings
        self.user_half_life_s = s.user_vector_half_life_days * DAY_S
        self.basket_decay = s.repeat_basket_decay
        self.index = replay.item_index
        self.set_space(vectors)

    def set_space(self, space: np.ndarray | VersionSpace) -> None:
        """Score with this version's space from now on (a matrix: indexed here, rows in log item order)."""
        if isinstance(space, np.ndarray):
            space = VersionSpace.from_vectors(space, self.replay.log.item_ids, self.replay.settings)
        self.space = space

    @property
    def vectors(self) -> np.ndarray:
        return self.space.vectors

    @property
    def similarity_scale(self) -> SimilarityScale:
        return self.space.similarity

    def observe(self, log: EventLog, start: int, stop: int) -> None:
        self.replay.observe(log, start, stop)

    def advance(self, now: float) -> None:
        pass

    def ranking(self, user: int, k: int | None = None) -> list[tuple[str, float]]:
        """What ``/recommend?user_id=...&k=k`` answers from the replay's state now (k None: the whole pool)."""
        state = self.replay.states.get(user)
        view = self.replay.popularity_view()
        space = self.space.space
        if state is None or (not state.history and not state.basket_bits):  # serving's "cold"
            return scoring.popular(view.scores, view.ranked, len(view.ranked) if k is None else k, space)
        return scoring.recommend(
            state.history,
            state.basket_scores(self.basket_decay),
            space,
            view.scores,
            view.ranked,
            self.weights,
            self.replay.log.n_items if k is None else k,
            now_ts=state.last_ts,
            half_life_s=self.user_half_life_s,
            candidates=self.candidates,
            new_items=view.new_items,
            similarity_scale=self.space.similarity,
        )

    def scores(self, user: int, now: float) -> np.ndarray:
        """Serving's ranking of every candidate as scores (:func:`rank_scores`); ``now`` is unused:
        serving's "now" is the newest event time applied, which the replay's state carries."""
        return rank_scores(self.ranking(user), self.index, self.replay.log.n_items)

    def signals(self, user: int, now: float) -> Signals | None:
        """The blend's inputs for ``user`` (features for studies) beside the served ranking; None when cold."""
        state = self.replay.states.get(user)
        if state is None or (not state.history and not state.basket_bits):
            return None
        n = self.replay.log.n_items
        repeat = np.zeros(n)
        for item, v in state.basket_scores(self.basket_decay).items():
            repeat[self.index[item]] = v
        hw = history_weights(state.history, state.last_ts, self.user_half_life_s)
        sim = np.zeros(n)
        vectors = self.space.vectors
        if hw:
            uvec = user_vector(hw, {i: vectors[self.index[i]] for i in hw})
            if uvec is not None:
                sim = self.space.similarity.apply((vectors @ uvec).astype(np.float64))
        view = self.replay.popularity_view()
        pop = np.zeros(n)
        for item, v in view.scores.items():
            pop[self.index[item]] = v
        is_new = np.zeros(n)
        for item in view.new_items:
            is_new[self.index[item]] = 1.0
        return Signals(repeat, sim, pop, is_new, [self.index[i] for i in hw], self.scores(user, now))

    def blend(self, sig: Signals) -> np.ndarray:
        """The served scores (-inf outside serving's candidate pool), as :meth:`scores` gives them."""
        return sig.served


def leaving_window(window: HoldoutWindow, pairs: list[TrainPair]) -> list[TrainPair]:
    """Push ``pairs`` (in event order) into the gate's window; return those pushed out, now trainable.

    ``learner.intake.Intake`` does the same one pair at a time: the newest
    ``learner_eval_window`` pairs stay held out for the publish gate, and a pair is
    trained only once newer ones push it out.
    """
    return [left for pair in pairs if (left := window.push(pair)) is not None]


@dataclass
class StreamLearner:
    """Trains the adapter in event time, gates each candidate, and serves the adopted ones as serving would.

    Bounded work, so a replay fits its time limit: at most ``max_pairs`` pairs per update
    (a uniform sample seeded by ``seed`` and the update number when there are more), in
    shuffled batches of ``batch_size``, for ``epochs`` passes. Training dominates the
    run time (measured: 449 s of a 771 s replay on online_retail_ii), so these budgets
    are what keeps ``freshrec eval`` inside 30 minutes on two cores.

    The learner process trains and judges in PyTorch, so this does too: each candidate's
    catalog is encoded by the trainer's PyTorch encoder for the gate. With ``gate``
    (setting ``eval_gate``, on by default) an update is adopted only as the learner
    process would publish it: the newest ``learner_eval_window`` pairs are held out of
    training, the candidate and the active version are ranked on them by
    ``learner.evaluate.window_metrics`` with serving's item-side blend, and
    ``learner.publish.decide_publish`` decides; a published candidate goes through the
    adapter registry (a temporary one) and is loaded back. Without a gate every update
    is published to that registry. An adopted version is then served as serving serves
    it: exported to ONNX at serving's precision (int8 on a CPU), the catalog encoded into
    a new index (:mod:`evaluation.item_space`), and later baskets are ranked on it. A held
    candidate keeps training, and baskets are scored with the active version meanwhile.
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
    encoders: ServingEncoders
    catalog: Mapping[str, ItemText]
    gate: Gate | None = None
    registry: AdapterRegistry | None = None  # where updates are published without a gate
    next_update: float | None = None
    updates: int = 0
    pairs_trained: int = 0
    train_seconds: float = 0.0
    encode_seconds: float = 0.0  # PyTorch encodes of each candidate's catalog (for the gate)
    gate_seconds: float = 0.0
    serve_seconds: float = 0.0  # adopted versions: ONNX export, int8 encode and index

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
        self.train_seconds += t1 - t0
        self.pairs_trained += len(pairs)
        self.updates += 1
        if self.gate is not None:
            vectors = encode_catalog(self.trainer.encoder().encode, self.replay.log.titles)  # type: ignore[attr-defined]
            t2 = time.perf_counter()
            self.encode_seconds += t2 - t1
            adopted = self.gate.judge(self.trainer, vectors, pairs)
            self.gate_seconds += time.perf_counter() - t2
            version = self.gate.active.version if adopted else None
            registry = self.gate.registry
        else:
            assert self.registry is not None
            version = self.registry.publish(self.trainer.peft_model, None, {}, self.pairs_trained).version  # type: ignore[attr-defined]
            registry = self.registry
        if version is not None:
            t3 = time.perf_counter()
            encoder = self.encoders.encoder(version, registry.load(version)[1])
            self.method.set_space(encode_space(encoder, self.catalog, self.replay.log.item_ids, self.replay.settings))
            self.serve_seconds += time.perf_counter() - t3


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
    seeded = True

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
    *,
    adapter_exports: Path | None = None,
) -> list[SystemMethod]:
    """``frozen`` and/or ``full`` over one shared :class:`SystemReplay`.

    Both start on the base version's space, encoded by serving's encoder (ONNX at
    ``settings.encoder_precision``: int8 on a CPU) from the export serving keeps in
    ``state_dir/exports``. ``adapter_exports`` (a folder named ``exports``) is where the
    versions ``full`` adopts are exported; default a temporary folder removed at exit
    (tests pass one they share, so one version is exported once).
    """
    from models.encoder import BASE_VERSION

    weights = weights_from_settings(settings)
    pairs_from = eval_from - settings.eval_pretrain_days * DAY_S if "full" in names else None
    replay = SystemReplay(log, settings, pairs_from)
    out: list[SystemMethod] = []
    if not ("frozen" in names or "full" in names):
        return out
    if "full" in names and settings.eval_encoder_dir is not None:
        # full's adapters are LoRA weights over the bundled encoder: over a student's space they would not fit.
        raise ValueError("eval_encoder_dir (a student encoder) works with frozen and ranker, not full")
    limit_faiss_threads(settings.serving_faiss_threads)
    encoders = ServingEncoders(settings, adapter_exports)
    catalog = catalog_of(log.item_ids, log.titles)
    base = encode_space(encoders.encoder(BASE_VERSION, None), catalog, log.item_ids, settings)
    if "frozen" in names:
        out.append(SystemMethod("frozen", replay, base, weights, settings.recommend_candidates))
    if "full" in names:
        import torch

        from learner.trainer import LoraTrainer
        from models.encoder import TorchEncoder

        torch.manual_seed(settings.seed)
        full = FullMethod("full", replay, base, weights, settings.recommend_candidates)
        trainer = LoraTrainer(settings, device)
        # As the learner process does: random catalog items as extra negatives. In-batch
        # negatives alone pulled retrieval below the frozen encoder (learner/README.md).
        trainer.set_catalog(log.titles)
        registry_root = tempfile.mkdtemp(prefix="freshrec-eval-registry-")
        atexit.register(shutil.rmtree, registry_root, True)
        gate = registry = None
        if settings.eval_gate:
            # The learner judges in PyTorch: the gate's active matrix is the base model's, encoded so.
            torch_base = encode_catalog(TorchEncoder(device=device).encode, log.titles)
            gate = Gate.start(replay, torch_base, device, registry_root)
        else:
            registry = AdapterRegistry(registry_root)
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
            encoders=encoders,
            catalog=catalog,
            gate=gate,
            registry=registry,
        )
        out.append(full)
    return out
