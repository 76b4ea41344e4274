"""The ranker, trained in the stream: rank-examples -> candidate -> gate -> ranker registry + announcement.

Two parts, so the decisions are tested without a broker:

- :class:`RankerUpdater` (no Kafka): when an update is due, the update itself (fill
  ``sim``, fit a candidate, judge it against what serving would otherwise serve, publish
  it only if the gate passes it).
- :class:`RankerLoop`: the process side. A thread of the learner process follows
  ``settings.topics.rank_examples`` with :func:`freshrec.consumer.follow_resuming`
  (never skipping a record through broker outages), feeds :class:`learner.rank_intake.RankIntake`,
  runs due updates, checkpoints, announces published versions on ``settings.topics.rankers``
  and sets the learner's metrics. :meth:`RankerLoop.close` stops and joins the thread,
  so the learner exits cleanly and starts no process.

**When.** An update is due once the held-back window is full and a trained basket
exists, and ``ranker_update_baskets`` new baskets arrived since the last update, or
``ranker_update_seconds`` of wall-clock time passed with any new one, or
``ranker_update_days`` of event time did (the rule ``freshrec eval`` replays, so a fast
replay updates as often in event time as the evaluation measured).

**What.** ``ranker_family`` ``lgbm`` refits on the whole training window; ``lgbm_continue``
and ``torch`` continue the *active* version's model on the baskets it has not trained
on (the whole window if the active version is not this loop's last publication, e.g.
after an admin rollback), or start afresh when the active one is of another family or
schema. The manifest's parent is the active version in every case (None for the first).
Each update is seeded ``settings.seed + update``. The torch family trains on CUDA when
the learner's device is.

**Judged how.** On the held-back baskets, whole (every candidate row), by
``learner.gate.judge_ranker``: Recall@10 per basket against the whole basket, paired
with what serving would serve instead: the active ranker, or the log blend over the same
feature columns (:func:`blend_scores`) when none is active or it cannot score (another
schema, a corrupt version). A tie is held.

**The sim column.** Examples carry ``sim`` = 0 (the flow has no vectors). When the
learner's adapter loop hands over the active adapter's item vectors
(:meth:`RankerLoop.offer_vectors`: the matrix it encodes for its own gate, so this costs
no extra encoding), every example the update reads gets ``sim`` recomputed with
``ranking.features.similarity_column`` from its history, as serving computes it. Until
then ``sim`` stays as carried, for training and judging alike.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import orjson

from freshrec.consumer import Backoff, Message, TopicFollower, follow_resuming
from freshrec.contracts import InvalidRecord
from freshrec.epochs import topic_ids
from freshrec.producer import RecordProducer
from freshrec.settings import Settings
from models.ranker import RankerFailed, RankerMismatch, RankerModel, RankerParams, fit_ranker
from models.ranker_registry import LoadedRanker, RankerRegistry, RankerRejected
from ranking.features import COLUMN, FEATURE_NAMES, FEATURE_SCHEMA, FeatureRules, similarity_column
from ranking.scoring import LogBlendWeights, SimilarityScale, scale_from_settings
from ranking.user_state import DAY_S

from .gate import Judgement, judge_ranker, publish_ranker
from .metrics import LearnerMetrics
from .rank_intake import RankCheckpointStore, RankerState, RankExample, RankIntake, decode_example

log = logging.getLogger("freshrec.learner.ranker")

BLEND = "blend"  # what the gate names the active side when no ranker is active


def blend_scores(features: np.ndarray, weights: LogBlendWeights) -> np.ndarray:
    """The log blend of each row from its own columns: what /recommend ranks by without a ranker.

    The columns already hold ``log(repeat + 0.005)``, ``log(popularity + 0.001)``, the
    clipped scaled cosine and the new flag, i.e. ``ranking.scoring.log_blend_terms``'s
    terms (same floors), so the blend's order is recomputed exactly from the row.
    """
    x = features.astype(np.float64, copy=False)
    return (
        weights.repeat * x[:, COLUMN["log_repeat"]]
        + weights.popularity * x[:, COLUMN["log_pop"]]
        + weights.similarity * x[:, COLUMN["sim"]]
        + weights.new * x[:, COLUMN["new"]]
    )


@dataclass(frozen=True)
class ItemVectors:
    """One adapter version's item vectors and similarity scale, as the ``sim`` column needs them."""

    version: str
    vectors: Mapping[str, np.ndarray]
    scale: SimilarityScale

    @classmethod
    def of_matrix(cls, version: str, item_ids: Sequence[str], matrix: np.ndarray, settings: Any) -> ItemVectors:
        return cls(version, {item: matrix[k] for k, item in enumerate(item_ids)}, scale_from_settings(matrix, settings))


