"""The indexer process: ``changed-items`` -> encoder -> ``item-vectors``.

It follows the changed-items topic from its checkpointed offsets, reduces each poll to
the last record per item, encodes the upserts in micro-batches with the active adapter's
encoder (the base model when there is none) and publishes one
:class:`~freshrec.contracts.ItemVector` per item, keyed by item id, tagged with the
adapter version, vector ``None`` for a delete.

Delivery is at least once: offsets are checkpointed (``state_dir/indexer/offsets.json``)
only after the broker acknowledged every vector of the batch, so a crash repeats at most
the last batch and a restart does not re-encode the catalog. Consumers of item-vectors
treat a record as "the current vector of this item", so a repeat is harmless. Those
offsets belong to one incarnation of the topic (``state_dir/indexer/epoch.json``,
:mod:`freshrec.epochs`): an indexer restarted on a recreated topic stops with
:class:`~freshrec.epochs.EpochMismatch` instead of skipping the new changes. A broker
error or a refused batch does not end the process: it re-reads changed-items from the
checkpoint after a capped backoff, the same at-least-once path as a restart.

The active adapter: the registry's latest version at start (or ``version``), then each
version announced on the ``adapters`` topic (the newest of a poll that loads), loaded
through the registry, which verifies it. A version that fails to load is logged and
skipped; the indexer keeps encoding with the one it has, so invariant 1 holds per
record (each vector carries its own version).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from freshrec.consumer import Backoff, Message, TopicFollower
from freshrec.contracts import AdapterAnnouncement
from freshrec.epochs import check_epoch_file, topic_ids
from freshrec.producer import RecordProducer
from freshrec.settings import Settings
from models.encoder import BASE_VERSION, TextEncoder

from .changes import collect_changes, item_vectors, micro_batches

log = logging.getLogger("freshrec.indexer")

EncoderFactory = Callable[[str], TextEncoder]


@dataclass
class IndexerStats:
    batches: int = 0
    encoded: int = 0
    deleted: int = 0
    invalid: int = 0
    published: int = 0
    version: str = BASE_VERSION
    switches: int = 0

    def line(self) -> str:
        return (
            f"version {self.version}: {self.encoded} encoded, {self.deleted} deleted, {self.invalid} invalid, "
            f"{self.published} vectors published in {self.batches} batches"
        )


def checkpoint_path(settings: Settings) -> Path:
    return Path(settings.state_dir) / "indexer" / "offsets.json"


def read_checkpoint(settings: Settings) -> dict[int, int] | None:
    """Next offsets per partition of changed-items, or None when there is no usable checkpoint."""
    try:
        data = orjson.loads(checkpoint_path(settings).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if data.get("topic") != settings.topics.changed_items:
        return None  # a checkpoint of another deployment's topics
    return {int(p): int(o) for p, o in data["positions"].items()}


def check_checkpoint_epoch(settings: Settings, has_positions: bool) -> None:
    """Raise :class:`~freshrec.epochs.EpochMismatch` if the checkpointed offsets were taken
    in another incarnation of changed-items; record the current one when none is.

    Without positions there is nothing to vouch for, so a recorded epoch is replaced.
    """
    path = checkpoint_path(settings).with_name("epoch.json")
    if not has_positions:
        path.unlink(missing_ok=True)
    topic = settings.topics.changed_items
    check_epoch_file(path, "freshrec index", topic, topic_ids(settings, [topic])[topic])


def write_checkpoint(settings: Settings, positions: dict[int, int]) -> None:
    path = checkpoint_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    data = {"topic": settings.topics.changed_items, "positions": {str(p): o for p, o in positions.items()}, "at": time.time()}
    tmp.write_bytes(orjson.dumps(data))
    os.replace(tmp, path)


def default_encoder_factory(settings: Settings) -> EncoderFactory:
    """Versions through the adapter registry, encoders through the ONNX export cache."""

    def make(version: str) -> TextEncoder:
        from models.onnx_encoder import encoder_for

        adapter_dir = None
        if version != BASE_VERSION:
            from models.registry import AdapterRegistry

            adapter_dir = AdapterRegistry(Path(settings.state_dir) / "adapters").load(version)[1]
        return encoder_for(settings, version, adapter_dir, settings.encoder_precision, threads=settings.indexer_threads)

    return make


def initial_version(settings: Settings) -> str:
    """The registry's latest adapter version, or the base model when none is published."""
    try:
        from models.registry import AdapterRegistry
    except ImportError:
        return BASE_VERSION
    return AdapterRegistry(Path(settings.state_dir) / "adapters").latest() or BASE_VERSION


