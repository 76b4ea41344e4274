"""The learner process: follow ``train-pairs``, train micro-batches, evaluate, publish.

One loop, one thread, so the order of effects is simple to reason about::

    poll ─▶ per message: record offset, parse (bad ─▶ dead-letter), fill target text,
            intake (dedupe ─▶ window ─▶ batcher)
         ─▶ per due batch: train_step ─▶ training log ─▶ checkpoint (offsets + weights)
            ─▶ every K batches: evaluate candidate vs active on the window ─▶ publish or hold

Beside it, in a thread of the same process, :class:`learner.rank_loop.RankerLoop` trains
the ranker from ``rank-examples``; this loop starts it, hands it the active adapter's item
vectors for the ``sim`` column, counts its activity for ``--idle-exit`` and joins it in
:meth:`Learner.close`.

See :mod:`learner.checkpoint` for why a restarted learner neither re-trains nor skips a
pair, and :mod:`learner.publish` for the publish rule.

A crash between publishing a version and the checkpoint that records it would leave
the registry a version ahead of the checkpoint; on start the learner adopts the
registry's newest version as its active one and announces it again (announcements
are keyed by version, so a repeat is harmless to consumers).
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from freshrec.consumer import Message, TopicFollower
from freshrec.contracts import AdapterAnnouncement, CatalogItem, InvalidRecord, TrainPair
from freshrec.epochs import topic_ids
from freshrec.producer import RecordProducer
from freshrec.settings import Settings
from models.encoder import BASE_VERSION
from models.registry import AdapterRegistry, parse_version

from .checkpoint import TRAINER_FILE, CheckpointStore, LearnerState
from .evaluate import ActiveEncoder, TargetPopularity, catalog_fingerprint, encode_items
from .gate import judge_candidate, publish_candidate
from .intake import Intake
from .metrics import LearnerMetrics, MetricsServer
from .rank_loop import RankerLoop
from .trainer import LoraTrainer

log = logging.getLogger("freshrec.learner")

CatalogSource = Callable[[], Mapping[str, CatalogItem]]


class CatalogTexts:
    """Item texts for pairs that arrive without a ``target_text``, and the catalog for evaluation.

    Refreshes from ``source`` on a miss, at most every ``min_refresh_s``, so an item that
    is genuinely unknown does not cost a full catalog read per pair.
    """

    def __init__(self, source: CatalogSource, min_refresh_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self._source = source
        self._items: Mapping[str, CatalogItem] = {}
        self._loaded_at: float | None = None
        self._min_refresh_s = min_refresh_s
        self._clock = clock
        self._texts: list[str] | None = None
        self._texts_of: Mapping[str, CatalogItem] | None = None

    def all(self) -> Mapping[str, CatalogItem]:
        self._items = self._source()
        self._loaded_at = self._clock()
        return self._items

    def texts(self) -> list[str]:
        """Every item's text (loaded on first use, refreshed by :meth:`all`), for sampling negatives."""
        if self._loaded_at is None:
            self.all()
        if self._texts is None or self._texts_of is not self._items:
            self._texts, self._texts_of = [item.text() for item in self._items.values()], self._items
        return self._texts

    def text(self, item_id: str) -> str | None:
        item = self._items.get(item_id)
        if item is None and (self._loaded_at is None or self._clock() - self._loaded_at >= self._min_refresh_s):
            item = self.all().get(item_id)
        return item.text() if item is not None else None


@dataclass
class RunSummary:
    pairs_trained: int
    steps: int
    published: list[str]
    reason: str


