"""LiveIndex: id mapping, upsert/delete, exclusion, snapshot/restore, for both index kinds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest

from freshrec.contracts import ItemVector
from models.live_index import FLAT_MAX_ITEMS, LiveIndex, SnapshotError, choose_kind

DIM = 16
KINDS = ["flat", "hnsw"]


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _filled(kind: str, n: int = 200, seed: int = 0) -> tuple[LiveIndex, list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    vecs = _unit(rng, n)
    ids = [f"item-{i}" for i in range(n)]
    index = LiveIndex(DIM, "v1", kind=kind, use_gpu=False)
    index.upsert(ids, vecs)
    return index, ids, vecs


def _exact_top(vecs: np.ndarray, ids: list[str], q: np.ndarray, k: int, exclude: set[str] = set()) -> list[str]:
    order = np.argsort(-(vecs @ q))
    return [ids[i] for i in order if ids[i] not in exclude][:k]


def test_choose_kind_by_catalog_size() -> None:
    assert choose_kind(2_772) == "flat"
    assert choose_kind(FLAT_MAX_ITEMS) == "flat"
    assert choose_kind(FLAT_MAX_ITEMS + 1) == "hnsw"
    assert LiveIndex(DIM, "v", expected_items=10, use_gpu=False).kind == "flat"


@pytest.mark.parametrize("kind", KINDS)
def test_search_finds_itself_first_and_matches_exact(kind: str) -> None:
    index, ids, vecs = _filled(kind)
    assert len(index) == 200 and "item-3" in index and "nope" not in index
    res = index.search(vecs[:5], k=10)
    assert [r[0][0] for r in res] == ids[:5]
    assert res[0][0][1] == pytest.approx(1.0, abs=1e-5)
    if kind == "flat":
        assert [i for i, _ in res[1]] == _exact_top(vecs, ids, vecs[1], 10)


@pytest.mark.parametrize("kind", KINDS)
def test_upsert_replaces_vector(kind: str) -> None:
    index, ids, vecs = _filled(kind)
    new = -vecs[7]
    index.upsert(["item-7"], new[None, :])
    assert len(index) == 200
    np.testing.assert_allclose(index.reconstruct("item-7"), new, atol=1e-6)
    # the old vector no longer finds item-7; the new one does
    assert index.search(vecs[7], k=1)[0][0][0] != "item-7"
    assert index.search(new, k=1)[0][0][0] == "item-7"
    # no stale copy: a full-depth search lists item-7 exactly once
    for hits in index.search(vecs[:10], k=200):
        assert [i for i, _ in hits].count("item-7") == 1


@pytest.mark.parametrize("kind", KINDS)
def test_upsert_repeated_id_in_one_batch_last_wins(kind: str) -> None:
    index = LiveIndex(DIM, "v1", kind=kind, use_gpu=False)
    v = _unit(np.random.default_rng(1), 2)
    assert index.upsert(["a", "a"], v) == 1
    assert len(index) == 1
    np.testing.assert_allclose(index.reconstruct("a"), v[1], atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_delete_removes_from_results(kind: str) -> None:
    index, ids, vecs = _filled(kind)
    assert index.delete(["item-0", "item-1", "unknown"]) == 2
    assert len(index) == 198 and "item-0" not in index
    assert index.reconstruct("item-0") is None
    for hits in index.search(vecs[:2], k=20):
        assert all(i not in {"item-0", "item-1"} for i, _ in hits)
        assert len(hits) == 20
    assert index.delete(["item-0"]) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_exclusion_overfetches_to_fill_k(kind: str) -> None:
    index, ids, vecs = _filled(kind)
    exclude = set(_exact_top(vecs, ids, vecs[0], 15)) | {"not-in-index"}
    hits = index.search(vecs[0], k=10, exclude=exclude)[0]
    assert len(hits) == 10
    assert not exclude & {i for i, _ in hits}
    if kind == "flat":
        assert [i for i, _ in hits] == _exact_top(vecs, ids, vecs[0], 10, exclude)


def test_search_edge_cases() -> None:
    index = LiveIndex(DIM, "v1", kind="flat", use_gpu=False)
    q = np.ones(DIM, dtype=np.float32)
    assert index.search(q, k=5) == [[]]
    index.upsert(["a", "b"], _unit(np.random.default_rng(2), 2))
    assert len(index.search(q, k=5)[0]) == 2  # fewer items than k: no -1 padding leaks
    assert index.search(np.stack([q, q]), k=0) == [[], []]
    assert index.search(q, k=5, exclude={"a", "b"}) == [[]]
    with pytest.raises(ValueError, match=r"shape \(n, 16\)"):
        index.search(np.ones(5, dtype=np.float32), k=1)
    with pytest.raises(ValueError, match="2 ids but 1 vectors"):
        index.upsert(["x", "y"], q[None, :])
    with pytest.raises(ValueError, match="NaN"):
        index.upsert(["x"], np.full((1, DIM), np.nan, dtype=np.float32))


def test_hnsw_tombstones_then_compacts() -> None:
    index, ids, vecs = _filled("hnsw", n=100)
    index.compact_ratio = 0.5
    index.delete(ids[:30])
    assert index.tombstones == 30
    index.upsert(ids[30:45], vecs[30:45])  # replacements tombstone too: 45 > 0.5 * 70 -> compact
    assert index.tombstones == 0
    assert len(index) == 70
    assert index.search(vecs[50], k=1)[0][0][0] == "item-50"
    assert all(i not in set(ids[:30]) for i, _ in index.search(vecs[0], k=70)[0])


def test_apply_item_vectors_skips_other_versions() -> None:
    index = LiveIndex(DIM, "v1", kind="flat", use_gpu=False)
    v = _unit(np.random.default_rng(3), 3)
    report = index.apply(
        [
            ItemVector("a", "v1", v[0]),
            ItemVector("b", "v1", v[1]),
            ItemVector("c", "v0", v[2]),
            ItemVector("b", "v1", None),  # later delete of b wins
        ]
    )
    assert (report.upserted, report.deleted, report.skipped) == (1, 0, 1)
    assert index.item_ids() == ["a"]
    assert index.apply([ItemVector("a", "v1", None)]).deleted == 1
    assert len(index) == 0


def test_reconstruct_many() -> None:
    index, ids, vecs = _filled("flat", n=10)
    got = index.reconstruct_many(["item-2", "missing", "item-5"])
    assert list(got) == ["item-2", "item-5"]
    np.testing.assert_allclose(got["item-5"], vecs[5], atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_snapshot_then_restore_gives_identical_results(kind: str, tmp_path: Path) -> None:
    index, ids, vecs = _filled(kind)
    index.delete(["item-3"])
    index.upsert(["item-4", "new"], _unit(np.random.default_rng(9), 2))
    path = index.snapshot(tmp_path / "snap")
    restored = LiveIndex.restore(path, expected_version="v1", use_gpu=False)
    assert restored.version == "v1" and restored.kind == kind
    assert sorted(restored.item_ids()) == sorted(index.item_ids())
    q = _unit(np.random.default_rng(5), 20)
    assert restored.search(q, k=10, exclude={"item-9"}) == index.search(q, k=10, exclude={"item-9"})
    np.testing.assert_array_equal(restored.reconstruct("new"), index.reconstruct("new"))
    # the restored index keeps working: ids do not collide with old ones
    restored.upsert(["newer"], q[:1])
    assert restored.search(q[0], k=1)[0][0][0] == "newer"
    assert restored.reconstruct("new") is not None


def test_snapshot_overwrites_atomically(tmp_path: Path) -> None:
    index, _, _ = _filled("flat", n=10)
    index.snapshot(tmp_path / "snap")
    index.delete(["item-0"])
    index.snapshot(tmp_path / "snap")
    assert len(LiveIndex.restore(tmp_path / "snap", use_gpu=False)) == 9
    assert [p.name for p in tmp_path.iterdir()] == ["snap"]  # no temp or old folders left


def test_restore_refuses_wrong_version(tmp_path: Path) -> None:
    index, _, _ = _filled("flat", n=10)
    index.snapshot(tmp_path / "snap")
    with pytest.raises(SnapshotError, match=r"built with adapter version 'v1', expected 'v2'"):
        LiveIndex.restore(tmp_path / "snap", expected_version="v2")


def test_restore_refuses_corrupt_index_file(tmp_path: Path) -> None:
    index, _, _ = _filled("flat", n=10)
    path = index.snapshot(tmp_path / "snap")
    blob = bytearray((path / "index.faiss").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (path / "index.faiss").write_bytes(bytes(blob))
    with pytest.raises(SnapshotError, match="corrupt: checksum"):
        LiveIndex.restore(path)


def test_restore_refuses_tampered_ids_and_missing_files(tmp_path: Path) -> None:
    index, _, _ = _filled("flat", n=10)
    path = index.snapshot(tmp_path / "snap")
    ids = orjson.loads((path / "ids.json").read_bytes())
    ids["items"][0] = "someone-else"
    (path / "ids.json").write_bytes(orjson.dumps(ids))
    with pytest.raises(SnapshotError, match="corrupt"):
        LiveIndex.restore(path)
    (path / "index.faiss").unlink()
    with pytest.raises(SnapshotError, match="unreadable"):
        LiveIndex.restore(path)
    shutil.rmtree(path)
    with pytest.raises(SnapshotError, match="no index snapshot"):
        LiveIndex.restore(path)


def test_restore_refuses_inconsistent_metadata(tmp_path: Path) -> None:
    index, _, _ = _filled("flat", n=10)
    path = index.snapshot(tmp_path / "snap")
    meta = orjson.loads((path / "meta.json").read_bytes())
    meta["count"] = 11  # checksum covers the data files; counts are cross-checked
    (path / "meta.json").write_bytes(orjson.dumps(meta))
    with pytest.raises(SnapshotError, match="inconsistent: 10 ids for a recorded count of 11"):
        LiveIndex.restore(path)
    meta["format"] = 99
    (path / "meta.json").write_bytes(orjson.dumps(meta))
    with pytest.raises(SnapshotError, match="format 99"):
        LiveIndex.restore(path)


def _fake_gpu(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """FAISS's GPU copy stood in by a CPU clone: this machine has no GPU, and FAISS's GPU
    search itself is FAISS's; what is tested is the mirror's own logic. Returns the sizes
    of the uploads, in order."""
    import faiss

    uploads: list[int] = []

    def fake_to_gpu(res: object, device: int, index: faiss.Index) -> faiss.Index:
        uploads.append(index.ntotal)
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", fake_to_gpu, raising=False)
    return uploads


def test_gpu_mirror_maps_positions_and_updates_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """Upserts, replacements and deletes reach the GPU copy one by one: one upload in all
    (the first build), and every search matches the CPU index's."""
    uploads = _fake_gpu(monkeypatch)
    gpu = LiveIndex(DIM, "v1", kind="flat")
    cpu, ids, vecs = _filled("flat", n=50)
    assert gpu._gpu is not None
    gpu.upsert(ids, vecs)
    assert uploads == [50]
    q = _unit(np.random.default_rng(4), 5)
    assert gpu.search(q, k=8) == cpu.search(q, k=8)
    for index in (gpu, cpu):
        index.delete(["item-1", "item-2"])
        index.upsert(["item-4", "new-1"], np.vstack([-vecs[4:5], vecs[9:10]]))
        index.apply([ItemVector(item_id="item-7", adapter_version="v1", vector=None)])
    assert gpu.search(q, k=8, exclude={"item-9"}) == cpu.search(q, k=8, exclude={"item-9"})
    assert gpu.search(q, k=60) == cpu.search(q, k=60)  # all of it, tombstones skipped
    assert gpu._gpu.dead == 4 and gpu._gpu.used == 52
    assert uploads == [50]  # no re-upload after the changes


