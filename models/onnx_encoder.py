"""The ONNX Runtime back end: what serving and the indexer encode with.

``encoder_for(settings, version, adapter_dir)`` is the one entry point: it returns an
:class:`OnnxEncoder` over the cached export of that adapter version (exporting it the
first time, see :mod:`models.export`), int8 on the CPU and fp16 when ONNX Runtime has
CUDA. Loading a cached export imports neither torch nor transformers.

Threads: one intra-op thread by default (``settings.onnx_threads``). On two cores shared
with Kafka, Redis and the flows, a one-query encoding is fastest on one thread (a second
one mostly waits for a core), and two requests then run side by side. Batch encoding
(the indexer) gains from two. Spinning is off, so idle pool threads do not burn a core.

Example::

    enc = encoder_for(settings, "base", None)
    enc.encode(["red heart t-light holder"]).shape   # (1, 384)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .backends import cuda_device_visible, onnxruntime
from .encoder import BASE_VERSION, DIM
from .export import PRECISIONS, ensure_export
from .tokenize import FastTokenizer

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class EncoderDeviceError(RuntimeError):
    """An encoder session asked for CUDA and did not get it (it would run on the CPU)."""


def cuda_available() -> bool:
    """ONNX Runtime was built with CUDA (onnxruntime-gpu) and the host shows a GPU.

    Whether the CUDA libraries then load is known only once a session is made: see
    :func:`check_providers`, which fails loudly if they do not.
    """
    return CUDA in onnxruntime().get_available_providers() and cuda_device_visible()


_preloaded = False
_preload_lock = threading.Lock()


def preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries that onnxruntime-gpu needs, once per process.

    ``onnxruntime.preload_dlls()`` (ONNX Runtime >= 1.21) finds them in the ``nvidia-*``
    wheels or PyTorch's CUDA build; without it a CUDA session whose libraries are not on
    the loader's path quietly falls back to the CPU. Older versions lack the function and
    rely on the system's libraries. A failure here is logged, not raised: the provider
    check after the session is made is what decides.
    """
    global _preloaded
    with _preload_lock:
        if _preloaded:
            return
        _preloaded = True
        preload = getattr(onnxruntime(), "preload_dlls", None)
        if preload is None:
            return
        try:
            preload()
        except Exception as exc:  # e.g. no nvidia-* wheels and no torch CUDA build
            log.warning("onnxruntime.preload_dlls() failed (%s); relying on the system's CUDA libraries", exc)


def check_providers(session: Any, requested: Sequence[str], model_path: Path | str = "") -> list[str]:
    """The providers ``session`` really runs on; raises :class:`EncoderDeviceError` if
    CUDA was requested and the session did not get it.

    ONNX Runtime does not fail when the CUDA provider cannot start (missing or mismatched
    CUDA/cuDNN libraries): it logs a warning and runs everything on the CPU, where fp16 is
    slower than the int8 CPU model. Failing here makes that misconfiguration visible.
    """
    got = list(session.get_providers())
    if CUDA in requested and CUDA not in got:
        raise EncoderDeviceError(
            f"encoder session for {model_path or 'the model'} asked for {CUDA} but runs on {got}: "
            "ONNX Runtime could not start CUDA (onnxruntime-gpu needs the CUDA and cuDNN libraries it was "
            "built for, e.g. from torch's CUDA build or the nvidia-* wheels; see the warning above). Fix the "
            "CUDA install, or run on the CPU with FRESHREC_ENCODER_PRECISION=int8"
        )
    return got


def resolve_precision(precision: str) -> str:
    """``auto`` means fp16 where ONNX Runtime has CUDA and the host a GPU, int8 otherwise."""
    if precision == "auto":
        return "fp16" if cuda_available() else "int8"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


class OnnxEncoder:
    """A :class:`~models.encoder.TextEncoder` over one exported ONNX file.

    ``precision`` says what the file holds (``fp32``, ``int8`` or ``fp16``). fp16 runs on
    CUDA when ONNX Runtime has it (on the CPU it runs, exactly enough, but slower than
    fp32); the others run on the CPU unless ``providers`` says otherwise. A session that
    asked for CUDA and did not get it raises :class:`EncoderDeviceError` rather than
    serve from the CPU unnoticed.
    """

    dim = DIM

    def __init__(
        self,
        model_path: Path | str,
        version: str = BASE_VERSION,
        precision: str = "int8",
        threads: int = 1,
        providers: Sequence[str] | None = None,
    ) -> None:
        ort = onnxruntime()
        self.version = version
        self.precision = precision
        self.model_path = Path(model_path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if providers is None:
            providers = [CUDA, CPU] if precision == "fp16" and cuda_available() else [CPU]
        if CUDA in providers:
            preload_cuda_libraries()
        self._session: Any = ort.InferenceSession(str(self.model_path), opts, providers=list(providers))
        self.providers: list[str] = check_providers(self._session, providers, self.model_path)
        self._tokenizer = FastTokenizer.shared()

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """float32 (len(texts), 384), rows L2-normalised; order follows ``texts``.

        More texts than ``batch_size`` are grouped by token length first, so a batch of
        short titles is not padded to the length of one long description.
        """
        n = len(texts)
        if n == 0:
            return np.zeros((0, DIM), dtype=np.float32)
        rows = self._tokenizer.ids(texts)
        if n <= batch_size:
            return self._run(rows)
        order = sorted(range(n), key=lambda i: len(rows[i]))
        out = np.empty((n, DIM), dtype=np.float32)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self._run([rows[i] for i in idx])
        return out

    def _run(self, rows: list[list[int]]) -> np.ndarray:
        ids, mask = self._tokenizer.pad(rows)
        vec = self._session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        vec = np.asarray(vec, dtype=np.float32)
        if self.precision == "fp16":
            # the in-graph normalisation ran in half precision; redo it in float32
            vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(vec)


def encoder_for(
    settings: Any,
    version: str,
    adapter_dir: Path | None,
    precision: str | None = None,
    threads: int | None = None,
) -> OnnxEncoder:
    """The ONNX encoder of adapter ``version``, exported once into ``state_dir/exports/<version>/``.

    ``adapter_dir`` is the adapter's folder from the registry (None for ``"base"``); it
    is read only when the version has no export yet. ``precision`` (default
    ``settings.encoder_precision``, itself ``auto``): ``auto`` is fp16 on CUDA and int8
    otherwise; ``threads`` defaults to ``settings.onnx_threads``. Raises :class:`models.export.ExportError` if a fresh export
    fails the parity check, and :class:`models.merge.AdapterLoadError` for an adapter
    that does not fit the base model.
    """
    resolved = resolve_precision(precision or str(getattr(settings, "encoder_precision", "auto")))
    path = ensure_export(Path(settings.state_dir) / "exports", version, adapter_dir, resolved)
    n_threads = threads if threads is not None else int(getattr(settings, "onnx_threads", 1))
    return OnnxEncoder(path, version=version, precision=resolved, threads=n_threads)
