"""Stand-ins for the heavy parts of a serving pair, for tests of the serving logic.

:class:`HashEncoder` is a deterministic bag-of-words encoder: each (version, token)
seeds a random direction, so titles sharing words are similar, and two versions give
clearly different vectors (a mixed-version answer shows up as wrong scores). It is not
a mock of behaviour under test: the swap, the routing of item vectors and the HTTP
layer run for real against it and the real :class:`~models.live_index.LiveIndex`.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .swap import BuildTools


class HashEncoder:
    """Deterministic toy encoder with the ``TextEncoder`` interface."""

    def __init__(self, version: str = "base", dim: int = 32) -> None:
        self.version = version
        self.dim = dim
        self.calls = 0

    def _token(self, token: str) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(f"{self.version}\0{token}".encode()))
        return rng.standard_normal(self.dim).astype(np.float32)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for token in text.lower().split():
                out[row] += self._token(token)
            norm = np.linalg.norm(out[row])
            out[row] = out[row] / norm if norm > 0 else self._token("\0empty")
        return out


class CatalogTwin:
    """A catalog in memory (the Redis catalog's stand-in for unit tests), thread-safe."""

    def __init__(self, items: dict[str, Any]) -> None:
        self._items = dict(items)
        self._lock = threading.Lock()

    def all(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._items)

    def read(self, ids: Sequence[str]) -> dict[str, Any]:
        with self._lock:
            return {i: self._items[i] for i in ids if i in self._items}

    def put(self, item: Any) -> None:
        with self._lock:
            self._items[item.item_id] = item

    def delete(self, item_id: str) -> None:
        with self._lock:
            self._items.pop(item_id, None)


class Rejected(Exception):
    pass


def hash_tools(
    catalog: CatalogTwin,
    dim: int = 32,
    known: set[str] | None = None,
    corrupt: set[str] | None = None,
    before_build: Callable[[str], None] | None = None,
) -> BuildTools:
    """Build tools over :class:`HashEncoder` and a real ``LiveIndex``.

    ``known`` lists valid versions ("base" always is); ``corrupt`` ones raise
    :class:`Rejected` like the registry would; ``before_build(version)`` runs after the
    catalog is read and before encoding (tests use it to change the catalog mid-build).
    """
    from models.live_index import LiveIndex

    def load_adapter(version: str) -> Path | None:
        if corrupt and version in corrupt:
            raise Rejected(f"adapter {version!r} rejected: checksum mismatch")
        if version != "base" and known is not None and version not in known:
            raise Rejected(f"adapter {version!r} rejected: no such version")
        return None

    def build(encoder: Any, items: dict[str, Any], version: str, progress: Callable[[int, int], None]) -> Any:
        if before_build is not None:
            before_build(version)
        index = LiveIndex(dim, version)
        ids = sorted(items)
        if ids:
            index.upsert(ids, encoder.encode([items[i].text() for i in ids]))
        progress(len(ids), len(ids))
        return index

    return BuildTools(
        load_adapter=load_adapter,
        make_encoder=lambda version, path: HashEncoder(version, dim),
        catalog=catalog.all,
        read_items=catalog.read,
        build_index=build,
        rejected=(Rejected,),
    )


class ServerThread:
    """Run an ASGI app on uvicorn in a background thread (tests that need real HTTP).

    Example::

        with ServerThread(create_app(runtime), port) as url:
            httpx.get(f"{url}/healthz")
    """

    def __init__(self, app: Any, port: int, host: str = "127.0.0.1") -> None:
        import uvicorn

        self.url = f"http://{host}:{port}"
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> str:
        import time

        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(15)


def random_adapter(registry: Any, seed: int, scale: float = 0.3, parent: str | None = None) -> Any:
    """Publish a LoRA adapter with random (seeded) weights, far from the base model.

    A trained adapter moves vectors only slightly; tests that must tell versions apart
    by their scores want versions that differ clearly, so both LoRA matrices are random.
    Same seed, same weights, same checksum: exports can be shared between tests.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from models.encoder import load_base_model

    model = get_peft_model(load_base_model("cpu"), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return registry.publish(model, parent=parent, metrics={"recall@10": 0.1 + seed / 1000}, pairs_seen=100 * seed)


def ensure_test_adapters(registry_root: Path, exports_root: Path, n: int = 3) -> list[str]:
    """``n`` random adapters (seeds 1..n) in a registry, each exported once (int8 ONNX).

    Idempotent, so several test modules can share one registry and one exports folder
    per session; building it costs one export per version (seconds each).
    """
    from types import SimpleNamespace

    from models.onnx_encoder import encoder_for
    from models.registry import AdapterRegistry

    registry = AdapterRegistry(registry_root)
    versions = registry.versions()
    for seed in range(len(versions) + 1, n + 1):
        random_adapter(registry, seed, parent=versions[-1] if versions else None)
        versions = registry.versions()
    fake_settings = SimpleNamespace(state_dir=exports_root.parent, onnx_threads=1)
    if exports_root.name != "exports":
        raise ValueError("exports_root must be a folder named 'exports' (encoder_for's layout)")
    for version in ["base", *versions[:n]]:
        encoder_for(fake_settings, version, None if version == "base" else registry.load(version)[1], precision="int8")
    return versions[:n]