class IndexerProcess:
    """Run with :meth:`run` until ``stop`` is set; each poll cycle ends with a checkpoint.

    Switching to a new adapter version exports it first (~10 s on 2 cores), during which
    changed items wait; serving re-encodes what it needs meanwhile (serving/vectors.py).
    """

    def __init__(
        self,
        settings: Settings,
        version: str | None = None,
        make_encoder: EncoderFactory | None = None,
        follow_adapters: bool = True,
        log_every_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.make_encoder = make_encoder or default_encoder_factory(settings)
        self.follow_adapters = follow_adapters
        self.log_every_s = log_every_s
        self.encoder = self.make_encoder(version or initial_version(settings))
        self.stats = IndexerStats(version=self.encoder.version)

    def run(self, stop: threading.Event | None = None, max_seconds: float | None = None) -> IndexerStats:
        s = self.settings
        stop = stop or threading.Event()
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        positions = read_checkpoint(s)
        check_checkpoint_epoch(s, positions is not None)
        start = positions or "beginning"
        changes = TopicFollower(s, s.topics.changed_items, start=start, client_id="freshrec-indexer")
        adapters = None
        if self.follow_adapters:
            adapters = TopicFollower(s, s.topics.adapters, start="end", client_id="freshrec-indexer-adapters")
        producer = RecordProducer(s, client_id="freshrec-indexer")
        log.info("indexer: following %s from %s with version %s", s.topics.changed_items, start, self.encoder.version)
        last_log = time.monotonic()
        backoff = Backoff()
        follower: TopicFollower | None = changes
        try:
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                try:
                    if follower is None:
                        # After an error: from the last checkpoint (the last batch the broker
                        # acknowledged), so the failed batch is encoded again and nothing is skipped.
                        follower = TopicFollower(
                            s, s.topics.changed_items, start=read_checkpoint(s) or start, client_id="freshrec-indexer"
                        )
                    if adapters is not None:
                        self._maybe_switch(adapters.poll(0.0))
                    messages = follower.poll(s.indexer_flush_seconds)
                    if messages:
                        self._process(messages, producer)
                        write_checkpoint(s, follower.positions())
                    if (lasted := backoff.succeeded(time.monotonic())) is not None:
                        log.warning("indexer: recovered after %.1f s; resumed from the last checkpoint", lasted)
                except Exception as exc:  # noqa: BLE001 - the broker away, a refused batch: retry, never skip
                    pause = backoff.failed(time.monotonic())
                    log.warning(
                        "indexer: %s: %s (failure %d); re-reading %s from the last checkpoint in %.1f s",
                        type(exc).__name__, exc, backoff.failures, s.topics.changed_items, pause,
                    )
                    if follower is not None:
                        with contextlib.suppress(Exception):
                            follower.close()
                        follower = None
                    stop.wait(pause)
                if time.monotonic() - last_log > self.log_every_s:
                    log.info("indexer: %s", self.stats.line())
                    last_log = time.monotonic()
        finally:
            if follower is not None:
                follower.close()
            if adapters is not None:
                adapters.close()
            producer.close()
        return self.stats

    def _process(self, messages: list[Message], producer: RecordProducer) -> None:
        s = self.settings
        batch = collect_changes(m.value for m in messages)
        for err, raw in batch.invalid:
            producer.dead_letter("indexer", err, raw, s.topics.changed_items)
        failed_before = producer.report.failed
        for chunk in micro_batches(batch, s.indexer_batch_size):  # publish each as soon as it is encoded
            for vec in item_vectors(self.encoder, chunk, batch_size=s.indexer_batch_size):
                producer.send(s.topics.item_vectors, vec.item_id, vec.to_bytes())
                self.stats.published += 1
        report = producer.flush()
        if report.failed > failed_before:
            # No checkpoint: a restart re-reads this batch rather than lose its vectors.
            raise RuntimeError(f"indexer: the broker refused {report.failed - failed_before} records: {report.errors[-3:]}")
        self.stats.batches += 1
        self.stats.encoded += len(batch.upserts)
        self.stats.deleted += len(batch.deletes)
        self.stats.invalid += len(batch.invalid)

    def _maybe_switch(self, messages: list[Message]) -> None:
        """Switch to the newest announced version that loads; a broken one is logged and skipped."""
        announced: list[str] = []
        for m in messages:
            try:
                announced.append(AdapterAnnouncement.model_validate(orjson.loads(m.value)).version)
            except (ValueError, orjson.JSONDecodeError) as exc:
                log.warning("indexer: ignoring an unreadable adapter announcement: %s", exc)
        for version in reversed(announced):  # newest first; older ones only if it fails
            if version == self.encoder.version:
                return
            try:
                encoder = self.make_encoder(version)
            except Exception as exc:  # noqa: BLE001 - any failure keeps the working encoder
                log.error("indexer: cannot use adapter %s, staying on %s: %s", version, self.encoder.version, exc)
                continue
            log.info("indexer: switching from %s to adapter %s", self.encoder.version, version)
            self.encoder = encoder
            self.stats.version = version
            self.stats.switches += 1
            self._prune()
            return

    def _prune(self) -> None:
        from models.encodings import encodings_dir, prune_encodings
        from models.export import prune_exports

        exports = Path(self.settings.state_dir) / "exports"
        removed = prune_exports(exports, self.settings.exports_keep, {self.encoder.version})
        if removed:
            log.info("indexer: pruned old exports %s", ", ".join(removed))
        # The catalog encodings of a version go with its export (a rollback re-makes both).
        kept = {p.name for p in exports.iterdir() if p.is_dir() and not p.name.startswith(".")} if exports.is_dir() else set()
        gone = prune_encodings(encodings_dir(self.settings), kept | {self.encoder.version})
        if gone:
            log.info("indexer: pruned old catalog encodings %s", ", ".join(gone))