class SimFiller:
    """Recomputes ``sim`` in place, once per example and vectors version (examples are owned by the intake)."""

    def __init__(self, rules: FeatureRules) -> None:
        self.rules = rules
        self.version: str | None = None
        self._filled: set[str] = set()

    def fill(self, examples: Sequence[RankExample], vectors: ItemVectors | None) -> int:
        """Fill the examples not filled with ``vectors`` yet; returns how many were (0 without vectors)."""
        if vectors is None:
            return 0
        if vectors.version != self.version:
            self.version, self._filled = vectors.version, set()
        done = 0
        for ex in examples:
            if ex.example_id in self._filled:
                continue
            # clipped at 0 as ranking.features.feature_matrix writes the column
            ex.features[:, COLUMN["sim"]] = np.maximum(similarity_column(
                ex.state_before(), ex.items, vectors.vectors, self.rules, vectors.scale
            ), 0.0)
            self._filled.add(ex.example_id)
            done += 1
        return done

    def forget_except(self, example_ids: set[str]) -> None:
        """Bound the memory to the examples still held."""
        self._filled &= example_ids


@dataclass(frozen=True)
class UpdateOutcome:
    """What one update did, for the log, the metrics and the caller (who announces ``published``)."""

    update: int
    trained_baskets: int
    rows: int
    fit_s: float
    reason: str
    judgement: Judgement | None = None
    published: LoadedRanker | None = None

    def figures(self) -> dict[str, float]:
        out = {"fit_seconds": self.fit_s, "trained_baskets": float(self.trained_baskets)}
        if self.judgement is not None:
            out.update({f"candidate_{k}": v for k, v in self.judgement.candidate.items()})
            out.update({f"active_{k}": v for k, v in self.judgement.active.items()})
        return out


