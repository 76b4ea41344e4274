"""A flow's topic epoch, checked before Bytewax resumes from anything it stored.

Both places a flow keeps positions hold offsets of one incarnation of its input topic
(:mod:`freshrec.epochs`): the Bytewax snapshots in ``state_dir/streams/<flow>`` (with
``epoch.json`` beside them) and the applied offsets in Redis (with a ``streams:epoch``
hash beside each applied-offsets hash: one per events partition, one for the catalog).
If the topic was recreated (the embedded broker restarted, which empties it), resuming
from either would skip every new event without a word; :func:`check_flow_epoch` stops
the flow first with :class:`~freshrec.epochs.EpochMismatch`, which names the fix. A
Redis or a recovery directory without an epoch takes the current one, unless that Redis
already holds offsets of the topic (written before epochs were recorded: nothing says
which incarnation they belong to, so they are refused like another epoch).

The guarded Redis writes check the epoch again on every batch
(:mod:`stores.redis_client`), which also covers flows started by ``python -m
bytewax.run`` (no recovery directory known here) and a Redis swapped while running.
"""

from __future__ import annotations

import sys
from pathlib import Path

from freshrec.epochs import EpochMismatch, check_epoch_file, topic_ids
from freshrec.settings import Settings

from freshrec.reset import safe_url
from stores import catalog_store, user_store
from stores.redis_client import UNKNOWN_EPOCH, connect
from stores.redis_retry import with_retry

EPOCH_FILE = "epoch.json"


class Unresolved:
    """Marks "ask the broker" where ``None`` already means "the broker has no topic id"."""


UNRESOLVED = Unresolved()


def flow_topic(settings: Settings, flow: str) -> str:
    """The input topic of ``flow`` (``users`` or ``catalog``)."""
    return settings.topics.events if flow == "users" else settings.topics.catalog


def topic_epoch(settings: Settings, topic: str) -> str | None:
    """The topic's current id; None (said on stderr) when the broker gives none."""
    epoch = topic_ids(settings, [topic]).get(topic)
    if epoch is None:
        print(
            f"streams: the broker gives no id for topic {topic!r} (missing, or a broker without topic ids): "
            "a recreated topic cannot be told apart from the old one",
            file=sys.stderr,
            flush=True,
        )
    return epoch


def check_redis_epoch(
    settings: Settings, owner: str, topic: str, epoch: str | None, slots: list[tuple[str, str]]
) -> None:
    """Record ``epoch`` for ``topic`` in each ``(epoch hash, applied-offsets hash)`` pair of
    ``slots`` that has none; raise :class:`EpochMismatch` if one holds another, or its
    applied hash holds offsets of ``topic`` without any epoch (written before epochs
    existed: unverifiable)."""
    if epoch is None:
        return
    client = connect(settings)
    what = f"{owner}: checking the topic epoch"
    for key, applied in slots:

        def read(key: str = key, applied: str = applied) -> tuple[bytes | None, list[bytes]]:
            return client.hget(key, topic), client.hkeys(applied)  # type: ignore[return-value]

        def record(key: str = key) -> None:
            client.hsetnx(key, topic, epoch)

        stored, fields = with_retry(read, what, settings.stream_redis_backoff_max_s)
        where = f"Redis {safe_url(settings.redis_url)}, hash {key}"
        if stored is None:
            if any(f.decode().rsplit(":", 1)[0] == topic for f in fields):
                raise EpochMismatch(owner, topic, UNKNOWN_EPOCH, epoch, where)
            with_retry(record, what, settings.stream_redis_backoff_max_s)
            stored = with_retry(read, what, settings.stream_redis_backoff_max_s)[0]
        if stored is not None and stored.decode() != epoch:
            raise EpochMismatch(owner, topic, stored.decode(), epoch, where)


def check_flow_epoch(settings: Settings, flow: str, recovery: Path | None, epoch: str | None) -> None:
    """Check (or record) ``epoch`` against the flow's recovery directory and Redis (every
    partition's epoch hash for the users flow, the catalog's for the catalog flow)."""
    owner = f"streams.{flow}"
    topic = flow_topic(settings, flow)
    if recovery is not None:
        check_epoch_file(recovery / EPOCH_FILE, owner, topic, epoch)
    slots = user_store.epoch_slots(settings, topic) if flow == "users" else catalog_store.epoch_slots(settings)
    check_redis_epoch(settings, owner, topic, epoch, slots)
