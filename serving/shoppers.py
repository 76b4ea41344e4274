"""Nearest shoppers: a live FAISS inner-product index of shopper vectors, kept current from Kafka.

The collaborative flow writes each shopper's hashed basket vector
(``ranking.collab.shopper_vector``, unit length) to Redis (``shopvec``) and sends it on
``settings.topics.shopper_vectors`` (key user_id, value the float32 bytes). Serving
holds them in a :class:`models.live_index.LiveIndex` (inner product of unit vectors:
the cosine the flow's exact ``ShopperIndex`` ranks by) and answers a request's
neighbour search in memory.

Start-up order, so nothing is missed: the follower is first positioned at the topic's
end, then the index is loaded from Redis (which holds everything sent before), then the
follower applies what arrived since. An upsert applied twice leaves the same index, so
the overlap is harmless. After that the follower resumes from its last applied offsets
on any failure (:func:`freshrec.consumer.follow_resuming`), like the item-vectors one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from models.live_index import LiveIndex
from ranking.collab import rescored_neighbours

from .collab_data import decode_vector

log = logging.getLogger("freshrec.serving.shoppers")

VERSION = "shoppers"


class ShopperNeighbours:
    """The index and the follower thread that feeds it (``follow`` False: load from Redis only)."""

    def __init__(
        self,
        settings: Any,
        dim: int,
        load: Callable[[], Mapping[str, np.ndarray]],
        follow: bool = True,
    ) -> None:
        from freshrec.consumer import AppliedPositions, Backoff

        self.settings = settings
        self.dim = dim
        self._load = load
        self.follow = follow
        self.index = LiveIndex(dim, VERSION, kind="flat", use_gpu=False)
        self.loaded = threading.Event()
        self.received = 0
        self.invalid = 0
        self.errors = 0
        self.last_error: str | None = None
        self.backoff = Backoff()
        self.positions = AppliedPositions()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self.index)

    def search(self, vector: np.ndarray, k: int, exclude: str | None = None) -> list[tuple[str, float]]:
        """The ``k`` nearest shoppers with a positive similarity, best first (``exclude``: the asker)."""
        if k <= 0 or len(self.index) == 0:
            return []
        hits = self.index.search(vector, k, exclude=frozenset((exclude,)) if exclude else frozenset())[0]
        users = [u for u, s in hits if s > 0.0]
        stored = self.index.reconstruct_many(users)
        users = [u for u in users if u in stored]  # removed since the search
        if not users:
            return []
        # the similarities the stream's exact index reports (FAISS's float32 sums differ in the last bit)
        return rescored_neighbours(vector, users, np.stack([stored[u] for u in users]), k)

    def apply(self, updates: Sequence[tuple[str, bytes | None]]) -> None:
        """Upsert (or, for an empty value, delete) shoppers; unusable vectors are counted and dropped."""
        ups: dict[str, np.ndarray] = {}
        gone: list[str] = []
        for user, raw in updates:
            if not raw:
                gone.append(user)
                ups.pop(user, None)
                continue
            vec = decode_vector(raw, self.dim)
            if vec is None:
                self.invalid += 1
                continue
            ups[user] = vec
        if ups:
            self.index.upsert(list(ups), np.stack(list(ups.values())))
        if gone:
            self.index.delete(gone)

    def load_from_store(self) -> int:
        vectors = self._load()
        if vectors:
            self.index.upsert(list(vectors), np.stack(list(vectors.values())).astype(np.float32))
        self.loaded.set()
        log.info("shopper index loaded: %d shoppers", len(vectors))
        return len(vectors)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shopper-vectors", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        if not self.follow:
            self._load_until_done()
            return
        from freshrec.consumer import Backoff, Message, Start, TopicFollower, follow_resuming

        def open_at(start: Start) -> TopicFollower:
            follower = TopicFollower(self.settings, self.settings.topics.shopper_vectors, start=start,
                                     client_id="freshrec-serving-shoppers")
            follower.positions()  # positioned before the Redis load: nothing in between is missed
            if not self.loaded.is_set():
                self.load_from_store()
            return follower

        def on_batch(_follower: TopicFollower, batch: list[Message]) -> None:
            if batch:
                self.apply([(m.key.decode() if m.key else "", m.value) for m in batch if m.key])
                self.received += len(batch)

        def on_error(exc: Exception, backoff: Backoff, pause_s: float) -> None:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("shopper-vectors follower: %s (failure %d); resuming in %.1f s",
                        self.last_error, backoff.failures, pause_s)

        follow_resuming(self._stop, open_at, "end", on_batch, on_error, poll_s=0.2,
                        backoff=self.backoff, positions=self.positions)

    def _load_until_done(self) -> None:
        while not self._stop.is_set():
            try:
                self.load_from_store()
                return
            except Exception as exc:
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._stop.wait(min(1.0 + self.errors, 10.0))

    def summary(self) -> dict[str, Any]:
        return {"shoppers": len(self.index), "loaded": self.loaded.is_set(), "received": self.received,
                "invalid": self.invalid, "errors": self.errors, "last_error": self.last_error,
                "outage_s": self.backoff.outage_s(time.monotonic())}
