"""Pure indexer logic: change batches, micro-batches, item vectors, build_index, checkpoints."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import orjson
import pytest

from freshrec.contracts import CatalogDelete, CatalogItem
from freshrec.settings import Settings
from models.build import build_index
from indexer.changes import collect_changes, item_vectors, micro_batches
from indexer.process import read_checkpoint, write_checkpoint


class HashEncoder:
    """Deterministic stand-in for the model: a unit vector seeded by the text's hash."""

    dim = 8

    def __init__(self, version: str = "v1") -> None:
        self.version = version
        self.calls: list[int] = []

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        self.calls.append(len(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim)
            out[i] = v / np.linalg.norm(v)
        return out


def _item(i: str, title: str = "thing") -> bytes:
    return CatalogItem(item_id=i, title=f"{title} {i}", category="c").to_bytes()


def test_collect_changes_keeps_last_record_per_item() -> None:
    raws = [
        _item("a", "old"),
        _item("b"),
        CatalogDelete(item_id="b").to_bytes(),
        _item("a", "new"),
        CatalogDelete(item_id="c").to_bytes(),
        _item("c"),  # re-created after its delete
        b"{not json",
        orjson.dumps({"item_id": "d", "title": ""}),
    ]
    batch = collect_changes(raws)
    assert batch.upserts["a"].title == "new a"
    assert set(batch.upserts) == {"a", "c"} and set(batch.deletes) == {"b"}
    assert len(batch) == 3
    assert [err.field for err, _ in batch.invalid] == ["record", "title"]
    assert batch.invalid[0][1] == b"{not json"


def test_micro_batches_split_upserts_and_put_deletes_first() -> None:
    batch = collect_changes([_item(str(i)) for i in range(5)] + [CatalogDelete(item_id="x").to_bytes()])
    chunks = list(micro_batches(batch, 2))
    assert [(len(c.deletes), len(c.upserts)) for c in chunks] == [(1, 0), (0, 2), (0, 2), (0, 1)]
    assert [i for c in chunks for i in c.upserts] == ["0", "1", "2", "3", "4"]


def test_item_vectors_are_tagged_and_deletes_are_none() -> None:
    enc = HashEncoder("v7")
    batch = collect_changes([_item("a"), _item("b"), CatalogDelete(item_id="z", ts=5.0).to_bytes()])
    vecs = {v.item_id: v for v in item_vectors(enc, batch)}
    assert {v.adapter_version for v in vecs.values()} == {"v7"}
    assert vecs["z"].vector is None and vecs["z"].ts == 5.0
    np.testing.assert_allclose(vecs["a"].vector, enc.encode(["thing a | c"])[0])
    assert enc.calls[0] == 2  # one encode call per micro-batch
    assert item_vectors(enc, collect_changes([])) == []


def test_build_index_encodes_item_text_and_reports_progress() -> None:
    enc = HashEncoder("v2")
    items = {str(i): CatalogItem(item_id=str(i), title=f"item {i}", category="cat") for i in range(10)}
    seen: list[tuple[int, int]] = []
    index = build_index(enc, items, "v2", lambda done, total: seen.append((done, total)), batch_size=4)
    assert len(index) == 10 and index.version == "v2" and index.kind == "flat"
    assert seen == [(0, 10), (4, 10), (8, 10), (10, 10)]
    assert index.search(enc.encode(["item 3 | cat"]), k=1)[0][0][0] == "3"
    assert build_index(enc, {}, None).version == "v2"


def test_build_index_with_tqdm_bar(capsys: pytest.CaptureFixture[str]) -> None:
    items = {"a": CatalogItem(item_id="a", title="a")}
    assert len(build_index(HashEncoder(), items, "v1", progress=True)) == 1
    assert "encoding items" in capsys.readouterr().err


def test_build_index_refuses_a_version_mismatch() -> None:
    with pytest.raises(ValueError, match="version 'v2' with an encoder of version 'v1'"):
        build_index(HashEncoder("v1"), {}, "v2")


def test_checkpoint_roundtrip_and_foreign_topic(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, topic_prefix="a.")
    assert read_checkpoint(settings) is None
    write_checkpoint(settings, {0: 5, 3: 12})
    assert read_checkpoint(settings) == {0: 5, 3: 12}
    assert read_checkpoint(Settings(state_dir=tmp_path, topic_prefix="b.")) is None


def test_prune_exports_keeps_newest_and_protected(tmp_path: Path) -> None:
    from models.export import EXPORT_FORMAT, prune_exports

    for n, name in enumerate(["v1", "v2", "v3", "v4"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "export.json").write_bytes(orjson.dumps({"format": EXPORT_FORMAT, "created": float(n)}))
    (tmp_path / ".v5.tmp-x").mkdir()  # an export in progress is never touched
    (tmp_path / "stray").mkdir()  # nor a folder that is not an export
    for name in ("v1", "v2", "v4"):
        (tmp_path / f".{name}.lock").touch()  # lock files left by the exports
    assert sorted(prune_exports(tmp_path, keep=2, protect={"v1"})) == ["v2"]
    # A pruned version's lock file goes with it; the kept versions' stay.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".v1.lock", ".v4.lock", ".v5.tmp-x", "stray", "v1", "v3", "v4"]
    assert prune_exports(tmp_path / "missing", keep=1) == []
