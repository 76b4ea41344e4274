"""Finished /recommend answers, kept per shopper and invalidated when anything they were made of moves.

Why: a personal answer costs a Redis round trip for the collaborative rows, the
features, the ranker and the reasons, while the same shopper asks the same question
again (a page reload, a client retry, a page with two widgets) with nothing changed in
between. A hit saves everything after the read of the shopper's own state.

**Exact for the shopper's own state.** The shopper's state is still read from Redis on
every request; the key holds a digest of it (:func:`state_digest`: of the state *as read
for this request*, re-serialised, so every field the answer reads is in it). A purchase
applied to Redis changes the digest, so the very next /recommend is computed afresh: no
answer made before a state change is served after it. (Re-serialising and hashing a full
state, 100 interactions, measured ~30 us here: a quarter of decoding it.)

**Exact for the rest of what serving holds in memory.** The key (:class:`AnswerKey`)
also names the pair (``index_version``: the encoder and index of one build), the item
vectors and titles applied to that index in place since (``catalog``), the ranker
installed (``ranker``: a generation bumped on every install, a rollback and a failing
replacement of the same version included) and why none is (``blocked``), the popularity
ranking (``popularity``: a new one only when the users flow's applied offsets moved) and
the ranker's shop-wide view (``shop``: rebuilt when the collaborative flow's marker or
popularity moved). Each is a generation read before the thing it counts and bumped only
once a change is complete, so a key never names a generation newer than its inputs;
popularity, shop and ranker are read as one ``(generation, object)`` tuple.

**Not exact: the per-request collaborative rows.** The co-purchase rows of the
shopper's items, the nearest shoppers' states and the nearest-shopper index move with
events anywhere in the shop; a hit does not re-read them. The flows that write them move
the popularity and shop generations, which serving notices within
``popularity_refresh_s``, so a hit reflects them as of at most about that interval ago
(the shopper-vector index refreshes on its own thread, a little later). Besides, no
entry is served older than ``result_cache_ttl_s``. ``freshrec_result_cache_staleness_seconds``
in /metrics is the age of each answer served from the cache.

Not cached (the route decides): answers while Redis is unavailable, for a cold shopper
(popularity alone: cheap), flagged ``degraded``, and those whose ranker path failed for
a reason that may pass (``redis``, ``ranker_error``).

Example::

    >>> cache = ResultCache(max_entries=2, ttl_s=2.0, clock=lambda: 10.0)
    >>> cache.put("a", 1)
    >>> cache.get("a").value, cache.get("b")
    (1, None)
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

V = TypeVar("V")


class AnswerKey(NamedTuple):
    """Everything a /recommend answer is made of, as generations (see the module doc)."""

    user_id: str
    k: int
    state: bytes  # state_digest of the shopper's state read for this request
    index_version: str
    catalog: int
    ranker: int
    blocked: str | None
    popularity: int
    shop: int


def state_digest(state_bytes: bytes) -> bytes:
    """A 128-bit digest of a shopper's serialised state (a collision is ~2**-64 at 2**32 states)."""
    return hashlib.blake2b(state_bytes, digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A /recommend body less its per-request timing (``server_ms`` is measured anew on a hit).

    ``items`` are the response's item dicts, shared by every hit: never changed after
    they are stored. ``ranker_version`` and ``fallback`` feed the answer counters on a
    hit as on a miss, so ``freshrec_recommend_ranked`` still counts answers.
    """

    items: list[dict[str, Any]]
    extra: dict[str, Any]
    ranker_version: str | None
    fallback: str | None


@dataclass(frozen=True, slots=True)
class Hit(Generic[V]):
    value: V
    age_s: float  # how long ago it was stored: the staleness served


class ResultCache(Generic[V]):
    """A thread-safe LRU of at most ``max_entries`` values, each served for at most ``ttl_s``.

    ``max_entries`` 0 turns it off (:attr:`enabled` false: the route then computes no key).
    ``clock`` is monotonic seconds (tests pass their own).
    """

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0 (0 turns the cache off), got {max_entries}")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._data: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.expired = 0  # misses that found an entry older than ttl_s
        self.evicted = 0  # entries dropped to stay within max_entries

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Hashable) -> Hit[V] | None:
        """The value stored under ``key`` and its age, or None (absent or expired: counted as a miss)."""
        now = self._clock()
        with self._lock:
            entry = self._data.get(key)
            if entry is not None:
                age = now - entry[0]
                if age <= self.ttl_s:
                    self._data.move_to_end(key)
                    self.hits += 1
                    return Hit(entry[1], max(age, 0.0))
                del self._data[key]
                self.expired += 1
            self.misses += 1
            return None

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value`` as of now, dropping the least recently used entries beyond the bound."""
        if not self.enabled:
            return
        now = self._clock()
        with self._lock:
            self._data[key] = (now, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
                self.evicted += 1

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def stats(self) -> dict[str, Any]:
        """Counters for /admin/status; ``hit_rate`` is None before the first look-up."""
        looked = self.hits + self.misses
        return {
            "enabled": self.enabled,
            "entries": len(self._data),
            "max_entries": self.max_entries,
            "ttl_s": self.ttl_s,
            "hits": self.hits,
            "misses": self.misses,
            "expired": self.expired,
            "evicted": self.evicted,
            "hit_rate": round(self.hits / looked, 4) if looked else None,
        }
