"""``freshrec reset``: forget every stored Kafka position, so consumers start over together.

A stored position (an offset) only means something in the incarnation of the topic it was
read from (:mod:`freshrec.epochs`). When a topic is recreated, every consumer's position
and everything derived from the old log must go *together*: a flow snapshot cleared while
Redis keeps its applied offsets would still refuse every write, and a Redis cleared while
the snapshot survives would be rebuilt from the old log's state. This module is that one
consistent clean slate; ``freshrec up`` runs it too, since the embedded broker always
starts with new, empty topics.

What it removes (see :func:`stored_positions`):

* ``state_dir/streams/*``: the Bytewax flows' recovery snapshots (with their Kafka offsets),
  the collaborative flow's (``streams/collab``) among them;
* ``state_dir/learner``: the learner's checkpoints (offsets + weights), training log and
  epoch, and the ranker loop's checkpoints (``learner/ranker``: offsets, held examples);
* ``state_dir/indexer``: the indexer's offsets and epoch;
* every Redis key under ``settings.redis_prefix`` (user state, catalog, applied offsets,
  topic epochs, and the collaborative flow's keys of :mod:`stores.collab_store`:
  ``cop:*``, ``collab:*``, ``shopvec``), by SCAN + UNLINK in batches: never FLUSHDB, the
  Redis may be shared. On a Redis Cluster (a ``redis+cluster://`` URL) SCAN visits every
  primary in turn and UNLINK is split by slot. This is also how a deployment moves to a new key layout (the
  Redis Cluster hash tags of :mod:`stores.user_store`): reset, then replay.

What it keeps unless ``everything=True``: the adapter and ranker registries
(``state_dir/adapters``, ``state_dir/rankers``: immutable published versions, still valid
for any topic; a ranker is checked against the feature schema when loaded, not against a
topic) and the ONNX exports derived from the adapters (``state_dir/exports``). Logs,
``infra.json`` and the embedded Redis's own data directory are never touched.

Stop the flows, the learner and the indexer first: a consumer still running would write
its old positions back.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .settings import Settings

# Keys per SCAN page and per UNLINK call: large enough to be quick, small enough that a
# shared Redis never blocks on one command (UNLINK frees memory in the background).
SCAN_BATCH = 1000

# What only ``reset --all`` removes: the published versions and what is derived from them.
REGISTRIES = ("adapters", "rankers", "exports")


@dataclass
class ResetReport:
    """What a reset removed (or, from :func:`plan_reset`, would remove)."""

    paths: list[Path] = field(default_factory=list)
    redis_keys: int = 0
    redis_url: str = ""
    redis_prefix: str = ""

    def lines(self) -> list[str]:
        """One line per removed thing, for the user to see exactly what went."""
        out = [f"{p}" for p in self.paths]
        out.append(f"{self.redis_keys:,} Redis keys under {self.redis_prefix!r} at {safe_url(self.redis_url)}")
        return out

    @property
    def empty(self) -> bool:
        return not self.paths and self.redis_keys == 0


class ResetError(RuntimeError):
    """A one-line, actionable reason why nothing could be reset."""


def stored_positions(settings: Settings, everything: bool = False) -> list[Path]:
    """The existing files and folders under ``state_dir`` that hold Kafka positions or
    state derived from a topic's log (plus the registries and exports with ``everything``),
    sorted."""
    state = Path(settings.state_dir)
    found: list[Path] = []
    streams = state / "streams"
    if streams.is_dir():
        found.extend(sorted(streams.iterdir()))
    for name in ("learner", "indexer"):
        if (state / name).exists():
            found.append(state / name)
    if everything:
        found.extend(state / name for name in REGISTRIES if (state / name).exists())
    return found


def safe_url(url: str) -> str:
    """``url`` with any password masked, fit to print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _key_pattern(prefix: str) -> str:
    """A SCAN MATCH pattern for keys starting with ``prefix`` (its glob characters escaped)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"


def _client(settings: Settings):  # type: ignore[no-untyped-def]
    # A cluster client SCANs node by node (every primary) and splits UNLINK by slot.
    from .redis_url import open_client

    return open_client(settings.redis_url, socket_connect_timeout=3, socket_timeout=30)


def count_keys(settings: Settings) -> int:
    """How many Redis keys lie under ``settings.redis_prefix``; raises :class:`ResetError`
    when Redis cannot be reached."""
    import redis

    try:
        client = _client(settings)
        return sum(1 for _ in client.scan_iter(match=_key_pattern(settings.redis_prefix), count=SCAN_BATCH))
    except redis.RedisError as exc:
        raise ResetError(_unreachable(settings, exc)) from None


def delete_keys(settings: Settings) -> int:
    """UNLINK every key under ``settings.redis_prefix`` (and nothing else); return how many.

    Keys are collected page by page and unlinked in batches, so memory stays bounded
    and another deployment's keys in the same Redis are never touched.
    """
    import redis

    removed = 0
    try:
        client = _client(settings)
        batch: list[bytes] = []
        for key in client.scan_iter(match=_key_pattern(settings.redis_prefix), count=SCAN_BATCH):
            batch.append(key)
            if len(batch) >= SCAN_BATCH:
                removed += int(client.unlink(*batch))
                batch = []
        if batch:
            removed += int(client.unlink(*batch))
    except redis.RedisError as exc:
        raise ResetError(_unreachable(settings, exc)) from None
    return removed


def _unreachable(settings: Settings, exc: Exception) -> str:
    return (
        f"cannot reach Redis at {safe_url(settings.redis_url)} ({exc}); start it (`freshrec up`) or set FRESHREC_REDIS_URL. "
        "Nothing was removed"
    )


def plan_reset(settings: Settings, everything: bool = False) -> ResetReport:
    """What :func:`reset` would remove now (it removes nothing)."""
    return ResetReport(stored_positions(settings, everything), count_keys(settings), settings.redis_url,
                       settings.redis_prefix)


def reset(settings: Settings, everything: bool = False) -> ResetReport:
    """Remove every stored position and freshrec's Redis keys; return exactly what went.

    Redis is checked first, so an unreachable Redis (:class:`ResetError`) leaves the
    files in place too: a half reset is the inconsistency this command exists to end.
    """
    count_keys(settings)  # reachability first
    paths = stored_positions(settings, everything)
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    keys = delete_keys(settings)
    return ResetReport(paths, keys, settings.redis_url, settings.redis_prefix)
