"""The active ranker of one serving process, swapped atomically on its own.

A ranker is not tied to the (encoder, index) pair of :mod:`serving.pair`: its features
carry the pair's scaled cosine as one column, and any pair's column has the meaning the
ranker learned (the similarity scale maps every version onto the same spread). So a
ranker swaps alone, by one attribute store: a request reads :attr:`RankerSlot.current`
once, at its start, scores with that object and names its version, so the version in a
response is the model that produced its order, whatever swaps meanwhile.

**Which ranker is active** is the registry's activation record
(``models.ranker_registry.RankerRegistry``: ``active.json``, written by the learner's
publish gate and by the admin API under a file lock). Every replica follows that one
pointer (:meth:`RankerSlot.sync`), so replicas agree and a rollback made through one
replica's admin API reaches the others. The pointer is read when an announcement
arrives on the ``rankers`` topic (:func:`parse_announcement`; the format is in
docs/ranking_stage_contract.md) and every ``ranker_poll_s`` seconds besides, so
serving also follows a registry without Kafka.

**A version is installed only when it verifies** (the registry's checksum and model
checks) **and was trained on the features this process computes**
(``ranking.features.FEATURE_SCHEMA`` and ``FEATURE_NAMES``). A refused version is
logged with the reason, remembered (versions are immutable: it is not re-read every
poll) and the active ranker keeps serving. When nothing verified is active (none
published, or the only one refused), the slot is empty and /recommend serves the blend,
saying why (:attr:`RankerSlot.blocked`).

The version replaced by a swap is kept (:attr:`RankerSlot.previous`), so rolling back
to it re-installs the very same object: its scores are bit-for-bit those served before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.ranker_registry import LoadedRanker, RankerRegistry, RankerRejected
from ranking.features import FEATURE_NAMES, FEATURE_SCHEMA

log = logging.getLogger("freshrec.serving.ranker")

REFUSALS_KEPT = 20


class RankerRefused(Exception):
    """A ranker version serving will not install; ``code`` is ``schema_mismatch`` or ``rejected``."""

    def __init__(self, version: str, code: str, message: str) -> None:
        super().__init__(message)
        self.version = version
        self.code = code


class RankerAnnouncement(BaseModel):
    """One record of the ``rankers`` topic (docs/ranking_stage_contract.md).

    ``version`` and ``schema`` are required; other fields a publisher adds (``parent``,
    ``family``, ``created``, ``metrics``) are ignored here, so the learner can say more
    without breaking serving.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: str
    feature_schema: str = Field(alias="schema")
    parent: str | None = None


def parse_announcement(value: bytes) -> RankerAnnouncement:
    """Decode one ``rankers`` record; ValueError when it is not one."""
    import orjson

    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    try:
        return RankerAnnouncement.model_validate(obj)
    except ValidationError as exc:
        raise ValueError(f"not a ranker announcement: {exc.errors()[0].get('msg')}") from None


def announcement_bytes(version: str, schema: str, parent: str | None = None) -> bytes:
    """The record a publisher sends on ``rankers`` (tests and tools; the learner writes the same)."""
    import orjson

    return orjson.dumps({"version": version, "schema": schema, "parent": parent})


@dataclass(frozen=True)
class Refusal:
    version: str
    code: str
    reason: str
    at: float

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "code": self.code, "reason": self.reason, "at": self.at}


