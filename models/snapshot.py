"""The on-disk form of a :class:`~models.live_index.LiveIndex` snapshot, and its checks.

A snapshot is a folder:

- ``index.faiss``: the FAISS index, serialised;
- ``ids.json``: FAISS id -> item id, HNSW tombstones, the next free FAISS id;
- ``meta.json``: format, adapter version, index kind, dim, item count, and a sha256 over
  the other two files.

It is written to a temporary sibling and renamed into place, so a reader sees the old
snapshot or the new one, never half of one. Reading refuses, with a
:class:`SnapshotError` that names the problem, a folder that is missing or incomplete,
files whose checksum does not match (corrupt or tampered), contents that disagree with
the metadata, and a snapshot of another adapter version than the caller expects.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .backends import backend_import_error

try:
    import faiss
except ImportError as exc:  # neither faiss-cpu nor faiss-gpu, or one that cannot load
    raise backend_import_error("faiss", exc) from exc

SNAPSHOT_FORMAT = 1
_META = "meta.json"
_INDEX = "index.faiss"
_IDS = "ids.json"


class SnapshotError(ValueError):
    """A snapshot that must not be served: missing, corrupt, or built for another version."""


def write_snapshot(path: Path, index_blob: bytes, ids_blob: bytes, meta: dict[str, Any]) -> Path:
    """Write the three files to the folder ``path`` atomically; ``meta`` gains format and checksum."""
    meta = {**meta, "format": SNAPSHOT_FORMAT, "checksum": _checksum(index_blob, ids_blob), "created": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_synced(tmp / _INDEX, index_blob)
        _write_synced(tmp / _IDS, ids_blob)
        _write_synced(tmp / _META, orjson.dumps(meta, option=orjson.OPT_INDENT_2))
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_snapshot(path: Path, expected_version: str | None = None) -> tuple[dict[str, Any], faiss.Index, dict[str, Any]]:
    """``(meta, faiss index, ids)`` of a verified snapshot, or :class:`SnapshotError`."""
    if not (path / _META).is_file():
        raise SnapshotError(f"no index snapshot at {path} (missing {_META}); build one with `freshrec index --build`")
    try:
        meta = orjson.loads((path / _META).read_bytes())
        blob = (path / _INDEX).read_bytes()
        ids_blob = (path / _IDS).read_bytes()
    except (OSError, orjson.JSONDecodeError) as exc:
        raise SnapshotError(f"index snapshot at {path} is unreadable: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != SNAPSHOT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise SnapshotError(f"index snapshot at {path} has format {found!r}, this code reads format {SNAPSHOT_FORMAT}; rebuild it")
    version = meta.get("adapter_version")
    if expected_version is not None and version != expected_version:
        raise SnapshotError(
            f"index snapshot at {path} was built with adapter version {version!r}, expected "
            f"{expected_version!r}; build an index for {expected_version!r} instead of serving this one"
        )
    actual = _checksum(blob, ids_blob)
    if actual != meta.get("checksum"):
        raise SnapshotError(
            f"index snapshot at {path} is corrupt: checksum {actual[:12]}... does not match the recorded "
            f"{str(meta.get('checksum'))[:12]}...; delete it and rebuild"
        )
    try:
        index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        ids = orjson.loads(ids_blob)
    except (RuntimeError, orjson.JSONDecodeError) as exc:
        raise SnapshotError(f"index snapshot at {path} cannot be loaded: {exc}") from None
    fids, items, tombs = ids["fids"], ids["items"], ids["tombstones"]
    problems = []
    if index.d != meta.get("dim"):
        problems.append(f"index dim {index.d} != recorded {meta.get('dim')}")
    if len(fids) != meta.get("count") or len(items) != len(fids):
        problems.append(f"{len(fids)} ids for a recorded count of {meta.get('count')}")
    if index.ntotal != len(fids) + len(tombs):
        problems.append(f"index holds {index.ntotal} vectors for {len(fids)} items + {len(tombs)} tombstones")
    if meta.get("kind") not in ("flat", "hnsw"):
        problems.append(f"unknown index kind {meta.get('kind')!r}")
    if problems:
        raise SnapshotError(f"index snapshot at {path} is inconsistent: {'; '.join(problems)}; rebuild it")
    return meta, index, ids


def _checksum(*blobs: bytes) -> str:
    h = hashlib.sha256()
    for b in blobs:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``, replacing an existing folder with as short a gap as rename allows."""
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