class Learner:
    """One learner over ``settings``; ``run()`` until stopped. Restores its checkpoint on construction."""

    def __init__(
        self,
        settings: Settings,
        catalog: CatalogSource,
        device: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.device = device or settings.resolved_device()
        self.topic = settings.topics.train_pairs
        self.store = CheckpointStore(settings.state_dir / "learner")
        # Before anything slow: offsets of a recreated topic would skip every new pair.
        self.store.check_epoch(self.topic, topic_ids(settings, [self.topic])[self.topic])
        self.registry = AdapterRegistry(settings.state_dir / "adapters")
        self.catalog = CatalogTexts(catalog, clock=clock)
        self._clock = clock
        self.trainer = LoraTrainer(settings, self.device)
        self.state = self._restore()
        self.popularity = TargetPopularity.days(settings.popularity_half_life_days, self.state.target_popularity)
        self.intake = Intake(
            settings.learner_batch_size,
            settings.learner_flush_seconds,
            settings.learner_eval_window,
            settings.learner_dedupe_ids,
            clock=clock,
            mix_pool=max(settings.learner_mix_pool, settings.learner_batch_size),
            window=self.state.window,
            pending=self.state.pending,
            seen_ids=self.store.trained_ids()[-settings.learner_dedupe_ids :],
        )
        self.intake.duplicates = self.state.duplicates
        self.producer = RecordProducer(settings, client_id="freshrec-learner")
        self.active = ActiveEncoder.load(self.state.active_version, self.registry.root, self.device)
        self._adopt_unrecorded_publication()
        self.follower = TopicFollower(settings, self.topic, start=dict(self.state.offsets) or "beginning",
                                      client_id="freshrec-learner")
        self.published: list[str] = []
        self._recent_losses: deque[float] = deque(maxlen=20)
        self._stop = False
        # The ranker trains beside the adapter, in a thread of this process (learner.rank_loop).
        self.metrics = LearnerMetrics()
        self.ranker = RankerLoop(settings, self.device, self.metrics, clock) if settings.ranker_learn else None
        self._vectors_tried_at: float | None = None
        port = settings.learner_metrics_port
        self.metrics_server = (
            MetricsServer(self.metrics, port, settings.learner_metrics_host) if port is not None else None
        )
        self._show_adapter()

    # -- start-up --------------------------------------------------------------------------

    def _restore(self) -> LearnerState:
        ckpt = self.store.latest()
        if ckpt is None:
            dropped = self.store.truncate_log(0)  # a log without a checkpoint trained nothing that survived
            if dropped:
                log.info("no checkpoint: dropped %d uncommitted batches from the training log", dropped)
            return LearnerState(topic=self.topic)
        state = self.store.read_state(ckpt)
        if state.topic != self.topic:
            raise RuntimeError(
                f"checkpoint {ckpt} follows topic {state.topic!r}, not {self.topic!r}: "
                "use another state_dir or the same topic prefix"
            )
        self.trainer.load_state(ckpt / TRAINER_FILE)
        dropped = self.store.truncate_log(state.step)
        log.info(
            "resumed from %s: step %d, %d pairs trained, offsets %s, window %d, pending %d, active %s%s",
            ckpt.name, state.step, state.pairs_trained, state.offsets, len(state.window), len(state.pending),
            state.active_version, f", dropped {dropped} batches trained after it" if dropped else "",
        )
        return state

    def _adopt_unrecorded_publication(self) -> None:
        latest = self.registry.latest()
        if latest is None:
            return
        active = self.state.active_version
        if active != BASE_VERSION and parse_version(latest) <= parse_version(active):
            return
        if active == BASE_VERSION and self.state.step == 0:
            return  # a fresh learner does not claim versions someone else published
        log.warning("registry holds %s, newer than the checkpoint's active %s: adopting and re-announcing it",
                    latest, active)
        self.active = ActiveEncoder.load(latest, self.registry.root, self.device)
        self.state.active_version = latest
        self._announce(latest)

    # -- the loop --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to finish after the current step (safe from a signal handler)."""
        self._stop = True

    def run(
        self,
        stop: Callable[[], bool] | None = None,
        max_pairs: int | None = None,
        idle_exit_s: float | None = None,
    ) -> RunSummary:
        """Train until ``stop()`` is true, ``max_pairs`` are trained, or nothing arrives for ``idle_exit_s``."""
        started, trained_at_start = self._clock(), self.trainer.pairs_trained
        last_message = last_log = started
        reason = "stopped"
        if self.ranker is not None:
            self.ranker.start()
        while True:
            if self._stop or (stop is not None and stop()):
                break
            if max_pairs is not None and self.trainer.pairs_trained >= max_pairs:
                reason = f"trained {self.trainer.pairs_trained} >= {max_pairs} pairs"
                break
            messages = self.follower.poll(0.2)
            now = self._clock()
            if messages:
                last_message = now
            for msg in messages:
                self._consume(msg)
                while self.intake.batch_due():
                    self._train(self.intake.take_batch())
            while self.intake.batch_due():
                self._train(self.intake.take_batch())
            if now - last_log >= self.settings.learner_log_seconds:
                self._log_progress(started, trained_at_start)
                last_log = now
            self._feed_ranker_vectors(now)
            if self.ranker is not None:  # idle means both topics are quiet and no ranker update runs
                last_message = max(last_message, self.ranker.last_activity)
                if self.ranker.busy:
                    last_message = now
            if idle_exit_s is not None and not messages and now - last_message >= idle_exit_s and not len(self.intake.batcher):
                reason = f"idle for {idle_exit_s:g} s"
                break
        self._checkpoint()
        self._log_progress(started, trained_at_start)
        log.info("learner stopping: %s", reason)
        return RunSummary(self.trainer.pairs_trained, self.trainer.step, list(self.published), reason)

    def close(self) -> None:
        if self.ranker is not None:
            self.ranker.close()  # joins its thread after its checkpoint
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.follower.close()
        self.producer.flush()
        self.producer.close()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def _feed_ranker_vectors(self, now: float, every_s: float = 60.0) -> None:
        """Hand the active adapter's item vectors to the ranker's ``sim`` column (this thread owns the encoder).

        The matrix is the one the adapter gate caches per version and catalog, so this
        encodes only when the gate has not yet (at most every ``every_s`` seconds, and only
        once the ranker has examples to use it on).
        """
        r = self.ranker
        if r is None or r.vectors_version == self.active.version or r.intake.next_seq == 0:
            return
        if self._vectors_tried_at is not None and now - self._vectors_tried_at < every_s:
            return
        self._vectors_tried_at = now
        items = self.catalog.all()
        if items:
            m = self.active.matrix(items, catalog_fingerprint(items))
            r.offer_vectors(m.version, m.item_ids, m.vectors)

    # -- per message -----------------------------------------------------------------------

    def _consume(self, msg: Message) -> None:
        # The offset moves with every message processed, so a checkpoint taken between two
        # messages of one poll names exactly what its window and weights have seen.
        self.state.offsets[msg.partition] = msg.offset + 1
        try:
            pair = TrainPair.model_validate_json(msg.value)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "record"
            self.producer.dead_letter("learner", InvalidRecord(field, str(err["msg"])), msg.value, self.topic)
            self.state.skipped += 1
            return
        if not pair.context_text.strip():
            self.state.skipped += 1  # nothing to learn from; the flow should not emit these
            return
        if not pair.target_text:
            text = self.catalog.text(pair.target_item)
            if text is None:
                self.state.skipped += 1
                if self.state.skipped <= 10 or self.state.skipped % 1000 == 0:
                    log.warning("pair %s: target %s is not in the catalog and has no target_text; skipped (%d so far)",
                                pair.pair_id, pair.target_item, self.state.skipped)
                return
            pair = pair.model_copy(update={"target_text": text})
        self.intake.offer(pair)

    # -- per micro-batch -------------------------------------------------------------------

    def _train(self, batch: list[TrainPair]) -> None:
        self.trainer.set_catalog(self.catalog.texts())
        loss = self.trainer.train_step(batch)
        for pair in batch:
            self.popularity.add(pair.target_item, pair.ts)
        self._recent_losses.append(loss)
        self.store.append_trained(self.trainer.step, [p.pair_id for p in batch])
        self.state.batches_since_eval += 1
        self.state.trained_since_publish += len(batch)
        self._checkpoint()
        if self.state.batches_since_eval >= self.settings.learner_eval_every:
            self._evaluate_and_maybe_publish()
            self._checkpoint()

    def _checkpoint(self) -> None:
        s = self.state
        s.window = self.intake.window_pairs()
        s.pending = self.intake.pending_pairs()
        s.step = self.trainer.step
        s.pairs_trained = self.trainer.pairs_trained
        s.duplicates = self.intake.duplicates
        s.target_popularity = self.popularity.entries
        self.store.write(self.trainer, s)
        self._show_adapter()

    def _show_adapter(self) -> None:
        losses = self._recent_losses
        loss = sum(losses) / len(losses) if losses else None
        self.metrics.adapter(self.trainer.pairs_trained, self.trainer.step, loss, self.active.version)

    def _evaluate_and_maybe_publish(self) -> None:
        self.state.batches_since_eval = 0
        t0 = time.monotonic()
        items = self.catalog.all()
        window = self.intake.window_pairs()
        if not items:
            log.info("hold: the catalog is empty, nothing to evaluate against")
            return
        fingerprint = catalog_fingerprint(items)
        cand_matrix = encode_items(self.trainer.encoder(), items, fingerprint)
        act_matrix = self.active.matrix(items, fingerprint)
        judgement = judge_candidate(
            self.trainer.encoder(), cand_matrix, self.active, act_matrix, window, self.popularity, self.settings,
            self.state.trained_since_publish,
        )
        log.info("evaluated in %.1f s on %d window pairs (%d targets not in the catalog): %s",
                 time.monotonic() - t0, int(judgement.candidate["n"]), int(judgement.candidate["unknown"]),
                 judgement.decision.reason)
        if not judgement.decision.publish:
            return
        manifest, self.active = publish_candidate(
            self.registry, self.trainer.peft_model, self.trainer.pairs_trained, self.active.version, judgement,
            cand_matrix, self.device,
        )
        self.state.active_version = manifest.version
        self.state.trained_since_publish = 0
        self.published.append(manifest.version)
        self._show_adapter()
        self._announce(manifest.version)
        log.info("published %s (parent %s, %d pairs trained)", manifest.version, manifest.parent or BASE_VERSION,
                 manifest.pairs_seen)

    def _announce(self, version: str) -> None:
        manifest, path = self.registry.load(version)
        announcement = AdapterAnnouncement(
            version=manifest.version,
            parent=manifest.parent,
            path=str(path.resolve()),
            created=manifest.created,
            metrics=manifest.metrics,
        )
        self.producer.send(self.settings.topics.adapters, manifest.version, announcement.to_bytes())
        report = self.producer.flush(timeout=30)
        if report.failed:
            log.error("announcing %s: %d sends failed so far (%s)", version, report.failed, report.errors[-1:])

    def _log_progress(self, started: float, trained_at_start: int) -> None:
        elapsed = max(self._clock() - started, 1e-9)
        rate = (self.trainer.pairs_trained - trained_at_start) / elapsed
        loss = sum(self._recent_losses) / len(self._recent_losses) if self._recent_losses else float("nan")
        try:
            # Tansu under-reports end offsets (INTERFACES.md), so this lag is a lower bound.
            ends = self.follower.end_offsets()
            lag = sum(max(end - self.state.offsets.get(p, 0), 0) for p, end in ends.items())
        except Exception:  # noqa: BLE001 - a progress line must not stop training
            lag = -1
        log.info(
            "trained %d pairs (%.1f pairs/s), step %d, loss %.4f, window %d, pending %d, lag>=%d, "
            "duplicates %d, skipped %d, active %s",
            self.trainer.pairs_trained, rate, self.trainer.step, loss, len(self.intake.window),
            len(self.intake.batcher), lag, self.intake.duplicates, self.state.skipped, self.active.version,
        )
