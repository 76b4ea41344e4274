"""models.encodings: a version's catalog vectors are encoded once, reused by text, shared under a lock."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from models.encodings import encode_catalog, prune_encodings, store_path, text_digest

DIM = 8


@dataclass
class Item:
    title: str

    def text(self) -> str:
        return self.title


class CountingEncoder:
    """A deterministic encoder that counts the texts it was asked for (and can be slow)."""

    def __init__(self, version: str = "v1", precision: str = "int8", delay_s: float = 0.0) -> None:
        self.version, self.precision, self.dim, self.delay_s = version, precision, DIM, delay_s
        self.texts: list[str] = []
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            self.texts.extend(texts)
        time.sleep(self.delay_s)
        rows = [np.frombuffer(hashlib.sha256(f"{self.version}|{t}".encode()).digest()[:DIM], dtype=np.uint8) for t in texts]
        out = np.stack(rows).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _items(n: int, prefix: str = "title") -> dict[str, Item]:
    return {f"i{k:03d}": Item(f"{prefix} {k}") for k in range(n)}


def test_a_second_build_reuses_every_vector_and_gets_the_same_ones(tmp_path: Path) -> None:
    items = _items(50)
    first, second = CountingEncoder(), CountingEncoder()
    ids1, vec1, rep1 = encode_catalog(tmp_path, first, items, batch_size=16)
    ids2, vec2, rep2 = encode_catalog(tmp_path, second, items, batch_size=16)
    assert (rep1.encoded, rep1.reused, rep1.stored) == (50, 0, True)
    assert (rep2.encoded, rep2.reused, rep2.stored) == (0, 50, False)
    assert second.texts == [] and ids1 == ids2 == list(items)
    np.testing.assert_array_equal(vec1, vec2)
    np.testing.assert_array_equal(vec1, first.encode([i.text() for i in items.values()]))


def test_only_changed_and_new_items_are_encoded_and_the_store_follows(tmp_path: Path) -> None:
    items = _items(30)
    encode_catalog(tmp_path, CountingEncoder(), items)
    items["i005"] = Item("a new title for five")
    items["new"] = Item("a new item")
    del items["i010"]
    enc = CountingEncoder()
    ids, vectors, rep = encode_catalog(tmp_path, enc, items)
    assert sorted(enc.texts) == ["a new item", "a new title for five"]
    assert (rep.encoded, rep.reused, rep.stored) == (2, 28, True)
    np.testing.assert_array_equal(vectors, CountingEncoder().encode([items[i].text() for i in ids]))
    third = CountingEncoder()
    assert encode_catalog(tmp_path, third, items)[2].encoded == 0 and third.texts == []


def test_versions_and_precisions_are_stored_apart(tmp_path: Path) -> None:
    items = _items(10)
    encode_catalog(tmp_path, CountingEncoder("v1"), items)
    for other in (CountingEncoder("v2"), CountingEncoder("v1", precision="fp16")):
        assert encode_catalog(tmp_path, other, items)[2].encoded == 10
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["v1-fp16.npz", "v1-int8.npz", "v2-int8.npz"]


def test_a_digest_ending_in_a_zero_byte_survives_the_round_trip(tmp_path: Path) -> None:
    """numpy's fixed-width bytes strip trailing zeros; the store keeps digests as uint8 rows."""
    title = next(f"t{k}" for k in range(100_000) if text_digest(f"t{k}").endswith(b"\0"))
    items = {"a": Item(title)}
    encode_catalog(tmp_path, CountingEncoder(), items)
    assert encode_catalog(tmp_path, CountingEncoder(), items)[2].reused == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_version"])
def test_a_damaged_store_is_ignored_and_rebuilt(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    items = _items(20)
    encode_catalog(tmp_path, CountingEncoder(), items)
    path = store_path(tmp_path, "v1", "int8")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # a flipped byte inside the vectors: the zip CRC fails
        path.write_bytes(bytes(data))
    else:
        encode_catalog(tmp_path, CountingEncoder("v2"), items)
        store_path(tmp_path, "v2", "int8").replace(path)
    enc = CountingEncoder()
    _, vectors, rep = encode_catalog(tmp_path, enc, items)
    assert rep.encoded == 20 and "ignoring the stored encodings" in caplog.text
    np.testing.assert_array_equal(vectors, CountingEncoder().encode([i.text() for i in items.values()]))
    assert encode_catalog(tmp_path, CountingEncoder(), items)[2].reused == 20


def test_concurrent_builders_of_one_version_encode_it_once(tmp_path: Path) -> None:
    """Each builder opens the lock file itself: flock excludes separate opens, in one process or many."""
    items = _items(40)
    encoders = [CountingEncoder(delay_s=0.05) for _ in range(3)]
    results: list[tuple] = [()] * 3
    start = threading.Barrier(3)

    def build(k: int) -> None:
        start.wait()
        results[k] = encode_catalog(tmp_path, encoders[k], items, batch_size=8)

    threads = [threading.Thread(target=build, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(len(e.texts) for e in encoders) == 40
    assert sorted(r[2].encoded for r in results) == [0, 0, 40]
    waited = [r[2].waited_s for r in results if r[2].encoded == 0]
    assert min(waited) > 0.2  # they waited for the builder (5 batches of 0.05 s), then read
    for r in results[1:]:
        np.testing.assert_array_equal(r[1], results[0][1])


def test_prune_keeps_the_named_versions(tmp_path: Path) -> None:
    for v in ("base", "v1", "v2-with-dash"):
        encode_catalog(tmp_path, CountingEncoder(v), _items(3))
    assert prune_encodings(tmp_path, {"base", "v2-with-dash"}) == ["v1-int8.npz"]
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["base-int8.npz", "v2-with-dash-int8.npz"]
    # The pruned version's lock file goes with it, so they do not pile up per version.
    assert sorted(p.name for p in tmp_path.glob("*.lock")) == ["base-int8.lock", "v2-with-dash-int8.lock"]
