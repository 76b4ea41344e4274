"""Export the (merged) encoder to ONNX, quantise it, and cache the files per adapter version.

The graph takes ``input_ids`` and ``attention_mask`` (int64, batch x tokens, both axes
dynamic) and returns the final embedding: masked mean pooling and L2 normalisation are
inside it, so no back end re-implements them.

Padding and the mask: a naive export of this model was reported to give cosine 0.94
against PyTorch on padded batches (a graph that pools or attends over padding tokens
does exactly that). With transformers 5.24 and the TorchScript exporter, even a trace of
one unpadded text keeps the mask path (checked), but transformers' attention-mask code
has elided an all-ones mask during tracing in other versions. So the export traces a
padded batch (:data:`PROBE_TEXTS` mixes a one-word text with one longer than
``MAX_TOKENS``), and every export is checked against PyTorch on those texts in one padded
batch before it is used (:class:`ExportError` below cosine 0.9999).

int8 is dynamic quantisation in ONNX Runtime's block-wise form (``MatMulNBits``, 8 bits,
blocks of 32 along the input dimension, ``accuracy_level=4``): weights are stored int8
per block, activations are quantised to int8 per row and block at run time, and the
MatMuls run in integer arithmetic (VNNI where the CPU has it). Measured on the bundled
catalog (2,772 item texts, fp32 ONNX as reference, same run):

====================================  =========  =========  ==============  ===========
recipe                                cos mean   cos min    top-10 overlap  batch-1 ms
====================================  =========  =========  ==============  ===========
fp32 (reference)                      1          1          1               7.6
``quantize_dynamic`` per-tensor       0.967      0.927      0.846           -
``quantize_dynamic`` per-channel      0.993      0.986      0.916           1.77
MatMulNBits 8-bit, block 128          0.9991     0.998      0.973           1.73
MatMulNBits 8-bit, block 32 (used)    0.9997     0.9994     0.983           1.94
====================================  =========  =========  ==============  ===========

(timings under heavy load from other work; ratios are what carry over.) Besides being
closer to fp32, the block-wise form is *batch-invariant*: ``quantize_dynamic`` quantises
each activation tensor with one scale for the whole batch, padding included, so a text's
vector depended on the other texts encoded with it (cosine 0.986 between a text alone and
in a batch); per-row blocks keep each text to itself, as mean pooling over the mask
intends. ``quantize_dynamic`` stays available (``method="dynamic"``): it is about twice as
fast on 64-text batches, where per-row quantisation pays more overhead.

The cache: ``<state_dir>/exports/<version>/`` holds ``encoder.fp32.onnx``,
``encoder.int8.onnx`` (both made at once), ``encoder.fp16.onnx`` (made on first request)
and ``export.json`` (sha256 of each file, parity, versions). A version folder is built in a
temporary sibling and renamed into place, so a reader never sees half an export, and two
processes exporting one version at once both end up with one complete folder.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import orjson

from freshrec.files import file_sha256

from .encoder import BASE_VERSION, MAX_TOKENS
from .file_lock import exclusive
from .tokenize import FastTokenizer

log = logging.getLogger(__name__)

Precision = Literal["fp32", "int8", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "int8", "fp16")
OPSET = 17  # TorchScript exporter's well-trodden opset; ONNX Runtime 1.18+ runs it
MIN_PARITY_COSINE = 0.9999
INT8_BLOCK = 32
EXPORT_FORMAT = 1
_META = "export.json"
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

PROBE_TEXTS: tuple[str, ...] = (
    "lamp",
    "WHITE HANGING HEART T-LIGHT HOLDER | home decor",
    "JUMBO BAG RED RETROSPOT | bags | " + "a sturdy reusable shopping bag with a red spotted print " * 6,
    "set of 3 cake tins pantry design",
)


class ExportError(RuntimeError):
    """An export that must not be used (it disagrees with PyTorch, or could not be made)."""


def model_file(version_dir: Path, precision: str) -> Path:
    return Path(version_dir) / f"encoder.{precision}.onnx"


def check_version_name(version: str) -> str:
    """Versions name folders: letters, digits, ``.``, ``_``, ``-`` only."""
    if not _VERSION_RE.match(version):
        raise ValueError(f"adapter version {version!r} is not a safe folder name (letters, digits, . _ - only)")
    return version


# ---------------------------------------------------------------------------------------
# Export, quantisation, conversion


def export_fp32(model, path: Path) -> None:  # type: ignore[no-untyped-def]
    """Write ``model`` (a bare or merged transformer) with pooling and norm to ``path``."""
    import torch

    from .encoder import mean_pool

    class _Pooled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
            return mean_pool(out.last_hidden_state, attention_mask)

    ids, mask = FastTokenizer.shared().batch(PROBE_TEXTS)
    wrapped = _Pooled(model.to("cpu").eval()).eval()
    axes = {0: "batch", 1: "tokens"}
    with torch.no_grad(), _quiet_export_warnings():
        torch.onnx.export(
            wrapped,
            (torch.from_numpy(ids), torch.from_numpy(mask)),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "embedding": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            # The dynamo exporter in torch 2.13 emitted a graph ONNX Runtime rejects for
            # this model (a duplicated output name); the TorchScript one is exact here.
            dynamo=False,
        )


def quantize_int8(fp32_path: Path, out_path: Path, method: str = "blockwise") -> None:
    """int8 weights and integer MatMuls; ``blockwise`` (default) or ``dynamic`` (see above)."""
    if method == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            str(fp32_path),
            str(out_path),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            # attention's activation x activation MatMuls cost accuracy for no speed
            extra_options={"MatMulConstBOnly": True},
        )
        return
    if method != "blockwise":
        raise ValueError(f"int8 method must be 'blockwise' or 'dynamic', got {method!r}")
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4, bits=8)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(fp32_path)), bits=8, block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=4, algo_config=config
    )
    with _quiet_logging():
        quantizer.process()
    quantizer.model.save_model_to_file(str(out_path), use_external_data_format=False)


def convert_fp16(fp32_path: Path, out_path: Path) -> None:
    """fp16 weights and compute for CUDA; inputs and output stay int64/float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))


