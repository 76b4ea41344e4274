"""Ranking examples' candidates and features, shared by every replay of one ``freshrec eval`` run.

A basket's candidates and features are a pure function of the replay's collaborative
state at the basket's time (the same for every method and seed: the log is replayed
the same way) and of the item vectors they are ranked over (``ann`` and ``sim``). The
``ranker`` of every seed ranks over the base encoder's vectors, and ``full`` does too
until its adapter's gate publishes a version (for some seeds never). So the replays of
one evaluation compute the same features again and again: about 500 s per replay on
the report window, the largest share of a seeded run after the adapter's training.

This cache stores them once, keyed by the vector space's digest (matrix bytes and
similarity scale), the settings that shape features, the shopper and the basket time,
in one SQLite file that the worker processes of ``--jobs N`` share (WAL: readers never
wait for the writer; a busy writer is waited for), in a temporary folder that
``freshrec eval`` removes at the end: about 25 kB per basket and vector space, ~300 MB for
the validation window's 12,000 examples over one space. A hit returns exactly what computing
would (the arrays are stored as raw bytes), so results do not depend on which run
computed an entry first; tests/unit/test_feature_cache.py proves a replay with a warm
cache gives the figures of one without.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np

from freshrec.settings import Settings

from .collab_replay import BasketFeatures, VectorSpace

SEP = "\x1f"  # between item ids: never part of one (ids are printable)

# Settings that do not change a basket's candidates or features (a run's seed, the
# ranker's training and gate): left out of the key so seeds and rankers share entries.
_NOT_FEATURES = ("seed",)


def settings_digest(settings: Settings) -> str:
    """The settings that shape candidates and features, as a short digest (every field but the seed)."""
    fields = {k: v for k, v in settings.model_dump(mode="json").items() if k not in _NOT_FEATURES}
    return hashlib.sha1(repr(sorted(fields.items())).encode()).hexdigest()[:16]


def space_digest(space: VectorSpace) -> str:
    """The item vectors (bytes, shape, dtype, item order) and the similarity scale, as a digest."""
    h = hashlib.sha1()
    m = np.ascontiguousarray(space.matrix)
    h.update(repr((m.shape, m.dtype.str, space.scale)).encode())
    h.update(m.tobytes())
    h.update(SEP.join(space.item_ids).encode())
    return h.hexdigest()[:16]


class FeatureCache:
    """``BasketFeatures`` by (settings, space, shopper, basket time) in a SQLite file shared by processes."""

    def __init__(self, path: Path, settings: Settings) -> None:
        self.path = Path(path)
        self.settings_key = settings_digest(settings)
        self.hits = 0
        self.misses = 0
        self._db = sqlite3.connect(self.path, timeout=120.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS features (key TEXT PRIMARY KEY, items TEXT, sources BLOB, "
            "sources_dtype TEXT, rows BLOB, n_cols INTEGER)"
        )

    def _key(self, space_key: str, user_id: str, ts: float) -> str:
        return f"{self.settings_key}|{space_key}|{user_id}|{ts!r}"

    def get(self, space_key: str, user_id: str, ts: float) -> BasketFeatures | None:
        row = self._db.execute(
            "SELECT items, sources, sources_dtype, rows, n_cols FROM features WHERE key = ?",
            (self._key(space_key, user_id, ts),),
        ).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        items_text, sources, sources_dtype, rows, n_cols = row
        items = items_text.split(SEP) if items_text else []
        x = np.frombuffer(rows, dtype=np.float32).reshape(len(items), n_cols).copy()
        return BasketFeatures(items, np.frombuffer(sources, dtype=np.dtype(sources_dtype)).copy(), x)

    def put(self, space_key: str, user_id: str, ts: float, bf: BasketFeatures) -> None:
        x = np.ascontiguousarray(bf.features, dtype=np.float32)
        if x.dtype != bf.features.dtype:
            raise TypeError(f"feature rows are {bf.features.dtype}, the cache stores float32 exactly")
        if any(SEP in item for item in bf.items):
            raise ValueError("an item id holds the cache's separator \\x1f")
        n_cols = x.shape[1] if x.ndim == 2 else 0
        self._db.execute(
            "INSERT OR IGNORE INTO features VALUES (?, ?, ?, ?, ?, ?)",
            (self._key(space_key, user_id, ts), SEP.join(bf.items), np.ascontiguousarray(bf.sources).tobytes(),
             bf.sources.dtype.str, x.tobytes(), n_cols),
        )

    def close(self) -> None:
        self._db.close()
