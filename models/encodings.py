"""Each adapter version's catalog vectors, encoded once and shared through ``state_dir``.

A swap to a new adapter version needs every catalog item encoded with it (~8-12 s for the
4.4k-item catalog on 2 cores). Each serving replica used to do that itself for every
version, beside the indexer, all competing for the same cores. Now the first process to
build a version encodes the catalog, under an exclusive lock per version
(:func:`models.file_lock.exclusive`), and stores the vectors as
``<root>/<version>-<precision>.npz``; a process that asks while it works waits for the lock
and then reads them. Precision is part of the name because int8 and fp16 vectors of the
same version differ.

What is stored is a cache keyed by text, not a frozen index: each row carries a digest of
the item's text, and a reader re-encodes every item whose text is not the one stored (or
that is new), then stores the result again, so the next reader (another replica, a
rollback to this version later) finds it current. A row is reused only for the same
version, precision and text, so the vector is the one this encoder gives that text
(up to the batch it was encoded in: the int8 export is batch-invariant, see
:mod:`models.export`). A damaged file (zip CRC, shapes, another version) is logged and
rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .file_lock import exclusive

log = logging.getLogger("freshrec.models.encodings")

FORMAT = 1
DIGEST_BYTES = 16
ENCODE_BATCH = 256  # texts handed to the encoder at once (it sub-batches by token length)


@dataclass
class EncodeReport:
    """What one :func:`encode_catalog` call did: rows reused, rows encoded, seconds waited."""

    reused: int = 0
    encoded: int = 0
    waited_s: float = 0.0
    stored: bool = False


def text_digest(text: str) -> bytes:
    """16 bytes that change when the text does (stable across processes, unlike ``hash``)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=DIGEST_BYTES).digest()


def encodings_dir(settings: Any) -> Path:
    """Where a deployment keeps them: ``state_dir/encodings`` (shared like ``state_dir/exports``)."""
    return Path(settings.state_dir) / "encodings"


def store_path(root: Path, version: str, precision: str) -> Path:
    return Path(root) / f"{version}-{precision}.npz"


def encode_catalog(
    root: Path,
    encoder: Any,
    items: Mapping[str, Any],
    progress: Callable[[int], None] = lambda n: None,
    batch_size: int = ENCODE_BATCH,
) -> tuple[list[str], np.ndarray, EncodeReport]:
    """The vectors of ``items`` (id -> record with ``.text()``) under ``encoder``'s version,
    in ``items``' order, reusing what is stored for this version and storing the result.

    ``progress(n)`` is called as rows become ready (reused rows at once). Returns the ids,
    a float32 matrix of their vectors and an :class:`EncodeReport`.
    """
    version, precision = str(encoder.version), str(getattr(encoder, "precision", "fp32"))
    path = store_path(root, version, precision)
    ids = list(items)
    texts = [items[i].text() for i in ids]
    digests = [text_digest(t) for t in texts]
    report = EncodeReport()
    with exclusive(path.with_suffix(".lock"), f"the catalog encodings of {version}") as waited:
        report.waited_s = waited
        stored = read_store(path, version, int(encoder.dim))
        out = np.empty((len(ids), int(encoder.dim)), dtype=np.float32)
        todo: list[int] = []
        for k, (item, d) in enumerate(zip(ids, digests, strict=True)):
            row = stored.rows.get(item)
            if row is not None and stored.digests[row] == d:
                out[k] = stored.vectors[row]
            else:
                todo.append(k)
        report.reused = len(ids) - len(todo)
        progress(report.reused)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            out[chunk] = encoder.encode([texts[k] for k in chunk])
            progress(len(chunk))
        report.encoded = len(todo)
        if todo or len(stored.rows) != len(ids):
            write_store(path, version, ids, digests, out)
            report.stored = True
    if report.reused:
        log.info("encodings of %s: %d reused, %d encoded (waited %.1f s)", version, report.reused, report.encoded, waited)
    return ids, out, report


@dataclass
class Stored:
    rows: dict[str, int]
    digests: list[bytes]
    vectors: np.ndarray


def read_store(path: Path, version: str, dim: int) -> Stored:
    """What ``path`` holds for ``version`` (empty when missing; damaged files are logged and ignored)."""
    empty = Stored({}, [], np.empty((0, dim), dtype=np.float32))
    if not path.is_file():
        return empty
    try:
        with np.load(path, allow_pickle=False) as z:
            fmt, ver = int(z["format"]), str(z["version"])
            ids, raw, vectors = z["ids"].tolist(), z["digests"], np.asarray(z["vectors"], dtype=np.float32)
        if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1:] != (DIGEST_BYTES,):
            raise ValueError(f"digests of dtype {raw.dtype} and shape {raw.shape}")
        digests = [bytes(r) for r in raw]
        if fmt != FORMAT or ver != version:
            raise ValueError(f"format {fmt} of version {ver!r}, expected format {FORMAT} of {version!r}")
        if vectors.shape != (len(ids), dim) or len(digests) != len(ids):
            raise ValueError(f"{len(ids)} ids, {len(digests)} digests and vectors of shape {vectors.shape} (dim {dim})")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        log.warning("ignoring the stored encodings %s (%s): %s; encoding again", path, type(exc).__name__, exc)
        return empty
    return Stored({item: row for row, item in enumerate(ids)}, digests, vectors)


def write_store(path: Path, version: str, ids: Sequence[str], digests: Sequence[bytes], vectors: np.ndarray) -> None:
    """Write atomically (a temporary sibling renamed into place): a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            format=np.int64(FORMAT),
            version=np.str_(version),
            ids=np.array(list(ids), dtype=np.str_),
            # uint8 rows, not an "S16" array: numpy strips trailing zero bytes from those.
            digests=np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(digests), DIGEST_BYTES),
            vectors=np.ascontiguousarray(vectors, dtype=np.float32),
        )
    os.replace(tmp, path)


def prune_encodings(root: Path, keep_versions: set[str]) -> list[str]:
    """Delete the stored encodings of every version not in ``keep_versions``; return their files."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.glob("*.npz")):
        version = p.name[: -len(".npz")].rsplit("-", 1)[0]
        if version not in keep_versions:
            p.unlink(missing_ok=True)
            # Its empty lock file goes too, or one would pile up per version ever published;
            # nobody encodes a pruned (old) version, and one asked for again gets a fresh lock.
            p.with_suffix(".lock").unlink(missing_ok=True)
            removed.append(p.name)
    return removed
