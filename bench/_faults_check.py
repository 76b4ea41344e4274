"""What a fault run is judged against: a clean reference computed from the topics themselves.

The reference runs the flows' own pure logic (:class:`~streams.user_partition.UserPartition`,
:class:`~streams.catalog_partition.CatalogPartition`) over the messages read back from
the broker, per partition in offset order, with their Kafka timestamps: exactly the
input the live flows had, through exactly their rules, with no crash. Whatever the
flows wrote to Redis must equal it. What the broker itself holds is checked apart,
against the producer's confirmed sends (:func:`broker_loss`), so a lossy broker cannot
make a lossy reference look clean.

Loss and doubling are counted in the unit each component promises:

* users: applied events (``UserState.events``) per user, the reference minus Redis
  (lost) and Redis minus the reference (doubled); any other difference in a state counts
  the user in ``users_differ``; per-partition popularity entries that differ in
  ``popularity_differ``.
* catalog: items missing or different in Redis (lost), items that should not be there (doubled).
* indexer: catalog items with no vector on ``item-vectors`` (lost); repeated vectors are
  allowed by its at-least-once contract and reported as ``repeats``.
* learner: consumed, trainable pairs neither trained nor held (window, pending) (lost);
  pairs trained more than once (doubled).
* serving: catalog items missing from the served index (lost).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from freshrec.consumer import TopicFollower
from freshrec.contracts import CatalogItem, ItemVector, TrainPair
from freshrec.settings import Settings
from stores import catalog_store, user_store
from streams.catalog_partition import CatalogPartition
from streams.user_partition import UserPartition
from ranking.user_state import UserState


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """A message read back from the broker in the shape the flows' partition logic takes."""

    key: bytes | None
    value: bytes | None
    topic: str | None
    offset: int | None
    partition: int | None
    timestamp: tuple[int, int] | None


def read_messages(settings: Settings, topic: str, expected: int, timeout_s: float = 60.0,
                  idle_s: float = 1.0) -> list[SourceRecord]:
    """Every message of ``topic`` from the beginning: at least ``expected`` (or until ``timeout_s``), then
    until nothing new came for ``idle_s``.

    Counted, not judged by end offsets, which the embedded broker under-reports.
    """
    out: list[SourceRecord] = []
    deadline = time.monotonic() + timeout_s
    with TopicFollower(settings, topic, client_id="freshrec-faults-check") as follower:
        last = time.monotonic()
        while time.monotonic() < deadline:
            batch = follower.poll(0.2)
            if batch:
                last = time.monotonic()
                out.extend(SourceRecord(m.key, m.value, topic, m.offset, m.partition, (0, m.timestamp_ms))
                           for m in batch)
            elif len(out) >= expected and time.monotonic() - last > idle_s:
                break
    return out


def by_partition(records: Iterable[SourceRecord]) -> dict[int, list[SourceRecord]]:
    parts: dict[int, list[SourceRecord]] = defaultdict(list)
    for r in records:
        parts[r.partition or 0].append(r)
    return {p: sorted(rs, key=lambda r: r.offset or 0) for p, rs in sorted(parts.items())}


def last_offsets(records: Iterable[SourceRecord]) -> dict[str, int]:
    """``<topic>:<partition>`` -> last offset: what a flow's applied offsets must reach."""
    out: dict[str, int] = {}
    for r in records:
        f = f"{r.topic}:{r.partition}"
        out[f] = max(out.get(f, -1), r.offset or 0)
    return out


def broker_loss(sent_ids: Iterable[str], records: Iterable[SourceRecord], id_field: str) -> dict[str, int]:
    """Confirmed sends missing from the topic, and records stored more than once (producer retries)."""
    seen: Counter[str] = Counter()
    for r in records:
        try:
            seen[str(orjson.loads(r.value or b"null")[id_field])] += 1
        except (orjson.JSONDecodeError, TypeError, KeyError):
            continue
    sent = set(sent_ids)
    twice = sum(n - 1 for i, n in seen.items() if n > 1 and i in sent)
    return {"missing": len(sent - set(seen)), "stored_twice": twice}


# -- users -------------------------------------------------------------------------------


@dataclass
class UsersReference:
    states: dict[str, UserState] = field(default_factory=dict)
    popularity: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # partition field -> item -> entry
    events: int = 0


def users_reference(settings: Settings, records: list[SourceRecord]) -> UsersReference:
    ref = UsersReference()
    for partition, msgs in by_partition(records).items():
        part = UserPartition.from_settings(settings)
        batch = part.apply(msgs)
        ref.events += batch.applied
        ref.states.update(part.users())
        ref.popularity[f"{settings.topics.events}:{partition}"] = {
            item: list(entry) for item, entry in part.popularity.entries.items()
        }
    return ref


def _redis_users(client: Any, settings: Settings) -> dict[str, UserState]:
    return user_store.read_user_states(client, settings, user_store.scan_user_ids(client, settings))


