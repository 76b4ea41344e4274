"""One adapter version's item space in the evaluation, made the way serving makes its pair.

Serving ranks /recommend over a :class:`serving.pair.ServingPair`: the catalog encoded by
that version's ONNX export (int8 on a CPU, ``settings.encoder_precision``) into a
:class:`models.live_index.LiveIndex`, with a :class:`ranking.scoring.SimilarityScale`
fitted on the index's vectors. The evaluation builds the same three things with the same
functions, so the vectors it scores with are the vectors serving would hold:

- the encoder: ``models.onnx_encoder.encoder_for`` (export cached per version, the batch
  session on ``settings.indexer_threads`` threads, as ``serving.swap.default_tools``'s
  build uses);
- the index: ``models.build.build_index`` over the catalog in item-id order (serving's
  builder reads the Redis catalog sorted by id, so the same batches are encoded);
- the scale: :func:`pair_scale`, the fit ``serving.swap.PairBuilder`` does on each index it
  builds (sorted ids, at most ``serving.swap.SCALE_SAMPLE`` of them, seed 0).

Exports: the base version's goes where serving keeps it (``state_dir/exports/base``,
shared with serving and reused across runs, ~120 MB); adapter versions trained in an
evaluation run only exist in its temporary registry, so their exports go to a temporary
folder that is removed when the run ends (a name like ``v000002-1a2b3c4d`` could also be
a real version of the live registry, whose cached export must never be shadowed).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.build import build_index
from models.encoder import BASE_VERSION, TextEncoder
from models.live_index import LiveIndex
from ranking.scoring import SimilarityScale, scale_from_settings
from serving.pair import PairSpace
from serving.swap import SCALE_SAMPLE


class ItemText:
    """An item as ``models.build.build_index`` reads it: only its encoder text."""

    __slots__ = ("_text",)

    def __init__(self, text: str) -> None:
        self._text = text

    def text(self) -> str:
        return self._text


def catalog_of(item_ids: Sequence[str], texts: Sequence[str]) -> dict[str, ItemText]:
    """The catalog as serving's builder reads it from Redis: every item, sorted by id."""
    return {i: ItemText(texts[k]) for i, k in sorted((iid, k) for k, iid in enumerate(item_ids))}


def pair_scale(index: LiveIndex, settings: Any) -> SimilarityScale:
    """The :class:`SimilarityScale` serving's ``PairBuilder._similarity_scale`` fits on ``index``.

    The same ids (sorted, a seeded sample beyond ``SCALE_SAMPLE``), read back from the
    index in the same order: the parity test checks the result equals the live pair's.
    """
    ids = sorted(index.item_ids())
    if len(ids) > SCALE_SAMPLE:
        pick = np.random.default_rng(0).choice(len(ids), SCALE_SAMPLE, replace=False)
        ids = [ids[k] for k in np.sort(pick)]
    vectors = index.reconstruct_many(ids)
    if not vectors:
        return scale_from_settings(np.zeros((0, index.dim), dtype=np.float32), settings)
    return scale_from_settings(np.stack(list(vectors.values())), settings)


@dataclass(frozen=True)
class VersionSpace:
    """One version's index, its similarity scale and its vectors as a matrix in log item order.

    ``space`` is what ``ranking.scoring.recommend`` searches (serving's own
    :class:`serving.pair.PairSpace`); ``vectors`` serves the feature study and the tests.
    """

    version: str
    index: LiveIndex
    similarity: SimilarityScale
    vectors: np.ndarray  # (n_items, dim) float32, row k = item_ids[k]
    seconds: float = 0.0  # encoding and indexing time

    @property
    def space(self) -> PairSpace:
        return PairSpace(self.index)

    @classmethod
    def from_index(cls, index: LiveIndex, item_ids: Sequence[str], settings: Any, seconds: float = 0.0) -> VersionSpace:
        rows = index.reconstruct_many(item_ids)
        vectors = np.stack([rows[i] for i in item_ids]).astype(np.float32, copy=False)
        return cls(index.version, index, pair_scale(index, settings), vectors, seconds)

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, item_ids: Sequence[str], settings: Any, version: str = "eval") -> VersionSpace:
        """A space over given vectors (tests, studies): indexed in id order, as a build would."""
        index = LiveIndex(int(vectors.shape[1]), version, expected_items=len(item_ids))
        order = sorted(range(len(item_ids)), key=item_ids.__getitem__)
        if order:
            index.upsert([item_ids[k] for k in order], np.asarray(vectors, dtype=np.float32)[order])
        return cls.from_index(index, item_ids, settings)


