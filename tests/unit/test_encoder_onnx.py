"""ONNX back end against PyTorch: parity, tokenizer, export cache, merged adapters.

One base-model export (fp32 + int8) is shared by the whole module: exporting and
quantising takes seconds.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from freshrec.contracts import CatalogItem  # noqa: E402
from freshrec.dataset import SAMPLE_DIR  # noqa: E402
from freshrec.settings import Settings  # noqa: E402
from models import export as export_mod  # noqa: E402
from models.encoder import MAX_TOKENS, TorchEncoder, load_tokenizer  # noqa: E402
from models.export import ExportError, check_version_name, ensure_export, model_file  # noqa: E402
from models.onnx_encoder import OnnxEncoder, encoder_for, resolve_precision  # noqa: E402
from models.tokenize import FastTokenizer  # noqa: E402

# Very different lengths on purpose: one padded batch must still match PyTorch per text.
TEST_TEXTS = [
    "a",
    "lamp",
    "WHITE HANGING HEART T-LIGHT HOLDER",
    "JUMBO BAG RED RETROSPOT | bags | " + "a sturdy reusable shopping bag with a red spotted print " * 8,
    "set of 3 cake tins pantry design | kitchen | tins for cakes, biscuits and sweets",
    "Ünïcödé café ñ — 日本語 🎉",
    "",
    "x " * 300,
    "red heart t-light holder",
    "PAPER CHAIN KIT 50'S CHRISTMAS",
]


def _catalog_texts(n: int) -> list[str]:
    with open(SAMPLE_DIR / "items.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:n]
    return [CatalogItem(**r).text() for r in rows]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    torch.set_num_threads(2)
    return Settings(state_dir=tmp_path_factory.mktemp("encoder-state"))


@pytest.fixture(scope="module")
def torch_encoder() -> TorchEncoder:
    return TorchEncoder()


@pytest.fixture(scope="module")
def catalog(torch_encoder: TorchEncoder) -> tuple[list[str], np.ndarray]:
    """Catalog texts and their PyTorch embeddings, computed once."""
    texts = _catalog_texts(128)
    return texts, torch_encoder.encode(texts)


@pytest.fixture(scope="module")
def fp32(settings: Settings) -> OnnxEncoder:
    return encoder_for(settings, "base", None, "fp32")


@pytest.fixture(scope="module")
def int8(settings: Settings, fp32: OnnxEncoder) -> OnnxEncoder:
    return encoder_for(settings, "base", None, "int8")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


def test_fast_tokenizer_matches_transformers_tokenizer() -> None:
    hf = load_tokenizer()
    fast = FastTokenizer.shared()
    texts = _catalog_texts(300) + TEST_TEXTS
    for start in range(0, len(texts), 64):
        chunk = texts[start : start + 64]
        ref = hf(chunk, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="np")
        ids, mask = fast.batch(chunk)
        np.testing.assert_array_equal(ids, ref["input_ids"])
        np.testing.assert_array_equal(mask, ref["attention_mask"])


def test_fp32_parity_on_every_text_in_one_padded_batch(fp32: OnnxEncoder, torch_encoder: TorchEncoder) -> None:
    ref = np.concatenate([torch_encoder.encode([t]) for t in TEST_TEXTS])  # each alone: no padding
    batched = fp32.encode(TEST_TEXTS)  # one batch padded to the longest text
    cos = _cos(batched, ref)
    assert cos.min() >= 0.9999, dict(zip(TEST_TEXTS, np.round(cos, 6)))
    single = np.concatenate([fp32.encode([t]) for t in TEST_TEXTS])
    assert _cos(single, ref).min() >= 0.9999
    assert batched.dtype == np.float32 and batched.shape == (len(TEST_TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_fp32_parity_on_catalog_sample(fp32: OnnxEncoder, catalog: tuple[list[str], np.ndarray]) -> None:
    texts, ref = catalog
    assert _cos(fp32.encode(texts, batch_size=32), ref).min() >= 0.9999


def test_int8_mean_cosine(int8: OnnxEncoder, catalog: tuple[list[str], np.ndarray], torch_encoder: TorchEncoder) -> None:
    texts, ref = catalog
    cos = np.concatenate([_cos(int8.encode(texts), ref), _cos(int8.encode(TEST_TEXTS), torch_encoder.encode(TEST_TEXTS))])
    assert cos.mean() >= 0.98, f"int8 mean cosine {cos.mean():.4f}"
    assert cos.min() >= 0.95, f"int8 worst cosine {cos.min():.4f}"


def test_length_grouped_batches_keep_input_order(fp32: OnnxEncoder) -> None:
    texts = TEST_TEXTS * 3
    grouped = fp32.encode(texts, batch_size=4)  # > batch_size: sorted by length internally
    plain = np.concatenate([fp32.encode([t]) for t in texts])
    assert _cos(grouped, plain).min() >= 0.9999
    assert fp32.encode([]).shape == (0, 384)


def test_export_is_cached_per_version(settings: Settings, fp32: OnnxEncoder) -> None:
    vdir = settings.state_dir / "exports" / "base"
    stamp = (vdir / "export.json").stat().st_mtime_ns
    again = encoder_for(settings, "base", None, "int8")
    assert again.version == "base" and again.model_path == model_file(vdir, "int8")
    assert (vdir / "export.json").stat().st_mtime_ns == stamp
    # no temp dirs (the per-version lock file of models.file_lock stays)
    assert sorted(p.name for p in (settings.state_dir / "exports").iterdir() if p.suffix != ".lock") == ["base"]


def test_damaged_export_is_made_again(
    settings: Settings, fp32: OnnxEncoder, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import shutil

    root = tmp_path / "exports"
    shutil.copytree(settings.state_dir / "exports" / "base", root / "base")
    with open(model_file(root / "base", "int8"), "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00" * 16)
    calls = []

    def fake_export(r: Path, version: str, adapter_dir: Path | None) -> None:
        calls.append(version)
        shutil.copytree(settings.state_dir / "exports" / "base", r / version)

    monkeypatch.setattr(export_mod, "_export_version", fake_export)
    assert ensure_export(root, "base", None, "int8") == model_file(root / "base", "int8")
    assert calls == ["base"]
    assert ensure_export(root, "base", None, "int8")  # intact now: no second export
    assert calls == ["base"]


def test_processes_asking_for_one_new_version_at_once_export_it_once(
    settings: Settings, fp32: OnnxEncoder, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The indexer and each serving replica learn of a version together; the first exports,
    the others wait on the version's lock and use its files."""
    import shutil
    import threading
    import time

    root = tmp_path / "exports"
    calls = []

    def slow_export(r: Path, version: str, adapter_dir: Path | None) -> None:
        calls.append(version)
        time.sleep(0.3)
        shutil.copytree(settings.state_dir / "exports" / "base", r / version)

    monkeypatch.setattr(export_mod, "_export_version", slow_export)
    got: list[Path] = []
    start = threading.Barrier(3)

    def ask() -> None:
        start.wait()
        got.append(ensure_export(root, "base", None, "int8"))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert calls == ["base"] and got == [model_file(root / "base", "int8")] * 3


