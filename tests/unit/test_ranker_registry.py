"""The ranker registry: immutable verified versions, activation, exact rollback, corrupt versions refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.ranker import MLPRanker, RankerModel
from models.ranker_registry import (
    ACTIVE_FILE,
    MODEL_FILE,
    RankerRegistry,
    RankerRejected,
    model_checksum,
)
from models.registry import MANIFEST_FILE, is_version_name

NAMES = ("a", "b", "c")
SCHEMA = "f1-test"


def _model(seed: int) -> MLPRanker:
    """A small MLP built from arrays (no training: these tests are about the registry)."""
    rng = np.random.default_rng(seed)
    return MLPRanker(
        {"mean": np.zeros(3), "std": np.ones(3), "w0": rng.standard_normal((3, 4)), "b0": np.zeros(4),
         "w1": rng.standard_normal(4), "b1": np.zeros(())},
        NAMES, SCHEMA,
    )


def _scores(model: RankerModel) -> np.ndarray:
    return model.score(np.arange(12, dtype=np.float32).reshape(4, 3), schema=SCHEMA)


@pytest.fixture
def registry(tmp_path: Path) -> RankerRegistry:
    return RankerRegistry(tmp_path / "rankers")


def test_publish_writes_an_immutable_verified_version(registry: RankerRegistry) -> None:
    model = _model(1)
    m = registry.publish(model, parent=None, metrics={"recall@10": 0.3}, examples_seen=64, created=1.0)
    assert is_version_name(m.version) and registry.versions() == [m.version]
    assert {p.name for p in registry.path(m.version).iterdir()} == {MODEL_FILE, MANIFEST_FILE}
    assert m.checksum == model_checksum(model.to_bytes()) and m.version.endswith(m.checksum[7:15])
    assert (m.family, m.feature_schema, m.feature_names, m.examples_seen, m.size) == ("mlp", SCHEMA, NAMES, 64, 4)
    loaded = registry.load(m.version)
    assert loaded.manifest == m
    np.testing.assert_array_equal(_scores(loaded.model), _scores(model))
    assert registry.active() is None and registry.load_active() is None  # publishing does not activate
    assert not list(registry.root.glob(".staging-*"))


def test_activate_and_rollback_are_exact(registry: RankerRegistry) -> None:
    v1 = registry.publish(_model(1), None, {}).version
    v2 = registry.publish(_model(2), v1, {}).version
    v3 = registry.publish(_model(3), v2, {}).version
    assert [v1, v2, v3] == registry.versions() == sorted([v1, v2, v3])
    registry.activate(v1)
    registry.activate(v2)
    registry.activate(v2)  # re-activating the active one is not a new step
    registry.activate(v3)
    assert registry.active() == v3 and registry.history() == [v1, v2, v3]
    assert registry.rollback().version == v2
    assert registry.active() == v2
    np.testing.assert_array_equal(_scores(registry.load_active().model), _scores(_model(2)))
    assert registry.rollback().version == v1
    with pytest.raises(RankerRejected, match="nothing to roll back to"):
        registry.rollback()
    assert registry.active() == v1
    assert json.loads((registry.root / ACTIVE_FILE).read_text()) == {"history": [v1]}


def _corrupt_cases() -> dict[str, tuple[str, str]]:
    return {
        "flipped byte": ("flip", "checksum mismatch"),
        "truncated": ("truncate", "checksum mismatch"),
        "missing model": ("delete", "missing model.bin"),
        "garbled manifest": ("manifest", "manifest.json is invalid"),
        "extra file": ("extra", "unexpected"),
    }


@pytest.mark.parametrize("case", sorted(_corrupt_cases()))
def test_corrupt_version_is_refused_and_the_active_one_stays(registry: RankerRegistry, case: str) -> None:
    good = registry.publish(_model(1), None, {}).version
    bad = registry.publish(_model(2), good, {}).version
    registry.activate(good)
    action, message = _corrupt_cases()[case]
    model_path, manifest_path = registry.path(bad) / MODEL_FILE, registry.path(bad) / MANIFEST_FILE
    if action == "flip":
        data = bytearray(model_path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model_path.write_bytes(bytes(data))
    elif action == "truncate":
        model_path.write_bytes(model_path.read_bytes()[:-10])
    elif action == "delete":
        model_path.unlink()
    elif action == "manifest":
        manifest_path.write_text('{"version": 3}')
    else:
        (registry.path(bad) / "notes.txt").write_text("x")
    with pytest.raises(RankerRejected, match=message) as info:
        registry.activate(bad)
    assert bad in str(info.value) and str(info.value).startswith("ranker ")
    assert registry.active() == good and registry.history() == [good]
    np.testing.assert_array_equal(_scores(registry.load_active().model), _scores(_model(1)))


def test_rollback_to_a_corrupted_version_is_refused(registry: RankerRegistry) -> None:
    v1 = registry.publish(_model(1), None, {}).version
    v2 = registry.publish(_model(2), v1, {}).version
    registry.activate(v1)
    registry.activate(v2)
    model_path = registry.path(v1) / MODEL_FILE
    model_path.write_bytes(model_path.read_bytes()[:20])
    with pytest.raises(RankerRejected, match="checksum mismatch"):
        registry.rollback()
    assert registry.active() == v2


def test_a_checksum_consistent_but_wrong_model_is_refused(registry: RankerRegistry) -> None:
    """Bytes that hash right but are not the family's model (a bad publisher) still never load."""
    v = registry.publish(_model(1), None, {}).version
    manifest = registry.manifest(v)
    (registry.path(v) / MODEL_FILE).write_bytes(b"garbage")
    forged = manifest.model_copy(update={"checksum": model_checksum(b"garbage")})
    (registry.path(v) / MANIFEST_FILE).write_bytes(forged.to_bytes())
    with pytest.raises(RankerRejected, match="does not load as a mlp ranker"):
        registry.load(v)


def test_unknown_and_malformed_names_are_refused(registry: RankerRegistry) -> None:
    registry.publish(_model(1), None, {})
    with pytest.raises(RankerRejected, match="no such version"):
        registry.load("v000099-00000000")
    for name in ("../etc", "latest", "v000001-ABCDEF01\n"):
        with pytest.raises(RankerRejected, match="not a version name"):
            registry.activate(name)
    assert registry.active() is None


def test_garbled_activation_record_is_an_error_not_a_silent_none(registry: RankerRegistry) -> None:
    registry.root.mkdir(parents=True)
    (registry.root / ACTIVE_FILE).write_text('{"history": ["../x"]}')
    with pytest.raises(RankerRejected, match="no list of version names"):
        registry.active()
