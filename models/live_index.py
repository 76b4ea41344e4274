"""The live FAISS index: item ids in, ``(item_id, score)`` out, updated while it serves.

Which FAISS index, by catalog size (measured on this machine: 2 shared CPU cores,
384-d unit vectors, inner product = cosine):

* **Exact** (``IndexFlatIP``) up to :data:`FLAT_MAX_ITEMS` items. One query over 50k
  items costs ~4-6 ms and grows linearly; recall is exact, and an update or delete is
  done in place (``remove_ids`` compacts the array, ~5 ms at 50k). The bundled sample
  (2.8k items) searches in well under a millisecond. Exact search also means that a
  snapshot and its restore return *identical* results, and that evaluation measures the
  encoder, not the index.
* **HNSW** (``IndexHNSWFlat``, M=32) above that: ~0.2 ms per query almost regardless of
  size, but adding is slow (~0.2 ms per vector here: 10k vectors take ~2 s) and HNSW
  cannot remove a node in place. So upserts and deletes *tombstone* it: the old node
  stays in the graph (it still routes searches), a search selector keeps it out of the
  results, and an upserted item gets a fresh FAISS id. When tombstones exceed
  ``compact_ratio`` of the live items the index is rebuilt from the live vectors
  (:meth:`LiveIndex.compact`), which bounds both the memory and the wasted search effort.

Exclusion sets (items a shopper already has) are handled by over-fetching ``k`` plus the
number of excluded items actually in the index, then filtering, so an exact index always
returns ``k`` results when it holds that many eligible items.

GPU: when FAISS sees a GPU (``faiss.get_num_gpus() > 0``) exact searches run on a GPU
copy of the vectors (:class:`_GpuMirror`), kept current change by change; the CPU index
stays the source of truth (it removes in place and is what snapshots write). FAISS GPU
indexes cannot remove a vector (facebookresearch/faiss#584), so the copy appends and
tombstones, and once tombstones pass :data:`_GPU_MAX_DEAD` the writer rebuilds it from
the CPU index *outside* the lock while searches go on against the old copy. HNSW stays
on the CPU.

Every public method takes one lock: FAISS indexes are not safe to search while another
thread adds or removes, and serving searches while it applies item vectors. The one slow
GPU step (uploading a rebuilt copy) runs without it.

Example::

    index = LiveIndex(dim=3, version="base")
    index.upsert(["a", "b"], np.eye(3, dtype=np.float32)[:2])
    index.search(np.eye(3, dtype=np.float32)[:1], k=1, exclude={"b"})  # [[("a", 1.0)]]
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson

from freshrec.contracts import ItemVector

from .backends import backend_import_error

try:
    import faiss
except ImportError as exc:  # neither faiss-cpu nor faiss-gpu, or one that cannot load
    raise backend_import_error("faiss", exc) from exc

from .snapshot import SnapshotError, read_snapshot, write_snapshot

__all__ = ["ApplyReport", "LiveIndex", "SnapshotError", "choose_kind", "FLAT_MAX_ITEMS"]

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "hnsw"]

# Above this many items an exact search stops being single-digit milliseconds on 2 cores.
FLAT_MAX_ITEMS = 100_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 64
_GPU_MAX_K = 2048  # FAISS GPU k-selection limit; deeper searches use the CPU index
# Tombstones in the GPU copy before the writer rebuilds it. Each search over-fetches by
# this many, so it bounds the wasted work and keeps k + tombstones under _GPU_MAX_K; a
# rebuild uploads the whole copy (100k x 384 floats = 150 MB), so it is amortised over
# this many changes.
_GPU_MAX_DEAD = 512


def choose_kind(expected_items: int) -> IndexKind:
    """Exact up to :data:`FLAT_MAX_ITEMS`, HNSW beyond (see the module docstring for why)."""
    return "flat" if expected_items <= FLAT_MAX_ITEMS else "hnsw"


@dataclass(frozen=True, slots=True)
class ApplyReport:
    """What :meth:`LiveIndex.apply` did with a batch of item vectors."""

    upserted: int
    deleted: int
    skipped: int  # vectors of another adapter version (invariant 1: never mixed)


class LiveIndex:
    """Item vectors of one adapter version, searchable by inner product while updated.

    ``kind`` is ``"flat"`` (exact) or ``"hnsw"``; ``"auto"`` picks by ``expected_items``
    via :func:`choose_kind`. ``use_gpu`` ``None`` means: when FAISS has a GPU.
    """

    def __init__(
        self,
        dim: int,
        version: str,
        kind: IndexKind | Literal["auto"] = "auto",
        expected_items: int = 0,
        compact_ratio: float = 0.25,
        use_gpu: bool | None = None,
    ) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.version = version
        self.kind: IndexKind = choose_kind(expected_items) if kind == "auto" else kind
        if self.kind not in ("flat", "hnsw"):
            raise ValueError(f"kind must be 'flat', 'hnsw' or 'auto', got {kind!r}")
        self.compact_ratio = compact_ratio
        self._lock = threading.RLock()
        self._index = _new_faiss_index(self.kind, dim)
        self._fid: dict[str, int] = {}  # item id -> FAISS id (live items only)
        self._item: dict[int, str] = {}  # FAISS id -> item id (live items only)
        self._tombstones: set[int] = set()  # HNSW nodes of deleted or replaced items
        self._next_id = 0
        self._params: faiss.SearchParametersHNSW | None = None
        self._params_keep: tuple[object, ...] = ()
        want_gpu = _gpu_count() > 0 if use_gpu is None else use_gpu
        self._gpu = _GpuMirror(dim) if want_gpu and self.kind == "flat" else None
        # What models.build.build_index did to fill it (an EncodeReport), when it used a store.
        self.build_report: Any = None

    # -- reading -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._fid)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._fid

    def item_ids(self) -> list[str]:
        with self._lock:
            return list(self._fid)

    @property
    def tombstones(self) -> int:
        return len(self._tombstones)

    def reconstruct(self, item_id: str) -> np.ndarray | None:
        """The stored vector of ``item_id`` (a copy), or None if the index lacks it."""
        with self._lock:
            fid = self._fid.get(item_id)
            if fid is None:
                return None
            return np.array(self._index.reconstruct(fid), dtype=np.float32)

    def reconstruct_many(self, item_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Vectors of those ``item_ids`` the index holds (missing ones are left out)."""
        with self._lock:
            present = [i for i in dict.fromkeys(item_ids) if i in self._fid]
            if not present:
                return {}
            # One batched FAISS call: a per-id Python loop was ~40 % of /recommend's CPU.
            fids = np.fromiter((self._fid[i] for i in present), dtype=np.int64, count=len(present))
            vectors = np.asarray(self._index.reconstruct_batch(fids), dtype=np.float32)
            return {item_id: vectors[row] for row, item_id in enumerate(present)}

    def search(
        self, queries: np.ndarray, k: int, exclude: AbstractSet[str] = frozenset()
    ) -> list[list[tuple[str, float]]]:
        """Top ``k`` items by inner product for each query row, best first, skipping ``exclude``.

        ``queries`` is (n, dim) or (dim,) float32; the result has one list per query row.
        """
        q = _as_matrix(queries, self.dim, "queries")
        if k <= 0:
            return [[] for _ in range(len(q))]
        with self._lock:
            if not self._fid:
                return [[] for _ in range(len(q))]
            excluded_here = sum(1 for i in exclude if i in self._fid) if exclude else 0
            live_total = len(self._fid)
            fetch = min(k + excluded_here, live_total)
            scores, fids = self._search_faiss(q, fetch)
            out: list[list[tuple[str, float]]] = []
            for row_scores, row_fids in zip(scores, fids):
                hits: list[tuple[str, float]] = []
                for s, f in zip(row_scores.tolist(), row_fids.tolist()):
                    item = self._item.get(f)  # -1 and tombstones map to None
                    if item is None or item in exclude:
                        continue
                    hits.append((item, s))
                    if len(hits) == k:
                        break
                out.append(hits)
            return out

    # -- writing -------------------------------------------------------------------------

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> int:
        """Insert or replace the vectors of ``ids`` (the last row wins for a repeated id)."""
        mat = _as_matrix(vectors, self.dim, "vectors")
        if len(ids) != len(mat):
            raise ValueError(f"upsert got {len(ids)} ids but {len(mat)} vectors")
        if not np.isfinite(mat).all():
            raise ValueError("upsert got a vector with NaN or infinite values")
        last = {item: row for row, item in enumerate(ids)}  # dedupe: last wins
        if not last:
            return 0
        items = list(last)
        mat = np.ascontiguousarray(mat[list(last.values())])
        with self._lock:
            n = self._upsert_locked(items, mat)
        self._refresh_gpu()
        return n

    def _upsert_locked(self, items: list[str], mat: np.ndarray) -> int:
        existing = [self._fid[i] for i in items if i in self._fid]
        if self.kind == "flat":
            # Exact index: remove in place and reuse each item's FAISS id.
            if existing:
                self._index.remove_ids(np.asarray(existing, dtype=np.int64))
                if self._gpu is not None:
                    self._gpu.remove(existing)
            fids = [self._fid[i] if i in self._fid else self._allocate() for i in items]
        else:
            # HNSW cannot remove a node: tombstone the old one, give the item a new id.
            for i in items:
                old = self._fid.pop(i, None)
                if old is not None:
                    self._tombstones.add(old)
                    del self._item[old]
            fids = [self._allocate() for _ in items]
        fid_arr = np.asarray(fids, dtype=np.int64)
        self._index.add_with_ids(mat, fid_arr)
        if self._gpu is not None:
            self._gpu.add(fid_arr, mat)
        for i, f in zip(items, fids):
            self._fid[i] = f
            self._item[f] = i
        self._changed()
        return len(items)

    def delete(self, ids: Iterable[str]) -> int:
        """Remove ``ids``; unknown ids are ignored. Returns how many were removed."""
        with self._lock:
            n = self._delete_locked(ids)
        self._refresh_gpu()
        return n

    def _delete_locked(self, ids: Iterable[str]) -> int:
        gone = [self._fid.pop(i) for i in set(ids) if i in self._fid]
        if not gone:
            return 0
        for f in gone:
            del self._item[f]
        if self.kind == "flat":
            self._index.remove_ids(np.asarray(gone, dtype=np.int64))
            if self._gpu is not None:
                self._gpu.remove(gone)
        else:
            self._tombstones.update(gone)
        self._changed()
        return len(gone)

    def apply(self, records: Iterable[ItemVector]) -> ApplyReport:
        """Apply item-vector records in order: a vector upserts, None deletes.

        Records of another adapter version are skipped and counted, never mixed in.
        """
        upserted = deleted = skipped = 0
        pending: dict[str, np.ndarray | None] = {}
        for rec in records:
            if rec.adapter_version != self.version:
                skipped += 1
                continue
            pending[rec.item_id] = rec.vector  # later records of an item win
        ups = [(i, v) for i, v in pending.items() if v is not None]
        dels = [i for i, v in pending.items() if v is None]
        mat = _as_matrix(np.stack([v for _, v in ups]), self.dim, "vectors") if ups else None
        if mat is not None and not np.isfinite(mat).all():
            raise ValueError("apply got a vector with NaN or infinite values")
        with self._lock:  # one lock for the whole batch: no search sees half of it
            if dels:
                deleted = self._delete_locked(dels)
            if mat is not None:
                upserted = self._upsert_locked([i for i, _ in ups], mat)
        self._refresh_gpu()
        return ApplyReport(upserted, deleted, skipped)

    def compact(self) -> None:
        """Rebuild from the live vectors, dropping tombstones (HNSW; a no-op for exact)."""
        with self._lock:
            if not self._tombstones:
                return
            items = list(self._fid)
            fids = np.asarray([self._fid[i] for i in items], dtype=np.int64)
            vectors = np.vstack([self._index.reconstruct(int(f)) for f in fids]) if len(fids) else None
            self._index = _new_faiss_index(self.kind, self.dim)
            if vectors is not None:
                self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), fids)
            self._tombstones.clear()
            self._changed()

    # -- snapshot and restore ------------------------------------------------------------

    def snapshot(self, path: Path | str) -> Path:
        """Write the index and its metadata to the folder ``path``, atomically.

        The format (index, id map, metadata with adapter version, item count and a
        checksum) is described in :mod:`models.snapshot`.
        """
        with self._lock:
            blob = faiss.serialize_index(self._index).tobytes()
            ids_blob = orjson.dumps(
                {
                    "fids": list(self._item.keys()),
                    "items": list(self._item.values()),
                    "tombstones": sorted(self._tombstones),
                    "next_id": self._next_id,
                }
            )
            meta = {
                "adapter_version": self.version,
                "kind": self.kind,
                "dim": self.dim,
                "count": len(self._fid),
                "ntotal": int(self._index.ntotal),
            }
        return write_snapshot(Path(path), blob, ids_blob, meta)

    @classmethod
    def restore(cls, path: Path | str, expected_version: str | None = None, use_gpu: bool | None = None) -> LiveIndex:
        """Load a snapshot written by :meth:`snapshot`.

        Raises :class:`SnapshotError` naming the problem if the folder is missing or
        incomplete, its checksum does not match (corrupt or tampered files), its contents
        disagree with its metadata, or it was built for an adapter version other than
        ``expected_version``: serving must never mix vectors of two versions.
        """
        meta, index, ids = read_snapshot(Path(path), expected_version)
        fids, items, tombs = ids["fids"], ids["items"], ids["tombstones"]
        version = meta["adapter_version"]
        out = cls(int(meta["dim"]), str(version), kind=meta["kind"], use_gpu=use_gpu)
        out._index = index
        out._fid = dict(zip(items, fids))
        out._item = dict(zip(fids, items))
        out._tombstones = set(tombs)
        out._next_id = int(ids["next_id"])
        out._changed()
        out._refresh_gpu()  # the GPU copy, if any, is built here, before anyone searches
        return out

    # -- internals -----------------------------------------------------------------------

    def _allocate(self) -> int:
        fid = self._next_id
        self._next_id += 1
        return fid

    def _hnsw_params(self, fetch: int) -> faiss.SearchParametersHNSW:
        """Search parameters whose selector hides the tombstones; cached until the next change."""
        if self._params is None:
            params = faiss.SearchParametersHNSW()
            if self._tombstones:
                dead = np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones))
                batch = faiss.IDSelectorBatch(dead)
                not_dead = faiss.IDSelectorNot(batch)
                params.sel = not_dead
                # SWIG keeps raw pointers: hold the selectors as long as the params live.
                self._params_keep = (batch, not_dead)
            self._params = params
        self._params.efSearch = max(HNSW_EF_SEARCH, fetch)
        return self._params

    def _changed(self) -> None:
        self._params = None
        if self.kind == "hnsw" and len(self._tombstones) > self.compact_ratio * max(len(self._fid), 1):
            self.compact()

    def _refresh_gpu(self) -> None:
        """Rebuild the GPU copy from the CPU index once it holds too many tombstones (or
        was never built); called by writers after they let go of the lock.

        The copy of the vectors is taken under the lock (a memcpy), the upload runs
        without it while searches use the old copy, and changes made meanwhile are
        replayed onto the new copy when it is swapped in under the lock.
        """
        gpu = self._gpu
        if gpu is None:
            return
        with self._lock:
            if not gpu.needs_rebuild():
                return
            inner = self._index.index  # IndexIDMap2 over IndexFlatIP: every row is live
            ntotal = int(inner.ntotal)
            vectors = inner.reconstruct_n(0, ntotal) if ntotal else np.zeros((0, self.dim), dtype=np.float32)
            fids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            gpu.begin_rebuild()
        try:
            staged = gpu.upload(np.ascontiguousarray(vectors, dtype=np.float32))
        except Exception as exc:
            # The CPU index already holds the change and answers every search: a GPU that
            # fails (out of memory, say) costs speed, never a write or a request.
            with self._lock:
                gpu.abort_rebuild()
                self._gpu = None
            log.error("FAISS GPU copy of index %s failed (%r); searching on the CPU from now on", self.version, exc)
            return
        except BaseException:
            with self._lock:
                gpu.abort_rebuild()
            raise
        with self._lock:
            gpu.install(staged, fids)

    def _search_faiss(self, q: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._gpu is not None and self._gpu.can_search(fetch):
            return self._gpu.search(q, fetch)
        if self.kind == "hnsw":
            return self._index.search(q, fetch, params=self._hnsw_params(fetch))
        return self._index.search(q, fetch)


class _GpuMirror:
    """A GPU copy of an exact index's vectors, kept current change by change.

    Slots are positions in the GPU index; ``slot_fid[slot]`` is the FAISS id there, or -1
    for a tombstone (a removed or replaced vector: the GPU index cannot drop it). A search
    fetches ``k`` plus the tombstones, so ``k`` live hits survive the filtering. While a
    rebuild is uploading (``journal`` is not None) every change is also journaled, and
    :meth:`install` replays the journal onto the new copy. All methods but :meth:`upload`
    run under the owner's lock.

    ``upload`` turns an (n, dim) float32 array into a searchable GPU index holding those
    rows in order; the default uses ``faiss.index_cpu_to_gpu``. Tests pass a CPU one.
    """

    def __init__(self, dim: int, upload: Callable[[np.ndarray], Any] | None = None) -> None:
        self.dim = dim
        self._upload = upload or self._upload_to_gpu
        self._resources: list[Any] = []
        self.index: Any = None  # None until the first upload is installed
        self.slot_fid = np.zeros(0, dtype=np.int64)
        self.used = 0
        self.slot_of: dict[int, int] = {}
        self.dead = 0
        self.journal: list[tuple[np.ndarray, np.ndarray | None]] | None = None
        self.uploads = 0

    # -- under the owner's lock ----------------------------------------------------------

    def add(self, fids: np.ndarray, vectors: np.ndarray) -> None:
        """Append ``vectors`` for FAISS ids ``fids`` (none of them live in the copy)."""
        if self.journal is not None:
            self.journal.append((np.array(fids, dtype=np.int64), np.array(vectors, dtype=np.float32)))
        if self.index is None:
            return
        self.index.add(vectors)
        n = len(fids)
        if self.used + n > len(self.slot_fid):
            grown = np.full(max(2 * len(self.slot_fid), self.used + n, 64), -1, dtype=np.int64)
            grown[: self.used] = self.slot_fid[: self.used]
            self.slot_fid = grown
        self.slot_fid[self.used : self.used + n] = fids
        for slot, f in enumerate(fids.tolist(), start=self.used):
            self.slot_of[f] = slot
        self.used += n

    def remove(self, fids: Sequence[int]) -> None:
        """Tombstone the slots of ``fids`` (ids the copy lacks are ignored)."""
        if self.journal is not None:
            self.journal.append((np.array(fids, dtype=np.int64), None))
        for f in fids:
            slot = self.slot_of.pop(int(f), None)
            if slot is not None:
                self.slot_fid[slot] = -1
                self.dead += 1

    def can_search(self, fetch: int) -> bool:
        return self.index is not None and fetch + self.dead <= _GPU_MAX_K

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and FAISS ids (-1 for tombstones and missing hits), k + tombstones wide."""
        kk = max(1, min(k + self.dead, self.used))
        scores, pos = self.index.search(q, kk)
        fids = np.where(pos >= 0, self.slot_fid[np.clip(pos, 0, None)], -1)
        return scores, fids

    def needs_rebuild(self) -> bool:
        return self.journal is None and (self.index is None or self.dead > _GPU_MAX_DEAD)

    def begin_rebuild(self) -> None:
        self.journal = []

    def abort_rebuild(self) -> None:
        self.journal = None

    def install(self, staged: Any, fids: np.ndarray) -> None:
        """Swap in a copy uploaded from the CPU index's rows ``fids``, then replay the journal."""
        journal, self.journal = self.journal or [], None
        self.index = staged
        self.slot_fid = np.array(fids, dtype=np.int64)
        self.used = len(fids)
        self.slot_of = {f: slot for slot, f in enumerate(self.slot_fid.tolist())}
        self.dead = 0
        for ids, vectors in journal:
            if vectors is None:
                self.remove(ids.tolist())
            else:
                self.remove(ids.tolist())  # an id re-added after the copy was taken
                self.add(ids, vectors)

    # -- without the lock ----------------------------------------------------------------

    def upload(self, vectors: np.ndarray) -> Any:
        self.uploads += 1
        return self._upload(vectors)

    def _upload_to_gpu(self, vectors: np.ndarray) -> Any:
        # Two GPU resource objects, used in turn: FAISS's are not thread-safe, and the new
        # copy uploads while searches still run on the old one.
        while len(self._resources) < 2:
            self._resources.append(faiss.StandardGpuResources())
        res = self._resources[self.uploads % 2]  # the other one than the live copy's
        cpu = faiss.IndexFlatIP(self.dim)
        if len(vectors):
            cpu.add(vectors)
        return faiss.index_cpu_to_gpu(res, 0, cpu)


def _new_faiss_index(kind: IndexKind, dim: int) -> faiss.Index:
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    inner.hnsw.efSearch = HNSW_EF_SEARCH
    return faiss.IndexIDMap2(inner)


def _gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None and hasattr(faiss, "StandardGpuResources") else 0


def _as_matrix(x: np.ndarray, dim: int, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{name} must have shape (n, {dim}), got {np.shape(x)}")
    return np.ascontiguousarray(arr)