def test_fp16_export_runs(settings: Settings, fp32: OnnxEncoder) -> None:
    enc = OnnxEncoder(ensure_export(settings.state_dir / "exports", "base", None, "fp16"), "base", "fp16")
    cos = _cos(enc.encode(TEST_TEXTS), fp32.encode(TEST_TEXTS))
    assert cos.min() >= 0.999


def test_version_names_and_precisions_are_checked(settings: Settings) -> None:
    with pytest.raises(ValueError, match="safe folder name"):
        check_version_name("../evil")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int4")
    assert resolve_precision("int8") == "int8"
    with pytest.raises(ValueError, match="takes no adapter folder"):
        ensure_export(settings.state_dir / "exports", "base", Path("/tmp/x"), "int8")


def test_export_refuses_a_graph_that_ignores_padding(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The 0.94 bug: an export that drops the mask must fail the parity gate, not be served."""

    def broken_export(model, path: Path) -> None:  # type: ignore[no-untyped-def]
        class NoMask(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                ones = torch.ones_like(attention_mask)
                out = self.inner(input_ids=input_ids, attention_mask=ones)
                return torch.nn.functional.normalize(out.last_hidden_state.mean(dim=1), dim=1) + 0 * attention_mask.sum()

        ids, mask = FastTokenizer.shared().batch(["a b", "c"])
        axes = {0: "b", 1: "t"}
        with export_mod._quiet_export_warnings():
            torch.onnx.export(
                NoMask(model).eval(),
                (torch.from_numpy(ids), torch.from_numpy(mask)),
                str(path),
                input_names=["input_ids", "attention_mask"],
                output_names=["embedding"],
                dynamic_axes={"input_ids": axes, "attention_mask": axes},
                opset_version=17,
                dynamo=False,
            )

    monkeypatch.setattr(export_mod, "export_fp32", broken_export)
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        ensure_export(tmp_path / "exports", "broken", None, "int8")
    assert not (tmp_path / "exports" / "broken").exists()
    # The temp folder is cleaned up too; only the version's empty lock file stays (until pruned).
    assert [p.name for p in (tmp_path / "exports").iterdir()] == [".broken.lock"]


def test_build_command_writes_a_restorable_index(settings: Settings, int8: OnnxEncoder, tmp_path: Path) -> None:
    """`freshrec index --build base --out DIR --items CSV`, then restore: identical results."""
    from indexer.cli import main
    from models.live_index import LiveIndex, SnapshotError

    with open(SAMPLE_DIR / "items.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:40]
    items_csv = tmp_path / "items.csv"
    with open(items_csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "index-base"
    assert main(["--build", "base", "--out", str(out), "--items", str(items_csv), "--quiet"], settings) == 0
    index = LiveIndex.restore(out, expected_version="base", use_gpu=False)
    assert len(index) == 40 and index.kind == "flat"
    texts = [CatalogItem(**r).text() for r in rows]
    queries = int8.encode(texts[:5])
    hits = index.search(queries, k=3)
    assert [h[0][0] for h in hits] == [r["item_id"] for r in rows[:5]]  # each item finds itself
    again = LiveIndex.restore(out, expected_version="base", use_gpu=False)
    assert again.search(queries, k=10, exclude={rows[0]["item_id"]}) == index.search(
        queries, k=10, exclude={rows[0]["item_id"]}
    )
    with pytest.raises(SnapshotError, match="expected 'v0002'"):
        LiveIndex.restore(out, expected_version="v0002")
    assert main(["--build", "base"], settings) == 2  # --out is required
