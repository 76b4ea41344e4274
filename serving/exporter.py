"""ONNX export of a new adapter version in a separate, lower-priority process.

Why not in the serving process: exporting means merging the LoRA in PyTorch and tracing
the model to ONNX, which is mostly Python and holds the GIL for seconds, so every
request waiting for the GIL would wait with it (p99 during a swap), and it would load
torch into a process that otherwise needs only ONNX Runtime (hundreds of MB). The worker
is one process, started on first use and kept, so torch is imported once, not per swap;
it runs at ``settings.serving_build_nice`` so the kernel prefers request threads.

The export lands in ``state_dir/exports/<version>/`` (``indexer.export`` renames a
complete folder into place), where :func:`indexer.onnx_encoder.encoder_for` in the
serving process then only loads it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger("freshrec.serving.exporter")


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value (Linux: per thread; elsewhere: the process)."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError, PermissionError):  # pragma: no cover - best effort
        pass


def _worker_init(nice: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if nice > 0:
        try:
            os.nice(nice)
        except OSError:  # pragma: no cover
            pass


def _warm() -> bool:
    import indexer.export  # noqa: F401  (imports torch and transformers once)
    import indexer.merge  # noqa: F401

    return True


def _export(exports_root: str, version: str, adapter_dir: str | None, precision: str) -> str:
    from indexer.export import ensure_export

    return str(ensure_export(Path(exports_root), version, None if adapter_dir is None else Path(adapter_dir), precision))


class ExportWorker:
    """One long-lived export process; :meth:`export` blocks until the version is on disk."""

    def __init__(self, nice: int = 10) -> None:
        self.nice = nice
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _get(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(self.nice,)
                )
            return self._pool

    def warm(self) -> None:
        """Start the process and import torch there now, so the first swap does not wait for it."""
        self._get().submit(_warm)

    def export(self, exports_root: Path, version: str, adapter_dir: Path | None, precision: str) -> Path:
        future = self._get().submit(_export, str(exports_root), version, None if adapter_dir is None else str(adapter_dir), precision)
        try:
            return Path(future.result())
        except Exception as exc:
            if type(exc).__name__ == "BrokenProcessPool":
                with self._lock:
                    self._pool = None  # a crashed worker is replaced on the next export
            raise

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None


def is_exported(settings: Any, version: str) -> bool:
    """Whether ``state_dir/exports/<version>`` exists (it appears complete or not at all)."""
    return (Path(settings.state_dir) / "exports" / version).is_dir()
