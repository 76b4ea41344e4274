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
already reflects everything published before (the catalog flow writes Redis first).
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


class VectorApplier:
    """The routing above, without Kafka (the follower thread feeds it; tests call it directly)."""

    def __init__(
        self,
        active: ActivePair,
        builder: PairBuilder | None,
        read_items: Callable[[Sequence[str]], dict[str, Any]],
        on_items: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.active = active
        self.builder = builder
        self.read_items = read_items
        self.on_items = on_items
        self.applied = 0
        self.reencoded = 0
        self.stashed = 0
        self.unchanged = 0

    def apply(self, records: Sequence[ItemVector]) -> None:
        foreign: list[str] = []
        with self.active.write_lock:
            pair = self.active.pair
            shadow = self.builder.shadow if self.builder is not None else None
            mine = [r for r in records if pair is not None and r.adapter_version == pair.adapter_version]
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

    Kafka being down never reaches a request: the thread retries with a pause, and
    :attr:`ready` is set once it is positioned at the end of the topic (the startup
    build waits for it briefly, so no change between the two is missed).
    """

    def __init__(self, settings: Any, applier: VectorApplier, topic: str | None = None) -> None:
        self.settings = settings
        self.applier = applier
        self.topic = topic or settings.topics.item_vectors
        self.ready = threading.Event()
        self.lag: int | None = None
        self.received = 0
        self.errors = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="item-vectors", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        from freshrec.consumer import Message, TopicFollower, follow_until

        last_lag = 0.0

        def open_follower() -> TopicFollower:
            follower = TopicFollower(self.settings, self.topic, start="end", client_id="freshrec-serving")
            follower.positions()  # resolve the seek now, so "ready" means positioned
            self.ready.set()
            return follower

        def on_poll(follower: TopicFollower, batch: list[Message]) -> None:
            nonlocal last_lag
            if batch:
                self.received += len(batch)
                records = []
                for m in batch:
                    try:
                        records.append(ItemVector.from_bytes(m.value))
                    except Exception as exc:  # a bad record is skipped, never fatal
                        self.errors += 1
                        self.last_error = f"undecodable item vector at {m.partition}:{m.offset}: {exc}"
                if records:
                    self._apply(records)
            now = time.monotonic()
            if now - last_lag > LAG_EVERY_S:
                # Tansu under-reports end offsets, so this lag is a lower bound.
                self.lag = follower.lag()
                last_lag = now

        def on_error(exc: Exception) -> None:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("item-vectors follower: %s; retrying in 1 s", self.last_error)

        follow_until(self._stop, open_follower, on_poll, on_error, poll_s=0.2)

    def _apply(self, records: list[ItemVector]) -> None:
        """Apply one batch; a Redis hiccup loses titles or a foreign re-encode, never the position."""
        try:
            self.applier.apply(records)
        except Exception as exc:
            self.errors += 1
            self.last_error = f"applying item vectors: {type(exc).__name__}: {exc}"
            log.warning("%s", self.last_error)
