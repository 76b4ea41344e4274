"""Hot-swap: build the complete pair of a new adapter version in the background, then swap.

What a swap does, in order (one background thread, one build at a time):

1. **adapter**: verify the version in the registry (checksum, base model); a corrupt
   or unknown one raises ``AdapterRejected`` and the active pair keeps serving.
2. **encoder**: merge the LoRA into the base model and export/quantise it to int8
   ONNX, or load that export if an earlier run made it (``models.onnx_encoder.encoder_for``).
3. **catalog**: read every item record from Redis.
4. **index**: encode every item with the new encoder into a new ``LiveIndex``.
5. **catch-up**: items that changed while 3-4 ran are re-read and re-encoded with the
   new encoder (deletes deleted), in rounds until few are left; the last round runs
   under the write lock of :class:`~serving.pair.ActivePair`, which the item-vector
   follower also holds while it applies changes to the active index, so no change can
   fall between the last round and the swap.
6. **swap**: one reference store publishes the new pair (see :mod:`serving.pair`); the
   old pair is dropped, and freed by reference counting once the requests still
   holding it finish.

Requests never wait on any of this: they read whichever pair is published.

Which changes a build must catch up is recorded in a :class:`Shadow` that the follower
fills while the build runs (:mod:`serving.vectors`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.encoder import BASE_VERSION, TextEncoder
from ranking.scoring import IDENTITY_SCALE, SimilarityScale

from .pair import ActivePair, ServingPair

log = logging.getLogger("freshrec.serving.swap")

# Catch-up rounds outside the lock before the final one inside it; each round only
# re-encodes what changed during the previous one, so this converges fast.
CATCH_UP_ROUNDS = 3


class ActivationRefused(Exception):
    """An activation that cannot happen (corrupt or unknown adapter, nothing to roll back to)."""


@dataclass
class BuildTools:
    """The I/O a build needs; :func:`default_tools` wires the real ones, tests pass fakes.

    ``load_adapter(version)`` returns the adapter folder (None for the base model) and
    raises on a corrupt version; ``build_index(encoder, items, version, progress)`` with
    ``progress(done, total)``; ``read_items(ids)`` returns the records that still exist.
    """

    load_adapter: Callable[[str], Path | None]
    make_encoder: Callable[[str, Path | None], TextEncoder]
    catalog: Callable[[], dict[str, Any]]
    read_items: Callable[[Sequence[str]], dict[str, Any]]
    build_index: Callable[[TextEncoder, dict[str, Any], str, Callable[[int, int], None]], Any]
    rejected: tuple[type[BaseException], ...] = ()


def default_tools(settings: Any, redis_client: Any, exporter: Any | None = None) -> BuildTools:
    """The real registry, ONNX encoder, Redis catalog and FAISS index builder.

    A version not yet exported is exported by ``exporter`` (a
    :class:`serving.exporter.ExportWorker`: another process, see there why) when given,
    in this process otherwise. The pair's encoder has ``settings.onnx_threads`` (one
    query at a time is fastest on one thread); the build encodes the catalog with a
    second session over the same file with ``settings.indexer_threads``, dropped when
    the build ends.
    """
    from models.build import build_index
    from models.encodings import encodings_dir
    from models.onnx_encoder import OnnxEncoder, encoder_for
    from models.registry import AdapterRegistry, AdapterRejected
    from stores import catalog_store

    registry = AdapterRegistry(settings.state_dir / "adapters")
    rejected: list[type[BaseException]] = [AdapterRejected]
    try:
        from models.merge import AdapterLoadError

        rejected.append(AdapterLoadError)
    except ImportError:  # pragma: no cover
        pass

    def load_adapter(version: str) -> Path | None:
        if version == BASE_VERSION:
            return None
        return registry.load(version)[1]

    def make_encoder(version: str, path: Path | None) -> TextEncoder:
        from models.onnx_encoder import resolve_precision

        from .exporter import is_exported

        if exporter is not None and not is_exported(settings, version):
            exporter.export(Path(settings.state_dir) / "exports", version, path, resolve_precision(settings.encoder_precision))
        return encoder_for(settings, version, path, precision=settings.encoder_precision)

    def catalog() -> dict[str, Any]:
        # Sorted: the same catalog always encodes in the same batches, so a rebuild of a
        # version (rollback) reproduces its vectors exactly.
        return dict(sorted(catalog_store.all_items(redis_client, settings).items()))

    def read_items(ids: Sequence[str]) -> dict[str, Any]:
        return dict(catalog_store.read_items(redis_client, settings, list(ids)))

    def build(encoder: TextEncoder, items: dict[str, Any], version: str, progress: Callable[[int, int], None]) -> Any:
        batch_encoder: Any = encoder
        model_path = getattr(encoder, "model_path", None)
        if model_path is not None and settings.indexer_threads != getattr(settings, "onnx_threads", 1):
            batch_encoder = OnnxEncoder(
                model_path, version=version, precision=getattr(encoder, "precision", "int8"), threads=settings.indexer_threads
            )
        # Encoded once per version across the indexer and every replica (models.encodings).
        return build_index(batch_encoder, items, version, progress, store=encodings_dir(settings))

    return BuildTools(load_adapter, make_encoder, catalog, read_items, build, tuple(rejected))


SCALE_SAMPLE = 20_000  # items a pair's SimilarityScale is fitted on (the bundled catalogs: all of them)


@dataclass
class Shadow:
    """Changes seen while a version builds: ids to re-encode and that version's own vectors."""

    version: str
    touched: set[str] = field(default_factory=set)
    stash: dict[str, np.ndarray | None] = field(default_factory=dict)

    def take(self) -> tuple[set[str], dict[str, np.ndarray | None]]:
        touched, stash = self.touched, self.stash
        self.touched, self.stash = set(), {}
        return touched, stash