class RankerSlot:
    """The active :class:`~models.ranker_registry.LoadedRanker` (or None: serve the blend).

    Readers use :attr:`current` (one attribute read, no lock). Writers (the sync thread,
    the admin API) serialise on a lock, so a sync and an admin activation never
    interleave their reads of the registry with their installs.
    """

    def __init__(
        self,
        registry: RankerRegistry,
        schema: str = FEATURE_SCHEMA,
        feature_names: Sequence[str] = FEATURE_NAMES,
        on_swap: Callable[[LoadedRanker | None], None] | None = None,
    ) -> None:
        self.registry = registry
        self.schema = schema
        self.feature_names = tuple(feature_names)
        self.on_swap = on_swap
        self._current: LoadedRanker | None = None
        # (install count, ranker): what a request reads; the count names one install, so a
        # reinstall of the same version (a rollback, a replaced model) is a new generation
        self._stamped: tuple[int, LoadedRanker | None] = (0, None)
        self.previous: LoadedRanker | None = None
        self.swaps = 0
        self.refusals: list[Refusal] = []
        self.announcements: list[dict[str, Any]] = []
        # Why the registry's active version is not the one serving (None: it is, or none is active).
        self.blocked: Refusal | None = None
        self.last_error: str | None = None
        self._refused: dict[str, Refusal] = {}
        self._lock = threading.RLock()

    # -- reading -----------------------------------------------------------------------

    @property
    def current(self) -> LoadedRanker | None:
        return self._stamped[1]

    @property
    def stamped(self) -> tuple[int, LoadedRanker | None]:
        """``(generation, ranker)`` read together (serving.result_cache keys on the generation)."""
        return self._stamped

    @property
    def version(self) -> str | None:
        cur = self._current
        return None if cur is None else cur.version

    # -- verifying and installing --------------------------------------------------------

    def prepare(self, version: str) -> LoadedRanker:
        """Load and verify ``version`` for this process; :class:`RankerRefused` says why not.

        The loaded object of the current or previous version is reused (it was verified
        when installed, and reusing it keeps a rollback exact and free).
        """
        for kept in (self._current, self.previous):
            if kept is not None and kept.version == version:
                return kept
        try:
            loaded = self.registry.load(version)
        except RankerRejected as exc:
            # An absent version may yet appear (a registry on a shared file system that lags):
            # only a present one that fails its checks is refused for good.
            raise self._refuse(version, "rejected", str(exc), remember=not exc.problem.startswith("no such version")) from None
        m = loaded.manifest
        if m.feature_schema != self.schema or tuple(m.feature_names) != self.feature_names:
            raise self._refuse(
                version,
                "schema_mismatch",
                f"ranker {version!r} was trained on feature schema {m.feature_schema!r} "
                f"({len(m.feature_names)} columns); serving computes {self.schema!r} ({len(self.feature_names)} columns)",
            )
        return loaded

    def install(self, loaded: LoadedRanker | None, reason: str) -> None:
        """Make ``loaded`` the active ranker (None: serve the blend) with one attribute store."""
        with self._lock:
            old = self._current
            if old is loaded:
                return
            if old is not None:
                self.previous = old
            self._current = loaded
            self.swaps += 1
            self._stamped = (self.swaps, loaded)
            self.blocked = None
        log.info(
            "ranker %s -> %s (%s)", old.version if old else None, loaded.version if loaded else None, reason
        )
        if self.on_swap is not None:
            self.on_swap(loaded)

    def _refuse(self, version: str, code: str, reason: str, remember: bool = True) -> RankerRefused:
        refusal = Refusal(version, code, reason, time.time())
        if remember:
            self._refused[version] = refusal
        self.refusals.append(refusal)
        del self.refusals[:-REFUSALS_KEPT]
        log.error("ranker %s refused (%s), keeping %s: %s", version, code, self.version, reason)
        return RankerRefused(version, code, reason)

    # -- following the registry ----------------------------------------------------------

    def sync(self, reason: str = "registry") -> str | None:
        """Serve what the registry's activation record names, if it verifies; return the serving version.

        A version refused once is not loaded again (versions are immutable); while the
        registry names it, :attr:`blocked` says why it is not serving. An unreadable
        activation record changes nothing.
        """
        with self._lock:
            try:
                active = self.registry.active()
            except RankerRejected as exc:
                self.last_error = str(exc)
                log.warning("ranker activation record unreadable, keeping %s: %s", self.version, exc)
                return self.version
            self.last_error = None
            if active is None:
                if self._current is not None:
                    self.install(None, f"{reason}: no ranker active in the registry")
                self.blocked = None
                return None
            if active == self.version:
                self.blocked = None
                return active
            refused = self._refused.get(active)
            if refused is None:
                try:
                    self.install(self.prepare(active), reason)
                    return active
                except RankerRefused as exc:
                    refused = self._refused.get(active) or Refusal(active, exc.code, str(exc), time.time())
            self.blocked = refused
            return self.version

    def activate(self, version: str) -> LoadedRanker:
        """Verify ``version``, record it active in the registry, install it (admin).

        Refused (:class:`RankerRefused`) before the registry is touched, so a version this
        process cannot serve never becomes every replica's active one.
        """
        with self._lock:
            loaded = self.prepare(version)
            try:
                self.registry.activate(version)
            except RankerRejected as exc:
                raise self._refuse(version, "rejected", str(exc)) from None
            self.install(loaded, "admin")
            return loaded

    def rollback(self) -> LoadedRanker:
        """Re-activate the version before the active one in the registry's record and serve it.

        ``LookupError`` when there is nothing to roll back to; :class:`RankerRefused`
        when that version no longer verifies (nothing changes then).
        """
        with self._lock:
            history = self.registry.history()
            if len(history) < 2:
                raise LookupError("nothing to roll back to: the registry's activation record holds "
                                  f"{len(history)} version(s)")
            loaded = self.prepare(history[-2])
            try:
                self.registry.rollback()
            except RankerRejected as exc:
                raise self._refuse(history[-2], "rejected", str(exc)) from None
            self.install(loaded, "rollback")
            return loaded

    def on_announcement(self, value: bytes) -> RankerAnnouncement | None:
        """Note one ``rankers`` record; the caller then syncs. A record for another feature
        schema is refused at once (without loading the model) and logged."""
        try:
            ann = parse_announcement(value)
        except ValueError as exc:
            log.warning("undecodable ranker announcement: %s", exc)
            return None
        entry: dict[str, Any] = {"version": ann.version, "schema": ann.feature_schema, "at": time.time()}
        if ann.feature_schema != self.schema and ann.version not in self._refused:
            refusal = self._refuse(
                ann.version, "schema_mismatch",
                f"announced ranker {ann.version!r} is for feature schema {ann.feature_schema!r}; serving computes {self.schema!r}",
            )
            entry["refused"] = str(refusal)
        self.announcements.append(entry)
        del self.announcements[:-REFUSALS_KEPT]
        return ann

    def summary(self) -> dict[str, Any]:
        cur = self._current
        return {
            "version": None if cur is None else cur.version,
            "family": None if cur is None else cur.manifest.family,
            "previous": None if self.previous is None else self.previous.version,
            "schema": self.schema,
            "swaps": self.swaps,
            "blocked": None if self.blocked is None else self.blocked.summary(),
            "refusals": [r.summary() for r in self.refusals[-5:]],
            "announcements": self.announcements[-5:],
            "last_error": self.last_error,
        }