def parity(model, onnx_path: Path, texts: tuple[str, ...] = PROBE_TEXTS) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Cosine of the ONNX embedding against PyTorch for each text, all in one padded batch."""
    import torch

    from .backends import onnxruntime
    from .encoder import TorchEncoder

    ort = onnxruntime()

    with torch.inference_mode():
        ref = TorchEncoder(model=model.to("cpu").eval()).encode(list(texts))
    ids, mask = FastTokenizer.shared().batch(texts)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    return np.sum(got * ref, axis=1)


# ---------------------------------------------------------------------------------------
# The per-version cache


def ensure_export(exports_root: Path, version: str, adapter_dir: Path | None, precision: str) -> Path:
    """The ONNX file of ``version`` at ``precision``, exporting it first if the cache lacks it.

    ``adapter_dir`` is the adapter's folder (None for the base model); it is read only when
    the version has no complete export yet. A cached file whose sha256 no longer matches is
    exported again. Raises :class:`ExportError` if a fresh export fails the parity check.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    check_version_name(version)
    if version == BASE_VERSION and adapter_dir is not None:
        raise ValueError(f"version {BASE_VERSION!r} is the bare model; it takes no adapter folder")
    root = Path(exports_root)
    vdir = root / version
    meta = _read_meta(vdir)
    if meta is not None and not _files_ok(vdir, meta, ("fp32", "int8")):
        log.warning("export of %s at %s is damaged; exporting it again", version, vdir)
        shutil.rmtree(vdir, ignore_errors=True)
        meta = None
    if meta is None:
        # Once per version: the indexer and every serving replica learn of a version at the
        # same moment; the first exports, the others wait here and find its files.
        with exclusive(root / f".{version}.lock", f"the ONNX export of {version}"):
            meta = _read_meta(vdir)
            if meta is None:
                _export_version(root, version, adapter_dir)
                meta = _read_meta(vdir)
        if meta is None:
            raise ExportError(f"export of {version} at {vdir} has no {_META} after exporting")
    if precision == "fp16" and not _files_ok(vdir, meta, ("fp16",)):
        _add_fp16(vdir)
    return model_file(vdir, precision)


