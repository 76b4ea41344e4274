"""ONNX export of a new adapter version in a separate, lower-priority process.

Why not in the serving process: exporting means merging the LoRA in PyTorch and tracing
the model to ONNX, which is mostly Python and holds the GIL for seconds, so every
request waiting for the GIL would wait with it (p99 during a swap), and it would load
torch into a process that otherwise needs only ONNX Runtime (hundreds of MB). The worker
is one process, started on first use and kept, so torch is imported once, not per swap;
it runs at ``settings.serving_build_nice`` so the kernel prefers request threads.

The export lands in ``state_dir/exports/<version>/`` (``models.export`` renames a
complete folder into place), where :func:`models.onnx_encoder.encoder_for` in the
serving process then only loads it.

The worker never outlives serving (design invariant 6): it asks the kernel for a SIGKILL
when serving dies (:func:`freshrec.children.die_with_parent`; it holds nothing worth a
goodbye, an interrupted export leaves only a hidden temporary folder), and
:meth:`ExportWorker.close` ends it rather than waiting for a running export: uvicorn
re-raises the SIGTERM it handled once the lifespan has stopped, so the process dies by
the signal's default action without running ``concurrent.futures``' exit hook, which
is what used to leave the worker and multiprocessing's resource tracker under PID 1.
The resource tracker needs nothing of its own: it exits when serving and the worker,
the holders of its pipe, are gone.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from freshrec.children import die_with_parent

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
    die_with_parent(signal.SIGKILL)
    # A Ctrl-C in serving's terminal reaches its whole process group; serving decides
    # when the worker stops (close()), and a KeyboardInterrupt here would only print.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if nice > 0:
        try:
            os.nice(nice)
        except OSError:  # pragma: no cover
            pass


def _warm() -> bool:
    import models.export  # noqa: F401  (imports torch and transformers once)
    import models.merge  # noqa: F401

    return True


def _export(exports_root: str, version: str, adapter_dir: str | None, precision: str) -> str:
    from models.export import ensure_export

    return str(ensure_export(Path(exports_root), version, None if adapter_dir is None else Path(adapter_dir), precision))


class ExportWorker:
    """One long-lived export process; :meth:`export` blocks until the version is on disk.

    The process is started by the first :meth:`warm` or :meth:`export` call, and the
    kernel's parent-death signal follows the *thread* that started it: serving calls
    them from the main thread (start-up) or the pair-builder thread, both of which live
    until :meth:`close`.
    """

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

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker now, even mid-export (SIGTERM, SIGKILL after ``timeout`` s), and reap it.

        Not ``shutdown(wait=True)``: an export runs for tens of seconds, and a stopping
        server that waits that long gets SIGKILLed by whoever stops it.
        """
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is None:
            return
        # The executor has no public handle on its processes; ``_processes`` (pid ->
        # Process) has been there since Python 3.2. Read it before shutdown clears it.
        workers = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in workers:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in workers:
            proc.join(max(deadline - time.monotonic(), 0.0))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)


def is_exported(settings: Any, version: str) -> bool:
    """Whether ``state_dir/exports/<version>`` exists (it appears complete or not at all)."""
    return (Path(settings.state_dir) / "exports" / version).is_dir()