class RankerSync:
    """The ``rankers`` thread: sync the slot on each announcement and every ``poll_s`` seconds.

    Announcements come from a :func:`freshrec.consumer.follow_resuming` follower of the
    ``rankers`` topic (``follow`` False: the registry poll alone, as in tests without a
    broker). Neither ever raises into a request: failures are logged and retried.
    """

    def __init__(self, slot: RankerSlot, settings: Any, poll_s: float, follow: bool = True) -> None:
        from freshrec.consumer import AppliedPositions, Backoff

        self.slot = slot
        self.settings = settings
        self.poll_s = poll_s
        self.follow = follow
        self.wake = threading.Event()
        self.errors = 0
        self.backoff = Backoff()
        self.positions = AppliedPositions()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.slot.sync("startup")
        self._spawn(self._poll, "rankers-sync")
        if self.follow:
            self._spawn(self._follow, "rankers")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.wake.set()
        for t in self._threads:
            t.join(timeout)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.wake.wait(self.poll_s)
            self.wake.clear()
            if self._stop.is_set():
                return
            try:
                self.slot.sync("announcement or poll")
            except Exception as exc:  # a sync must never end the thread
                self.errors += 1
                log.exception("ranker sync failed: %s", exc)

    def _follow(self) -> None:
        from freshrec.consumer import Backoff, Message, TopicFollower, follow_resuming

        def on_batch(_follower: TopicFollower, messages: list[Message]) -> None:
            if any(self.slot.on_announcement(m.value) is not None for m in messages):
                self.wake.set()
            self.positions.applied(messages)

        def on_error(exc: Exception, backoff: Backoff, pause_s: float) -> None:
            self.errors += 1
            log.warning("rankers follower: %s: %s (failure %d); resuming in %.1f s",
                        type(exc).__name__, exc, backoff.failures, pause_s)

        follow_resuming(
            self._stop,
            lambda start: TopicFollower(self.settings, self.settings.topics.rankers, start=start,
                                        client_id="freshrec-serving-rankers"),
            "end", on_batch, on_error, poll_s=0.5, backoff=self.backoff, positions=self.positions,
        )
