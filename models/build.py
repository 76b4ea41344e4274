"""Build a complete :class:`~models.live_index.LiveIndex` of a catalog with one encoder.

Serving calls this for the shadow index of a new adapter version, and the indexer for
``freshrec index --build``. The index kind follows the catalog size
(:func:`models.live_index.choose_kind`), and the vectors carry the encoder's version.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .encoder import TextEncoder
from .live_index import LiveIndex

Progress = bool | Callable[[int, int], None]
BUILD_BATCH = 256  # texts handed to the encoder at once (it sub-batches by token length)


def build_index(
    encoder: TextEncoder,
    items: Mapping[str, Any],
    version: str | None = None,
    progress: Progress = False,
    batch_size: int = BUILD_BATCH,
    store: Path | None = None,
) -> LiveIndex:
    """Encode ``item.text()`` of every item and return an index of version ``version``.

    ``items`` maps item id to a :class:`~freshrec.contracts.CatalogItem` (anything with
    ``.text()``). ``version`` defaults to the encoder's and must equal it: an index whose
    vectors came from another adapter would break invariant 1. ``progress`` is ``True``
    for a tqdm bar on stderr, or a callable ``progress(done, total)``. With ``store`` (a
    folder, ``state_dir/encodings``) the vectors are encoded once per version and text
    and shared with every other process building the same version
    (:func:`models.encodings.encode_catalog`); the index's ``build_report`` says how many
    were reused.
    """
    version = encoder.version if version is None else version
    if version != encoder.version:
        raise ValueError(f"build_index asked for version {version!r} with an encoder of version {encoder.version!r}")
    ids = list(items)
    index = LiveIndex(encoder.dim, version, expected_items=len(ids))
    report, close = _progress(progress, len(ids))
    try:
        if store is not None:
            from .encodings import encode_catalog

            ids, vectors, index.build_report = encode_catalog(store, encoder, items, report, batch_size)
            for start in range(0, len(ids), batch_size):
                index.upsert(ids[start : start + batch_size], vectors[start : start + batch_size])
            return index
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            vectors = encoder.encode([items[i].text() for i in chunk])
            index.upsert(chunk, vectors)
            report(len(chunk))
    finally:
        close()
    return index


def _progress(progress: Progress, total: int) -> tuple[Callable[[int], None], Callable[[], None]]:
    if callable(progress):
        done = 0
        progress(0, total)

        def report(n: int) -> None:
            nonlocal done
            done += n
            progress(done, total)  # type: ignore[operator]

        return report, lambda: None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="item", desc="encoding items", smoothing=0.1)
        return bar.update, bar.close
    return (lambda n: None), (lambda: None)


def build_version_index(
    settings: Any,
    version: str,
    adapter_dir: Path | None,
    items: Mapping[str, Any],
    progress: Progress = False,
    out: Path | None = None,
) -> LiveIndex:
    """A complete index of ``items`` encoded with adapter ``version`` (the learner's hot swap).

    ``adapter_dir`` is the adapter folder from the registry (None for ``"base"``); the
    encoder comes from the per-version ONNX export cache at ``settings.encoder_precision``
    with ``settings.indexer_threads`` threads. With ``out`` the index is also snapshotted
    there (atomically), for :meth:`LiveIndex.restore` with ``expected_version=version``.
    """
    from .onnx_encoder import encoder_for

    encoder = encoder_for(settings, version, adapter_dir, settings.encoder_precision, threads=settings.indexer_threads)
    index = build_index(encoder, items, version, progress)
    if out is not None:
        index.snapshot(out)
    return index