def encode_space(encoder: TextEncoder, catalog: Mapping[str, Any], item_ids: Sequence[str], settings: Any) -> VersionSpace:
    """The catalog encoded into a new index by ``models.build.build_index``, as serving's builder does."""
    t0 = time.perf_counter()
    index = build_index(encoder, catalog, encoder.version)
    return VersionSpace.from_index(index, item_ids, settings, time.perf_counter() - t0)


def limit_faiss_threads(n: int) -> None:
    """One OpenMP thread per FAISS search, as serving sets ``serving_faiss_threads``.

    Measured in the evaluation: a flat search over 4.4k items took ~3 ms on the default
    threads of a busy 2-core box, spinning OpenMP workers; one thread is what serving
    runs with and is faster here too. It changes the process's FAISS setting, which is
    the evaluation's own process.
    """
    import faiss

    faiss.omp_set_num_threads(max(1, int(n)))


class ServingEncoders:
    """Each version's ONNX encoder at serving's precision, exported once per version.

    ``export_seconds`` sums the time spent exporting (merging, tracing, checking and
    quantising a version), so a run can report what evaluating like serving cost.
    """

    def __init__(self, settings: Any, adapter_exports: Path | None = None) -> None:
        self.settings = settings
        if adapter_exports is None:
            tmp = tempfile.mkdtemp(prefix="freshrec-eval-exports-")
            atexit.register(shutil.rmtree, tmp, True)
            adapter_exports = Path(tmp) / "exports"
        if adapter_exports.name != "exports":
            raise ValueError("adapter_exports must be a folder named 'exports' (encoder_for's layout)")
        self.adapter_state = adapter_exports.parent
        self.export_seconds = 0.0
        self.exports = 0

    def encoder(self, version: str, adapter_dir: Path | None) -> TextEncoder:
        """``models.onnx_encoder.encoder_for`` of ``version``, with the indexer's batch threads."""
        from models.onnx_encoder import encoder_for
        from serving.exporter import is_exported

        settings = self.settings
        if version == BASE_VERSION and settings.eval_encoder_dir is not None:
            return self._student(Path(settings.eval_encoder_dir))
        if version != BASE_VERSION:
            settings = settings.model_copy(update={"state_dir": self.adapter_state})
        fresh = not is_exported(settings, version)
        t0 = time.perf_counter()
        enc = encoder_for(settings, version, adapter_dir, settings.encoder_precision, threads=settings.indexer_threads)
        if fresh:
            self.export_seconds += time.perf_counter() - t0
            self.exports += 1
        return enc

    def _student(self, student_dir: Path) -> TextEncoder:
        """The distilled student of ``settings.eval_encoder_dir`` in the base version's place.

        Exported once into the student's own folder (never ``state_dir/exports/base``,
        which holds the bundled encoder's export serving shares), at serving's precision.
        """
        from models.onnx_encoder import resolve_precision
        from models.student import ONNX_DIR, student_encoder

        precision = resolve_precision(self.settings.encoder_precision)
        fresh = not (student_dir / ONNX_DIR).is_dir()
        t0 = time.perf_counter()
        enc = student_encoder(student_dir, precision, threads=self.settings.indexer_threads)
        if fresh:
            self.export_seconds += time.perf_counter() - t0
            self.exports += 1
        return enc