def test_gpu_mirror_rebuilds_off_the_lock_and_replays_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the tombstone limit the writer rebuilds the copy: the upload runs while another
    thread can take the index lock, and a change made during the upload is not lost."""
    import threading

    import faiss

    import models.live_index as live_index

    monkeypatch.setattr(live_index, "_GPU_MAX_DEAD", 3)
    uploads = _fake_gpu(monkeypatch)
    gpu = LiveIndex(DIM, "v1", kind="flat")
    cpu, ids, vecs = _filled("flat", n=40)
    gpu.upsert(ids, vecs)
    mid = _unit(np.random.default_rng(6), 2)
    lock_free_during_upload: list[bool] = []
    real_to_gpu = faiss.index_cpu_to_gpu

    def slow_upload(res: object, device: int, index: faiss.Index) -> faiss.Index:
        other = threading.Thread(target=lambda: lock_free_during_upload.append(_try_lock(gpu)))
        other.start()
        other.join()
        # a writer that comes in meanwhile (its own refresh sees a rebuild under way)
        for target in (gpu, cpu):
            target.upsert(["mid-upload", "item-0"], mid)
        return real_to_gpu(res, device, index)

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", slow_upload)
    for index in (gpu, cpu):
        index.delete(["item-1", "item-2", "item-3"])
    assert lock_free_during_upload == []  # 3 tombstones: at the limit, no rebuild yet
    for index in (gpu, cpu):
        index.delete(["item-5"])
    assert lock_free_during_upload == [True]
    assert len(uploads) == 2 and uploads[1] == 36  # the live rows at the time of the copy
    assert gpu._gpu is not None and gpu._gpu.journal is None
    assert gpu._gpu.dead == 1  # item-0 replaced during the upload
    q = _unit(np.random.default_rng(7), 5)
    assert gpu.search(q, k=10) == cpu.search(q, k=10)
    assert gpu.search(q, k=50) == cpu.search(q, k=50)
    assert [h[0] for h in gpu.search(mid[:1], k=1)[0]] == ["mid-upload"]


def _try_lock(index: LiveIndex) -> bool:
    got = index._lock.acquire(timeout=2)
    if got:
        index._lock.release()
    return got


def test_gpu_mirror_restore_builds_before_the_first_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, _, _ = _filled("flat", n=30)
    path = cpu.snapshot(tmp_path / "snap")
    uploads = _fake_gpu(monkeypatch)
    restored = LiveIndex.restore(path)
    assert uploads == [30]
    q = _unit(np.random.default_rng(8), 3)
    assert restored.search(q, k=5) == cpu.search(q, k=5)


def test_gpu_mirror_deep_search_falls_back_to_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import models.live_index as live_index

    _fake_gpu(monkeypatch)
    monkeypatch.setattr(live_index, "_GPU_MAX_K", 8)
    gpu = LiveIndex(DIM, "v1", kind="flat")
    cpu, ids, vecs = _filled("flat", n=20)
    gpu.upsert(ids, vecs)
    assert gpu._gpu is not None
    calls: list[int] = []
    real = gpu._gpu.search
    monkeypatch.setattr(gpu._gpu, "search", lambda q, k: calls.append(k) or real(q, k))
    q = _unit(np.random.default_rng(9), 2)
    assert gpu.search(q, k=5) == cpu.search(q, k=5)
    assert gpu.search(q, k=12) == cpu.search(q, k=12)
    assert calls == [5]


def test_gpu_failure_falls_back_to_the_cpu(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A GPU copy that cannot be made (out of memory, say) never fails the write: the CPU
    index has the change, searches run there, and the log says why."""
    import faiss

    _fake_gpu(monkeypatch)

    def no_memory(res: object, device: int, index: faiss.Index) -> faiss.Index:
        raise RuntimeError("cudaMalloc error out of memory")

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", no_memory)
    gpu = LiveIndex(DIM, "v1", kind="flat")
    cpu, ids, vecs = _filled("flat", n=20)
    assert gpu.upsert(ids, vecs) == 20
    assert gpu._gpu is None
    q = _unit(np.random.default_rng(10), 3)
    assert gpu.search(q, k=5) == cpu.search(q, k=5)
    assert any("searching on the CPU" in r.getMessage() for r in caplog.records)


def test_gpu_rebuild_uploads_with_the_other_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    """FAISS GPU resources are not thread-safe: a rebuild uploads (off the lock) with the
    resources object that the live copy, still searched meanwhile, does not use."""
    import faiss

    import models.live_index as live_index

    made: list[object] = []
    used: list[object] = []

    def resources() -> object:
        made.append(object())
        return made[-1]

    def to_gpu(res: object, device: int, index: faiss.Index) -> faiss.Index:
        used.append(res)
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "StandardGpuResources", resources, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(live_index, "_GPU_MAX_DEAD", 0)
    gpu = LiveIndex(DIM, "v1", kind="flat", use_gpu=True)
    _, ids, vecs = _filled("flat", n=10)
    gpu.upsert(ids, vecs)  # first build
    gpu.delete(["item-1"])  # one tombstone > 0: rebuild
    gpu.delete(["item-2"])  # and again
    assert len(made) == 2 and len(used) == 3
    assert used[0] is not used[1] and used[1] is not used[2]