def compare_users(client: Any, settings: Settings, ref: UsersReference) -> dict[str, int]:
    got = _redis_users(client, settings)
    lost = doubled = differ = 0
    for user in ref.states.keys() | got.keys():
        want_n = ref.states[user].events if user in ref.states else 0
        got_n = got[user].events if user in got else 0
        lost += max(want_n - got_n, 0)
        doubled += max(got_n - want_n, 0)
        differ += ref.states.get(user) != got.get(user)
    pop_differ = 0
    for pfield, want in ref.popularity.items():
        topic, _, part = pfield.rpartition(":")
        raw = client.hgetall(user_store.partition_key(settings, topic, int(part), user_store.POPULARITY))
        have = {k.decode(): orjson.loads(v) for k, v in raw.items()}
        pop_differ += sum(1 for i in want.keys() | have.keys() if want.get(i) != have.get(i))
    return {"lost": lost, "doubled": doubled, "users_differ": differ, "popularity_differ": pop_differ,
            "users": len(ref.states), "events": ref.events}


# -- catalog -----------------------------------------------------------------------------


def catalog_reference(records: list[SourceRecord]) -> dict[str, CatalogItem]:
    items: dict[str, CatalogItem] = {}
    for msgs in by_partition(records).values():
        batch = CatalogPartition().apply(msgs)
        for item_id, raw in batch.upserts.items():
            items[item_id] = CatalogItem.model_validate_json(raw)
    return items


def compare_catalog(client: Any, settings: Settings, ref: dict[str, CatalogItem]) -> dict[str, int]:
    got = catalog_store.all_items(client, settings)
    lost = sum(1 for i, item in ref.items() if got.get(i) != item)
    return {"lost": lost, "doubled": len(got.keys() - ref.keys()), "items": len(ref)}


# -- indexer, serving, learner -----------------------------------------------------------


def compare_vectors(settings: Settings, ref: dict[str, CatalogItem], changed: int) -> dict[str, int]:
    """Vectors on item-vectors against the catalog; ``changed`` = records on changed-items (at least that many)."""
    records = read_messages(settings, settings.topics.item_vectors, changed, timeout_s=30)
    ids = [ItemVector.from_bytes(r.value or b"").item_id for r in records]
    return {"lost": len(ref.keys() - set(ids)), "doubled": 0, "repeats": len(ids) - len(set(ids)), "vectors": len(ids)}


def compare_learner(state_dir: Path, pairs: list[SourceRecord], catalog: dict[str, CatalogItem]) -> dict[str, int]:
    """Pairs the stopped learner consumed (below its checkpointed offsets) against what it trained or holds."""
    from learner.checkpoint import CheckpointStore

    store = CheckpointStore(state_dir / "learner")
    latest = store.latest()
    if latest is None:
        return {"lost": 0, "doubled": 0, "consumed": 0, "trained": 0, "note": 1}
    state = store.read_state(latest)
    trained = store.trained_ids()
    held = {p.pair_id for p in state.window} | {p.pair_id for p in state.pending}
    consumed: set[str] = set()
    for r in pairs:
        if (r.offset or 0) >= state.offsets.get(r.partition or 0, 0):
            continue
        try:
            pair = TrainPair.model_validate_json(r.value or b"")
        except ValueError:
            continue
        if pair.context_text.strip() and (pair.target_text or pair.target_item in catalog):
            consumed.add(pair.pair_id)
    return {
        "lost": len(consumed - set(trained) - held),
        "doubled": len(trained) - len(set(trained)),
        "consumed": len(consumed),
        "trained": len(set(trained)),
        "unconsumed": sum(1 for r in pairs if (r.offset or 0) >= state.offsets.get(r.partition or 0, 0)),
        "skipped_by_learner": state.skipped,  # its own count: no context, unknown target, invalid
    }


# -- progress of the running system -------------------------------------------------------


def flow_offsets(client: Any, settings: Settings, flow: str) -> dict[str, int]:
    """``<topic>:<partition>`` -> the last offset whose effects the flow has in Redis."""
    return (user_store if flow == "users" else catalog_store).read_applied_offsets(client, settings)


def reached(applied: dict[str, int], last: dict[str, int]) -> bool:
    return all(applied.get(f, -1) >= o for f, o in last.items())


def indexer_positions(settings: Settings) -> dict[int, int]:
    """The indexer's checkpointed next offsets per changed-items partition ({} before its first)."""
    from indexer.process import read_checkpoint

    return read_checkpoint(settings) or {}


def learner_state(settings: Settings) -> Any:
    """The learner's latest committed state (``LearnerState``), or None before its first checkpoint."""
    from learner.checkpoint import CheckpointStore

    store = CheckpointStore(settings.state_dir / "learner")
    try:
        latest = store.latest()
        return store.read_state(latest) if latest else None
    except (OSError, ValueError):
        return None  # a checkpoint being replaced right now


def learner_positions(settings: Settings) -> dict[int, int]:
    state = learner_state(settings)
    return dict(state.offsets) if state is not None else {}


def served_items(settings: Settings) -> int:
    """Items in serving's active index (0 while it does not answer /readyz)."""
    try:
        r = httpx.get(f"http://127.0.0.1:{settings.api_port}/readyz", timeout=5)
        return int(r.json().get("items", 0)) if r.status_code == 200 else 0
    except (httpx.HTTPError, ValueError):
        return 0