class RankerUpdater:
    """The decisions of the ranker loop over an intake and a registry; no Kafka, injectable clock."""

    def __init__(
        self,
        settings: Settings,
        intake: RankIntake,
        state: RankerState,
        registry: RankerRegistry,
        device: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.intake = intake
        self.state = state
        self.registry = registry
        params = RankerParams.from_settings(settings)
        self.params = replace(params, device=device) if device else params
        self.weights = LogBlendWeights.from_settings(settings)
        self.filler = SimFiller(FeatureRules.from_settings(settings))
        self._clock = clock
        self.last_update_wall = clock()
        self._loaded: LoadedRanker | None = None

    # -- when ------------------------------------------------------------------------------

    def new_baskets(self) -> int:
        return self.intake.next_seq - self.state.seen_seq

    def ready(self) -> bool:
        """Enough held back to judge (a full gate window) and something to train on."""
        held, training = self.intake.sizes()
        return held >= self.intake.gate_size and training > 0

    def due(self) -> bool:
        new = self.new_baskets()
        if new <= 0 or not self.ready():
            return False
        if new >= self.settings.ranker_update_baskets:
            return True
        if self._clock() - self.last_update_wall >= self.settings.ranker_update_seconds:
            return True
        last_ts = self.state.last_update_ts
        return last_ts is not None and self._newest_ts() - last_ts >= self.settings.ranker_update_days * DAY_S

    def _newest_ts(self) -> float:
        return self.intake.newest_ts

    # -- the update ------------------------------------------------------------------------

    def active(self) -> tuple[str | None, RankerModel | None]:
        """The registry's active version and its model when this schema can use it (else None: judge by the blend)."""
        version = self.registry.active()
        if version is None:
            return None, None
        if self._loaded is None or self._loaded.version != version:
            try:
                self._loaded = self.registry.load(version)
            except RankerRejected as exc:
                log.warning("active ranker %s does not load (%s): judging candidates against the blend", version, exc)
                self._loaded = None
                return version, None
        m = self._loaded.model
        if m.feature_schema != FEATURE_SCHEMA or m.feature_names != FEATURE_NAMES:
            return version, None  # serving refuses it too and serves the blend
        return version, m

    def update(self, vectors: ItemVectors | None = None) -> UpdateOutcome:
        """Fit a candidate, judge it on the held-back baskets, publish and activate it if the gate passes it."""
        s = self.state
        held, training = self.intake.held(), self.intake.training()
        s.seen_seq = self.intake.next_seq
        s.last_update_ts = self._newest_ts()
        self.last_update_wall = self._clock()
        s.updates += 1
        active_version, active_model = self.active()
        continued = self.params.family == "mlp" or self.params.mode == "continue"
        parent_model = active_model if continued and active_model is not None and active_model.family == self.params.family else None
        ours = bool(s.published) and active_version == s.published[-1]
        since_active = [ex for ex in training if ex.seq >= s.active_trained_seq] if ours else training
        train = since_active if parent_model is not None else training
        train = [ex for ex in train if ex.labels.any()]
        # What the candidate has learned that the active version has not: the gate holds at 0.
        s.trained_since_publish = len(since_active) if active_version is not None else len(training)
        if not train:
            return self._held(UpdateOutcome(s.updates, 0, 0, 0.0, "hold: no new basket with a bought candidate to train on"))
        self.filler.fill([*train, *held], vectors)
        self.filler.forget_except({ex.example_id for ex in (*training, *held)})
        x = np.concatenate([ex.features for ex in train])
        y = np.concatenate([ex.labels for ex in train])
        t0 = time.perf_counter()
        candidate = fit_ranker(x, y, [len(ex) for ex in train], self.settings.seed + s.updates, FEATURE_NAMES,
                               FEATURE_SCHEMA, self.params, parent_model)
        fit_s = time.perf_counter() - t0
        hx = np.concatenate([ex.features for ex in held])
        judgement = judge_ranker(
            candidate.score(hx, schema=FEATURE_SCHEMA),
            self._active_scores(active_model, hx),
            np.concatenate([ex.labels for ex in held]),
            [len(ex) for ex in held],
            self.settings,
            s.trained_since_publish,
            self._active_label(active_version, active_model),
            relevant=[ex.basket_size for ex in held],
        )
        outcome = UpdateOutcome(s.updates, len(train), len(y), fit_s, judgement.decision.reason, judgement)
        if not judgement.decision.publish:
            return self._held(outcome)
        loaded = publish_ranker(self.registry, candidate, active_version, judgement, max(ex.seq for ex in train) + 1)
        self._loaded = loaded
        s.published.append(loaded.version)
        s.active_trained_seq = max(ex.seq for ex in train) + 1
        s.trained_since_publish = 0
        s.last_figures, s.last_reason = outcome.figures(), outcome.reason
        return replace(outcome, published=loaded)

    @staticmethod
    def _active_label(version: str | None, model: RankerModel | None) -> str:
        if version is None:
            return BLEND
        return version if model is not None else f"{BLEND} (active {version} unusable)"

    def _active_scores(self, model: RankerModel | None, x: np.ndarray) -> np.ndarray:
        if model is not None:
            try:
                return model.score(x, schema=FEATURE_SCHEMA)
            except (RankerMismatch, RankerFailed) as exc:
                log.warning("the active ranker cannot score the held-back baskets (%s): judging against the blend", exc)
        return blend_scores(x, self.weights)

    def _held(self, outcome: UpdateOutcome) -> UpdateOutcome:
        self.state.last_figures, self.state.last_reason = outcome.figures(), outcome.reason
        return outcome


def announcement_value(loaded: LoadedRanker) -> bytes:
    """The rankers-topic record of a published version (the contract's fields, plus family, created, metrics)."""
    m = loaded.manifest
    return orjson.dumps({
        "version": m.version, "schema": m.feature_schema, "parent": m.parent,
        "family": m.family, "created": m.created, "metrics": m.metrics,
    })


class RankerLoop:
    """The ranker half of the learner process: a thread from :meth:`start` until :meth:`close`.

    Restores its checkpoint (``state_dir/learner/ranker``) on construction, after checking
    that the rank-examples topic is the one its offsets belong to (a recreated topic stops
    the learner with ``EpochMismatch``, as for train-pairs).
    """

    def __init__(
        self,
        settings: Settings,
        device: str | None = None,
        metrics: LearnerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.topic = settings.topics.rank_examples
        self.store = RankCheckpointStore(settings.state_dir / "learner" / "ranker")
        self.store.check_epoch(self.topic, topic_ids(settings, [self.topic])[self.topic])
        ckpt = self.store.latest()
        state = ckpt.state if ckpt is not None else RankerState(topic=self.topic)
        if state.topic != self.topic:
            raise RuntimeError(f"the ranker checkpoint follows {state.topic!r}, not {self.topic!r}: use another state_dir")
        self.intake = RankIntake(
            settings.ranker_gate_baskets, settings.ranker_window_baskets, settings.ranker_train_negatives,
            settings.ranker_dedupe_ids,
            held=ckpt.held[-settings.ranker_gate_baskets:] if ckpt else (),
            training=ckpt.training if ckpt else (),
            seen_ids=ckpt.seen_ids if ckpt else (), next_seq=state.next_seq,
        )
        self.intake.duplicates = state.duplicates
        self.state = state
        self.registry = RankerRegistry(settings.state_dir / "rankers")
        self.updater = RankerUpdater(settings, self.intake, state, self.registry, device, clock)
        self.metrics = metrics
        self._clock = clock
        self.last_activity = clock()
        self._vectors: ItemVectors | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._producer: RecordProducer | None = None
        self._last_log = clock()
        self.busy = False
        if ckpt is not None:
            log.info("ranker resumed: offsets %s, %d examples consumed, %d held back, %d in the window, %d updates, "
                     "published %s", state.offsets, state.consumed, len(self.intake.held()), len(self.intake.training()),
                     state.updates, state.published[-1:] or "nothing")

    # -- wiring ------------------------------------------------------------------------------

    @property
    def vectors_version(self) -> str | None:
        return self._vectors.version if self._vectors is not None else None

    def offer_vectors(self, version: str, item_ids: Sequence[str], matrix: np.ndarray) -> None:
        """The active adapter's item vectors, from the adapter loop's thread (read at the next update)."""
        if version != self.vectors_version:
            self._vectors = ItemVectors.of_matrix(version, item_ids, matrix, self.settings)
            log.info("ranker: sim column from adapter %s's vectors (%d items) from the next update on", version, len(item_ids))

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="freshrec-ranker", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread after what it is doing (an update finishes), checkpoint, and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        self._producer = RecordProducer(self.settings, client_id="freshrec-learner-ranker")
        try:
            follow_resuming(
                self._stop,
                lambda start: TopicFollower(self.settings, self.topic, start=start, client_id="freshrec-learner-ranker"),
                dict(self.state.offsets) or "beginning",
                lambda _follower, batch: self.apply(batch),
                self._on_error,
            )
        finally:
            try:
                self.checkpoint()
                self._set_metrics()
                self._log_progress()
            finally:
                self._producer.flush(timeout=10)
                self._producer.close()

    def _on_error(self, exc: Exception, backoff: Backoff, pause_s: float) -> None:
        level = logging.WARNING if backoff.failures <= 3 or backoff.failures % 20 == 0 else logging.DEBUG
        log.log(level, "ranker: following %s failed (%s: %s); retrying in %.1f s", self.topic, type(exc).__name__, exc, pause_s)

    def apply(self, batch: list[Message]) -> None:
        """One poll's messages (possibly none): intake, then an update when due (idempotent: dedupe on example_id)."""
        s = self.state
        for msg in batch:
            s.offsets[msg.partition] = msg.offset + 1
            s.consumed += 1
            try:
                ex = decode_example(msg.value)
            except InvalidRecord as exc:
                s.skipped += 1
                if self._producer is not None:
                    self._producer.dead_letter("learner-ranker", exc, msg.value, self.topic)
                continue
            if ex.schema != FEATURE_SCHEMA:
                s.skipped += 1
                if s.skipped <= 10 or s.skipped % 1000 == 0:
                    log.warning("ranker: example %s has feature schema %s, this learner trains %s; skipped (%d so far)",
                                ex.example_id, ex.schema, FEATURE_SCHEMA, s.skipped)
                continue
            self.intake.offer(ex)
        s.next_seq, s.duplicates = self.intake.next_seq, self.intake.duplicates
        if batch:
            self.last_activity = self._clock()
        if self.updater.due():
            self._update()
        if self._clock() - self._last_log >= self.settings.learner_log_seconds:
            self._log_progress()
        self._set_metrics()

    def _update(self) -> None:
        self.busy = True
        try:
            outcome = self.updater.update(self._vectors)
        except Exception:  # noqa: BLE001 - a failed fit must not stop the adapter learner; the next update retries
            log.exception("ranker update %d failed; held", self.state.updates)
            self.state.last_reason = "failed"
            return
        finally:
            self.busy = False
            self.last_activity = self._clock()
        log.info("ranker update %d: %d baskets, %d rows, fit %.1f s; %s", outcome.update, outcome.trained_baskets,
                 outcome.rows, outcome.fit_s, outcome.reason)
        self.checkpoint()  # the publication and the offsets that led to it, before it is announced
        if outcome.published is not None:
            self._announce(outcome.published)
            log.info("ranker published %s (parent %s, %s)", outcome.published.version,
                     outcome.published.manifest.parent or BLEND, outcome.published.model.family)

    def _announce(self, loaded: LoadedRanker) -> None:
        assert self._producer is not None
        self._producer.send(self.settings.topics.rankers, loaded.version, announcement_value(loaded))
        report = self._producer.flush(timeout=30)
        if report.failed:
            log.error("announcing ranker %s: %d sends failed so far (%s)", loaded.version, report.failed, report.errors[-1:])

    def checkpoint(self) -> None:
        self.state.next_seq, self.state.duplicates = self.intake.next_seq, self.intake.duplicates
        self.store.write(self.state, self.intake.held(), self.intake.training(), self.intake.seen_ids())

    def _set_metrics(self) -> None:
        if self.metrics is None:
            return
        s = self.state
        self.metrics.ranker(
            {"consumed": s.consumed, "duplicates": s.duplicates, "skipped": s.skipped, "updates": s.updates,
             "published": len(s.published)},
            {"held": len(self.intake.held()), "training": len(self.intake.training())},
            s.last_figures,
        )

    def _log_progress(self) -> None:
        self._last_log = self._clock()
        s = self.state
        log.info("ranker: %d examples consumed (%d duplicates, %d skipped), %d held back, %d in the window, "
                 "%d new since the last update, %d updates, %d published, active %s; last: %s",
                 s.consumed, s.duplicates, s.skipped, len(self.intake.held()), len(self.intake.training()),
                 self.updater.new_baskets(), s.updates, len(s.published), self.registry.active() or BLEND,
                 s.last_reason or "-")
