"""Keeping the active index current from the ``item-vectors`` topic, on a background thread.

Each record is routed by its adapter version (invariant 1: a vector only ever enters an
index of its own version):

* **the active version**: applied to the active index (upsert, or delete for None).
* **the version being built**: kept in the build's :class:`~serving.swap.Shadow` and
  applied to the new index before it goes live.
* **any other version**: the indexer follows adapters on its own schedule, so serving
  may be on a version the indexer no longer publishes (an admin activated an older one,
  or the indexer has not switched yet). Such a record still says "this item changed",
  so serving re-reads the item from the catalog and, if its text differs from what the
  active index holds (or the item is new, or gone), re-encodes it with the active
  encoder. A re-publication of the whole catalog under another version therefore costs
  one Redis read, not thousands of encodings.

While a build runs, every item changed through the first and third routes is also marked
in the shadow, and the build re-encodes it with the new encoder before swapping.

The topic is followed from its end: the index was built from the catalog in Redis, which
already reflects everything published before (the catalog flow writes Redis first). After
that, nothing is skipped: a broker outage, a request timing out or a failed apply (Redis
down for the re-read) makes the follower reopen at the last *applied* offset of each
partition and apply the failed batch again, after a capped backoff
(:func:`freshrec.consumer.follow_resuming`). Applying a batch twice is harmless: an upsert
of the vector an item already has, a delete of an item already gone, a stash or mark
repeated, all leave the same state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from freshrec.contracts import ItemVector

from .pair import ActivePair, ServingPair
from .swap import PairBuilder

log = logging.getLogger("freshrec.serving.vectors")

LAG_EVERY_S = 5.0
# The lag probe is the one call that waits on the broker; bounded, so an outage stalls the
# thread seconds, not the client's 30 s request timeout, before it starts resuming.
LAG_TIMEOUT_S = 3.0


class VectorApplier:
    """The routing above, without Kafka (the follower thread feeds it; tests call it directly)."""

    def __init__(
        self,
        active: ActivePair,
        builder: PairBuilder | None,
        read_items: Callable[[Sequence[str]], dict[str, Any]],
        on_items: Callable[[dict[str, Any]], None] | None = None,
        on_changed: Callable[[], None] | None = None,
    ) -> None:
        self.active = active
        self.builder = builder
        self.read_items = read_items
        self.on_items = on_items
        # called after each batch has changed the active index (or may have: a failed one
        # too), once the change is complete: cached answers made before it are then unreachable
        self.on_changed = on_changed
        self.applied = 0
        self.reencoded = 0
        self.stashed = 0
        self.unchanged = 0
        self.invalid = 0

    def apply(self, records: Sequence[ItemVector]) -> None:
        """Route and apply ``records``; idempotent, so a failed batch can simply be applied again.

        A vector the active index cannot take (wrong dimension, NaN) is dropped and counted
        here: it would fail every retry and wedge the follower behind it.
        """
        try:
            self._apply(records)
        finally:
            if records and self.on_changed is not None:
                self.on_changed()

    def _apply(self, records: Sequence[ItemVector]) -> None:
        foreign: list[str] = []
        with self.active.write_lock:
            pair = self.active.pair
            shadow = self.builder.shadow if self.builder is not None else None
            mine = [r for r in records if pair is not None and r.adapter_version == pair.adapter_version]
            if mine and pair is not None:
                bad = [r for r in mine if not _fits(r, pair.index.dim)]
                if bad:
                    self.invalid += len(bad)
                    log.warning(
                        "dropped %d item vectors the %s index cannot take (e.g. %r: expected %d finite floats)",
                        len(bad), pair.adapter_version, bad[0].item_id, pair.index.dim,
                    )
                    dropped = {id(r) for r in bad}
                    records = [r for r in records if id(r) not in dropped]
                    mine = [r for r in mine if id(r) not in dropped]
            if mine and pair is not None:
                pair.index.apply(mine)
                self.applied += len(mine)
            for r in records:
                if pair is not None and r.adapter_version == pair.adapter_version:
                    if shadow is not None:
                        shadow.touched.add(r.item_id)
                elif shadow is not None and r.adapter_version == shadow.version:
                    shadow.stash[r.item_id] = r.vector
                    self.stashed += 1
                else:
                    foreign.append(r.item_id)
                    if shadow is not None:
                        shadow.touched.add(r.item_id)
        changed = list(dict.fromkeys(r.item_id for r in mine if r.vector is not None))
        if changed or foreign:
            records_now = self.read_items(list(dict.fromkeys([*changed, *foreign])))
            if self.on_items is not None and records_now:
                self.on_items(records_now)
            if pair is not None:
                for i in changed:
                    if i in records_now:
                        pair.texts[i] = hash(records_now[i].text())
                if foreign:
                    self._reencode(pair, list(dict.fromkeys(foreign)), records_now)

    def _reencode(self, pair: ServingPair, ids: list[str], records: dict[str, Any]) -> None:
        """Re-encode foreign-version changes with the pair's own encoder (outside the lock:
        if a swap happens meanwhile, the new pair has these ids in its shadow)."""
        gone = [i for i in ids if i not in records and i in pair.index]
        todo = [i for i in ids if i in records and (i not in pair.index or pair.texts.get(i) != hash(records[i].text()))]
        self.unchanged += len(ids) - len(gone) - len(todo)
        if todo:
            vecs = pair.encoder.encode([records[i].text() for i in todo])
            with self.active.write_lock:
                pair.index.upsert(todo, np.asarray(vecs, dtype=np.float32))
                pair.texts.update((i, hash(records[i].text())) for i in todo)
            self.reencoded += len(todo)
        if gone:
            with self.active.write_lock:
                pair.index.delete(gone)
                for i in gone:
                    pair.texts.pop(i, None)


class VectorFollower:
    """The background thread: follow ``item-vectors`` and feed a :class:`VectorApplier`.

    Kafka being down never reaches a request: the thread resumes from the last applied
    offsets after a capped backoff (the outage is logged once it starts and when it ends,
    and :attr:`outage_s` and :attr:`errors` are exported as metrics). :attr:`ready` is set
    once it is positioned at the end of the topic (the startup build waits for it briefly,
    so no change between the two is missed).
    """

    def __init__(self, settings: Any, applier: VectorApplier, topic: str | None = None) -> None:
        from freshrec.consumer import AppliedPositions, Backoff

        self.settings = settings
        self.applier = applier
        self.topic = topic or settings.topics.item_vectors
        self.ready = threading.Event()
        self.lag: int | None = None
        self.received = 0
        self.errors = 0
        self.undecodable = 0
        self.last_error: str | None = None
        self.backoff = Backoff()
        self.positions = AppliedPositions()  # what a reopen resumes from (tests read it)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def outage_s(self) -> float:
        """Seconds since the follower last applied a poll, while it is failing; 0 when healthy."""
        return self.backoff.outage_s(time.monotonic())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="item-vectors", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        from freshrec.consumer import Backoff, Message, Start, TopicFollower, follow_resuming

        last_lag = 0.0

        def open_at(start: Start) -> TopicFollower:
            follower = TopicFollower(self.settings, self.topic, start=start, client_id="freshrec-serving")
            follower.positions()  # resolve the seek now, so "ready" means positioned
            self.ready.set()
            return follower

        def on_batch(follower: TopicFollower, batch: list[Message]) -> None:
            nonlocal last_lag
            now = time.monotonic()
            if now - last_lag > LAG_EVERY_S:
                # Before applying: when the broker is away this raises, and the batch is
                # re-read after the reopen rather than applied twice. Tansu under-reports
                # end offsets, so this lag is a lower bound.
                last_lag = now
                self.lag = follower.lag(LAG_TIMEOUT_S)
            if batch:
                records = self._decode(batch)
                if records:
                    self.applier.apply(records)  # an exception here retries the whole batch
                self.received += len(batch)

        def on_error(exc: Exception, backoff: Backoff, pause_s: float) -> None:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning(
                "item-vectors follower: %s (failure %d, %.0f s without applying); resuming from the "
                "last applied offsets %s in %.1f s",
                self.last_error, backoff.failures, backoff.outage_s(time.monotonic()), self.positions.next, pause_s,
            )

        def on_recovered(outage_s: float, failures: int) -> None:
            log.warning("item-vectors follower: recovered after %.1f s and %d failures; nothing skipped", outage_s, failures)

        follow_resuming(
            self._stop, open_at, "end", on_batch, on_error, on_recovered,
            poll_s=0.2, backoff=self.backoff, positions=self.positions,
        )

    def _decode(self, batch: Sequence[Any]) -> list[ItemVector]:
        """The batch's item vectors; an undecodable record is counted and skipped (retrying
        could never make it readable), never fatal."""
        records = []
        for m in batch:
            try:
                records.append(ItemVector.from_bytes(m.value))
            except Exception as exc:
                self.undecodable += 1
                self.errors += 1
                self.last_error = f"undecodable item vector at {m.partition}:{m.offset}: {exc}"
        return records


def _fits(record: ItemVector, dim: int) -> bool:
    """Whether an index of ``dim`` can take ``record`` (a delete always can)."""
    v = record.vector
    return v is None or (v.shape == (dim,) and bool(np.isfinite(v).all()))