@dataclass
class BuildJob:
    """One requested activation and what became of it (shown by /admin)."""

    version: str
    reason: str  # startup | announcement | admin | rollback
    requested_at: float = field(default_factory=time.time)
    state: str = "queued"  # queued | building | live | failed | superseded
    stage: str = ""
    progress: tuple[int, int] = (0, 0)
    stages: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    finished_at: float | None = None
    index_version: str | None = None
    items: int = 0
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "reason": self.reason,
            "state": self.state,
            "stage": self.stage,
            "progress": {"done": self.progress[0], "total": self.progress[1]},
            "stages_s": {k: round(v, 3) for k, v in self.stages.items()},
            "seconds": round((self.finished_at or time.time()) - self.requested_at, 3),
            "requested_at": self.requested_at,
            "finished_at": self.finished_at,
            "index_version": self.index_version,
            "items": self.items,
            "error": self.error,
        }


class PairBuilder:
    """Builds pairs on one background thread and swaps them into ``active``.

    Example::

        builder = PairBuilder(active, default_tools(settings, redis_client))
        builder.start()
        job = builder.activate("v000003-1a2b3c4d", reason="admin")
        job.done.wait(30)      # job.state == "live", active.pair.adapter_version == the version

    Requests queue: while one build runs, the latest request waits and an earlier
    waiting one is superseded (the newest wish wins; building stale versions would only
    delay it).
    """

    def __init__(
        self,
        active: ActivePair,
        tools: BuildTools,
        on_swap: Callable[[ServingPair, BuildJob], None] | None = None,
        on_items: Callable[[dict[str, Any]], None] | None = None,
        nice: int = 0,
        similarity: Callable[[np.ndarray], SimilarityScale] | None = None,
    ) -> None:
        self.active = active
        # A built index's vectors -> the pair's SimilarityScale (identity when not given).
        self.similarity = similarity
        self.nice = nice  # the build thread's nice value: requests keep the CPU first
        self.tools = tools
        self.on_swap = on_swap
        self.on_items = on_items  # catalog records seen by a build (serving keeps titles)
        self.shadow: Shadow | None = None
        self.history: list[str] = []  # versions made active, oldest first; [-1] is live
        self.current: BuildJob | None = None
        self.last: BuildJob | None = None  # the last finished job (live or failed)
        self.last_swap: BuildJob | None = None
        self._queued: BuildJob | None = None
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._builds = 0

    # -- requests ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pair-builder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def check(self, version: str) -> None:
        """Verify a version now (fast: a checksum), so a caller hears of a corrupt one at once."""
        try:
            self.tools.load_adapter(version)
        except self.tools.rejected as exc:
            raise ActivationRefused(str(exc)) from None

    def activate(self, version: str, reason: str = "admin") -> BuildJob:
        """Queue a build of ``version``; the job's ``done`` event fires when live or failed."""
        job = BuildJob(version, reason)
        with self._cv:
            pair = self.active.pair
            building = self.current
            if (
                pair is not None
                and pair.adapter_version == version
                and reason != "rollback"
                and (building is None or building.version == version)
            ):
                job.state, job.finished_at, job.index_version = "live", time.time(), pair.index_version
                job.done.set()
                return job
            if reason != "rollback":
                # The same version already on its way (an announcement seen twice, an admin
                # call racing auto-activation): one build serves both callers.
                for pending in (self._queued, building):
                    if pending is not None and pending.version == version and pending.state in ("queued", "building"):
                        return pending
            if self._queued is not None:
                self._queued.state = "superseded"
                self._queued.finished_at = time.time()
                self._queued.done.set()
            self._queued = job
            self._cv.notify_all()
        return job

    def rollback(self) -> BuildJob:
        """Queue the version that was live before the current one."""
        with self._cv:
            if len(self.history) < 2:
                raise ActivationRefused("nothing to roll back to: only one version has been live")
            target = self.history[-2]
        return self.activate(target, reason="rollback")

    # -- the build thread ----------------------------------------------------------------

    def _run(self) -> None:
        from .exporter import lower_priority

        lower_priority(self.nice)
        while True:
            with self._cv:
                while self._queued is None and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                job, self._queued = self._queued, None
                self.current = job
            try:
                self._build(job)
            except BaseException as exc:  # a failed build never takes serving down
                job.state = "failed"
                job.error = str(exc) if isinstance(exc, self.tools.rejected) else f"{type(exc).__name__}: {exc}"
                log.error("building adapter %s failed: %s", job.version, job.error)
            finally:
                with self.active.write_lock:
                    self.shadow = None
                job.finished_at = time.time()
                with self._cv:
                    self.current = None
                    self.last = job
                job.done.set()
                # No gc.collect() here: a pair holds no reference cycles, so reference
                # counting frees the old encoder and index the moment the last request
                # holding them finishes, and a full collection would stall every request
                # thread on the GIL for as long as it walks the heap.

    def _similarity_scale(self, index: Any) -> SimilarityScale:
        """The new pair's scale, fitted on (a fixed sample of at most SCALE_SAMPLE of) its vectors.

        A sample, so a catalog of millions is not reconstructed whole; a fixed seed over
        the sorted ids, so a rebuild of one version (a rollback) gets the same scale.
        """
        if self.similarity is None:
            return IDENTITY_SCALE
        ids = sorted(index.item_ids())
        if len(ids) > SCALE_SAMPLE:
            pick = np.random.default_rng(0).choice(len(ids), SCALE_SAMPLE, replace=False)
            ids = [ids[k] for k in np.sort(pick)]
        vectors = index.reconstruct_many(ids)
        if not vectors:
            return IDENTITY_SCALE
        return self.similarity(np.stack(list(vectors.values())))

    def _stage(self, job: BuildJob, name: str, t0: float) -> float:
        now = time.perf_counter()
        job.stages[name] = now - t0
        return now

    def _build(self, job: BuildJob) -> None:
        job.state = "building"
        t = t_start = time.perf_counter()
        job.stage = "adapter"
        path = self.tools.load_adapter(job.version)
        t = self._stage(job, "adapter", t)
        job.stage = "encoder"
        encoder = self.tools.make_encoder(job.version, path)
        t = self._stage(job, "encoder", t)
        # Start recording changes before reading the catalog: a change after this point
        # is either in the catalog read or in the shadow (or both, harmlessly).
        with self.active.write_lock:
            self.shadow = Shadow(job.version)
        job.stage = "catalog"
        items = self.tools.catalog()
        if self.on_items is not None:
            self.on_items(items)
        t = self._stage(job, "catalog", t)
        job.stage = "index"
        job.progress = (0, len(items))

        def progress(done: int, total: int) -> None:
            job.progress = (done, total)

        index = self.tools.build_index(encoder, items, job.version, progress)
        scale = self._similarity_scale(index)
        texts = {i: hash(r.text()) for i, r in items.items()}
        del items
        t = self._stage(job, "index", t)
        job.stage = "catch-up"
        for _ in range(CATCH_UP_ROUNDS):
            with self.active.write_lock:
                assert self.shadow is not None
                touched, stash = self.shadow.take()
            if not touched and not stash:
                break
            self._catch_up(encoder, index, texts, touched, stash)
        t = self._stage(job, "catch-up", t)
        job.stage = "swap"
        self._builds += 1
        with self.active.write_lock:
            assert self.shadow is not None
            touched, stash = self.shadow.take()
            self._catch_up(encoder, index, texts, touched, stash)
            new = ServingPair(
                encoder,
                index,
                job.version,
                f"{job.version}@{self._builds}",
                build_seconds=time.perf_counter() - t_start,
                texts=texts,
                similarity=scale,
            )
            old = self.active.swap(new)
            self.shadow = None
            if job.reason == "rollback" and len(self.history) >= 2 and self.history[-2] == job.version:
                self.history.pop()
            elif not self.history or self.history[-1] != job.version:
                self.history.append(job.version)
        self._stage(job, "swap", t)
        job.state, job.stage = "live", ""
        job.index_version, job.items = new.index_version, len(index)
        self.last_swap = job
        log.info(
            "adapter %s live (%s items, similarity x%.3f %+.3f) after %.2f s: %s",
            job.version,
            len(index),
            scale.scale,
            scale.shift,
            new.build_seconds,
            ", ".join(f"{k} {v:.2f}s" for k, v in job.stages.items()),
        )
        del old  # in-flight requests may still hold it; it goes when they finish
        if self.on_swap is not None:
            self.on_swap(new, job)

    def _catch_up(
        self,
        encoder: TextEncoder,
        index: Any,
        texts: dict[str, int],
        touched: set[str],
        stash: dict[str, np.ndarray | None],
    ) -> None:
        """Apply the version's own stashed vectors, then re-encode the touched items."""
        if stash:
            ups = {i: v for i, v in stash.items() if v is not None and i not in touched}
            dels = [i for i, v in stash.items() if v is None and i not in touched]
            if ups:
                index.upsert(list(ups), np.stack(list(ups.values())))
            if dels:
                index.delete(dels)
        if touched:
            ids = sorted(touched)
            records = self.tools.read_items(ids)
            if self.on_items is not None and records:
                self.on_items(records)
            gone = [i for i in ids if i not in records]
            if records:
                present = list(records)
                index.upsert(present, encoder.encode([records[i].text() for i in present]))
                texts.update((i, hash(records[i].text())) for i in present)
            if gone:
                index.delete(gone)
                for i in gone:
                    texts.pop(i, None)
