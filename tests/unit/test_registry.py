"""The adapter registry: atomic, immutable versions and a loader that refuses bad ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.registry import (
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    AdapterManifest,
    AdapterRegistry,
    AdapterRejected,
    base_model_id,
    parse_version,
    weights_checksum,
)


def _fake_adapter(directory: Path, seed: int = 0) -> Path:
    """A peft-shaped adapter folder without loading a model (keeps these tests fast)."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file(
        {"base_model.model.layer.query.lora_A.weight": rng.standard_normal((4, 16), dtype=np.float32)},
        str(directory / WEIGHTS_FILE),
    )
    (directory / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["query"]}))
    return directory


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "adapters")


@pytest.fixture
def published(registry: AdapterRegistry, tmp_path: Path) -> AdapterManifest:
    return registry.publish_files(_fake_adapter(tmp_path / "w"), None, {"recall@10": 0.25}, pairs_seen=64)


def test_publish_writes_exactly_weights_config_and_manifest(registry: AdapterRegistry, published: AdapterManifest) -> None:
    path = registry.path(published.version)
    assert sorted(p.name for p in path.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE])
    on_disk = AdapterManifest.model_validate_json((path / MANIFEST_FILE).read_bytes())
    assert on_disk == published
    assert published.checksum == weights_checksum(path)
    assert published.base_model == base_model_id()
    assert published.pairs_seen == 64 and published.metrics == {"recall@10": 0.25}
    # no staging leftovers next to the version
    assert [p.name for p in registry.root.iterdir()] == [published.version]


def test_load_returns_manifest_and_path(registry: AdapterRegistry, published: AdapterManifest) -> None:
    manifest, path = registry.load(published.version)
    assert manifest == published
    assert path == registry.root / published.version


def test_versions_are_unique_sortable_and_chain_parents(registry: AdapterRegistry, tmp_path: Path) -> None:
    first = registry.publish_files(_fake_adapter(tmp_path / "a", 1), None, {}, 10)
    second = registry.publish_files(_fake_adapter(tmp_path / "b", 2), first.version, {}, 20)
    # identical weights still get a new version: a version is a publication, not a hash
    third = registry.publish_files(_fake_adapter(tmp_path / "c", 2), second.version, {}, 30)
    assert registry.versions() == [first.version, second.version, third.version]
    assert [parse_version(v) for v in registry.versions()] == [1, 2, 3]
    assert registry.latest() == third.version
    assert registry.manifest(third.version).parent == second.version


def test_versions_ignores_staging_and_strays(registry: AdapterRegistry, published: AdapterManifest) -> None:
    (registry.root / ".staging-deadbeef").mkdir()
    (registry.root / "notes").mkdir()
    (registry.root / "README").write_text("x")
    assert registry.versions() == [published.version]


def test_publish_real_peft_model_drops_model_card(registry: AdapterRegistry) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.query(x)

    model = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["query"]))
    manifest = registry.publish(model, parent=None, metrics={"recall@10": 0.5}, pairs_seen=3)
    loaded, path = registry.load(manifest.version)
    assert sorted(p.name for p in path.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE])
    assert loaded.pairs_seen == 3


# -- refusals --------------------------------------------------------------------------


def _rejected(registry: AdapterRegistry, version: str) -> str:
    with pytest.raises(AdapterRejected) as info:
        registry.load(version)
    assert info.value.version == version
    assert version in str(info.value)
    return str(info.value)


def test_flipped_byte_is_refused(registry: AdapterRegistry, published: AdapterManifest) -> None:
    weights = registry.path(published.version) / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    assert "checksum mismatch" in _rejected(registry, published.version)


def test_truncated_weights_are_refused(registry: AdapterRegistry, published: AdapterManifest) -> None:
    weights = registry.path(published.version) / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-17])
    assert "checksum mismatch" in _rejected(registry, published.version)


def test_edited_config_is_refused(registry: AdapterRegistry, published: AdapterManifest) -> None:
    config = registry.path(published.version) / CONFIG_FILE
    config.write_text(config.read_text().replace('"r": 4', '"r": 8'))
    assert "checksum mismatch" in _rejected(registry, published.version)


def test_foreign_base_model_is_refused(registry: AdapterRegistry, tmp_path: Path) -> None:
    foreign = registry.publish_files(_fake_adapter(tmp_path / "w"), None, {}, 1, base_model="bert-base-uncased@sha256:0")
    message = _rejected(registry, foreign.version)
    assert "bert-base-uncased" in message and base_model_id() in message


@pytest.mark.parametrize("name", [WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE])
def test_missing_file_is_refused(registry: AdapterRegistry, published: AdapterManifest, name: str) -> None:
    (registry.path(published.version) / name).unlink()
    message = _rejected(registry, published.version)
    assert "missing" in message and name in message


def test_extra_file_is_refused(registry: AdapterRegistry, published: AdapterManifest) -> None:
    (registry.path(published.version) / "README.md").write_text("hello")
    message = _rejected(registry, published.version)
    assert "unexpected README.md" in message


def test_unknown_version_is_refused(registry: AdapterRegistry, published: AdapterManifest) -> None:
    message = _rejected(registry, "v000099-00000000")
    assert "no such version" in message and published.version in message


def test_manifest_naming_another_version_is_refused(registry: AdapterRegistry, tmp_path: Path) -> None:
    a = registry.publish_files(_fake_adapter(tmp_path / "a"), None, {}, 1)
    b = registry.publish_files(_fake_adapter(tmp_path / "b"), a.version, {}, 2)
    # a copied-over manifest must not pass as the other version's
    (registry.path(b.version) / MANIFEST_FILE).write_bytes((registry.path(a.version) / MANIFEST_FILE).read_bytes())
    assert "names version" in _rejected(registry, b.version)


def test_garbled_manifest_is_refused(registry: AdapterRegistry, published: AdapterManifest) -> None:
    (registry.path(published.version) / MANIFEST_FILE).write_text('{"version": 3}')
    assert "manifest.json is invalid" in _rejected(registry, published.version)


def test_non_lora_config_is_refused(registry: AdapterRegistry, tmp_path: Path) -> None:
    w = _fake_adapter(tmp_path / "w")
    (w / CONFIG_FILE).write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    version = registry.publish_files(w, None, {}, 1).version
    assert "not a peft LoRA config" in _rejected(registry, version)


def test_parse_version_rejects_other_names() -> None:
    assert parse_version("v000012-0a1b2c3d") == 12
    with pytest.raises(ValueError, match="not an adapter version"):
        parse_version("latest")