def prune_exports(exports_root: Path, keep: int, protect: Iterable[str] = ()) -> list[str]:
    """Delete all but the ``keep`` most recent version exports (and any in ``protect``).

    Each export takes ~200 MB, and a learner publishing every few minutes would fill the
    disk. A process already serving a pruned version is unaffected (ONNX Runtime holds
    the model in memory); activating it again later exports it again. Returns the names
    removed.
    """
    root = Path(exports_root)
    if not root.is_dir():
        return []
    versions = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _read_meta(p) is not None]
    versions.sort(key=lambda p: float((_read_meta(p) or {}).get("created", 0.0)), reverse=True)
    keep_names = {p.name for p in versions[: max(keep, 0)]} | set(protect)
    removed = []
    for p in versions:
        if p.name not in keep_names:
            shutil.rmtree(p, ignore_errors=True)
            # Its empty lock file goes too, or one would pile up per version ever published.
            # Pruned versions are old ones nobody is exporting; one activated again later
            # simply creates a fresh lock.
            (root / f".{p.name}.lock").unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def _export_version(root: Path, version: str, adapter_dir: Path | None) -> None:
    from .merge import merged_model

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=root))
    try:
        started = time.perf_counter()
        model = merged_model(adapter_dir, "cpu")
        fp32 = model_file(tmp, "fp32")
        export_fp32(model, fp32)
        cos = parity(model, fp32)
        if float(cos.min()) < MIN_PARITY_COSINE:
            raise ExportError(
                f"ONNX export of {version} disagrees with PyTorch: cosine {np.round(cos, 5).tolist()} on the probe "
                f"texts, need >= {MIN_PARITY_COSINE} (is the attention mask traced? see models/export.py)"
            )
        quantize_int8(fp32, model_file(tmp, "int8"))
        import torch

        from .backends import onnxruntime

        meta = {
            "format": EXPORT_FORMAT,
            "version": version,
            "adapter_dir": str(adapter_dir) if adapter_dir is not None else None,
            "opset": OPSET,
            "int8": f"MatMulNBits bits=8 block={INT8_BLOCK} accuracy_level=4",
            "max_tokens": MAX_TOKENS,
            "parity_min_cosine": float(cos.min()),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime().__version__,
            "created": time.time(),
            "export_seconds": round(time.perf_counter() - started, 2),
            "sha256": {p: file_sha256(model_file(tmp, p)) for p in ("fp32", "int8")},
        }
        (tmp / _META).write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
        tmp.chmod(0o755)  # mkdtemp makes it private; exports are shared by processes
        try:
            os.rename(tmp, root / version)
        except OSError:
            if _read_meta(root / version) is None:  # not a concurrent winner: a real failure
                raise
            log.info("another process exported %s first; using its files", version)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _add_fp16(vdir: Path) -> None:
    tmp = vdir / f".encoder.fp16.{uuid.uuid4().hex[:8]}.tmp"
    try:
        convert_fp16(model_file(vdir, "fp32"), tmp)
        digest = file_sha256(tmp)
        os.replace(tmp, model_file(vdir, "fp16"))
    finally:
        tmp.unlink(missing_ok=True)
    meta = _read_meta(vdir) or {}
    meta.setdefault("sha256", {})["fp16"] = digest
    meta_tmp = vdir / f".{_META}.{uuid.uuid4().hex[:8]}.tmp"
    meta_tmp.write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
    os.replace(meta_tmp, vdir / _META)


def _read_meta(vdir: Path) -> dict | None:
    try:
        meta = orjson.loads((vdir / _META).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT else None


def _files_ok(vdir: Path, meta: dict, precisions: tuple[str, ...]) -> bool:
    sums = meta.get("sha256", {})
    for p in precisions:
        f = model_file(vdir, p)
        if p not in sums or not f.is_file() or file_sha256(f) != sums[p]:
            return False
    return True


class _quiet_logging:
    """The quantiser logs every node it visits at INFO on the root logger."""

    def __enter__(self) -> None:
        root = logging.getLogger()
        self._level = root.level
        root.setLevel(max(self._level, logging.WARNING))

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().setLevel(self._level)


class _quiet_export_warnings:
    """The TorchScript exporter warns about every traced Python branch; none matter here."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)
