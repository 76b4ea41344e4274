"""The ranker registry: immutable, verified ranker versions on disk, and which one is active.

A published version is one directory ``<root>/<version>/`` holding exactly

- ``model.bin``: :meth:`models.ranker.RankerModel.to_bytes` (a LightGBM model string or
  the MLP's npz), and
- ``manifest.json``: a :class:`RankerManifest` naming the family, the parent version,
  the feature schema and names it was trained on, the gate's figures, when, on how many
  examples, and the SHA-256 of ``model.bin``.

Versions are named, staged, renamed into place and refused exactly as adapter versions
are (the shared helpers of :mod:`models.registry`: ``v<6 digits>-<8 hex>``,
:func:`models.registry.is_version_name` for names from outside). Unlike adapters, which
serving activates only once an index is built with them, a ranker swaps on its own, so
the registry also keeps the activation record: ``active.json`` (the versions made
active, oldest first; the last is live), replaced atomically under a file lock, so
``activate`` and ``rollback`` from the admin API and the learner never interleave.
Activation and rollback load (verify) the target first: a corrupt or truncated version
raises :class:`RankerRejected` and the active one stays active.

Example::

    registry = RankerRegistry(settings.state_dir / "rankers")
    manifest = registry.publish(model, parent=registry.active(), metrics=judgement.manifest_metrics())
    registry.activate(manifest.version)
    loaded = registry.load_active()          # None when no ranker is active: serve the blend
    loaded.model.score(features, schema=FEATURE_SCHEMA)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from freshrec.files import fsync_path

from .ranker import FAMILIES, RankerMismatch, RankerModel, ranker_from_bytes
from .registry import (
    MANIFEST_FILE,
    VersionRejected,
    check_version_files,
    commit_version,
    is_version_name,
    new_staging,
    read_manifest,
    version_names,
)

MODEL_FILE = "model.bin"
VERSION_FILES = frozenset((MODEL_FILE, MANIFEST_FILE))
ACTIVE_FILE = "active.json"
LOCK_FILE = ".lock"
HISTORY_KEPT = 100  # activations remembered for rollback


class RankerRejected(VersionRejected):
    """A ranker version that must not be loaded or activated; the message names the version and the problem."""

    kind = "ranker"


class RankerManifest(BaseModel):
    """What a published ranker version says about itself (``manifest.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str
    family: str = Field(description=f"model family, one of {', '.join(FAMILIES)}")
    parent: str | None = Field(None, description="version it was continued from or replaced; None for the first")
    feature_schema: str = Field(description="ranking.features.FEATURE_SCHEMA it was trained on")
    feature_names: tuple[str, ...] = Field(description="feature columns, in order")
    created: float = Field(description="Unix seconds at publication")
    examples_seen: int = Field(0, ge=0, description="ranking examples (baskets) trained on, cumulative")
    size: int = Field(0, ge=0, description="trees (lightgbm) or hidden units (mlp)")
    metrics: dict[str, float] = Field(default_factory=dict, description="the publish gate's figures")
    checksum: str = Field(description="sha256:<hex> of model.bin")

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(), indent=2, sort_keys=True).encode()


@dataclass(frozen=True)
class LoadedRanker:
    """A verified version: its manifest and the model rebuilt from its bytes."""

    manifest: RankerManifest
    model: RankerModel

    @property
    def version(self) -> str:
        return self.manifest.version


def model_checksum(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RankerRegistry:
    """Published ranker versions under ``root`` (``settings.state_dir / "rankers"``) and the active one."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # -- reading ---------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Published versions, oldest first."""
        return version_names(self.root)

    def path(self, version: str) -> Path:
        return self.root / version

    def manifest(self, version: str) -> RankerManifest:
        """The manifest as written, unverified (for listings); use :meth:`load` before use."""
        self._check_name(version)
        return read_manifest(RankerManifest, version, self.path(version), RankerRejected)

    def load(self, version: str) -> LoadedRanker:
        """Verify one version and rebuild its model.

        Checks, in order: a version name; the directory holds exactly the model and the
        manifest; the manifest parses and names this version; the model bytes hash to
        its checksum (catches flipped bytes and truncation); the family is known and the
        bytes are that family's model with the manifest's feature names. Any failure
        raises :class:`RankerRejected`.
        """
        self._check_name(version)
        path = self.path(version)
        check_version_files(version, path, VERSION_FILES, RankerRejected, self.versions)
        manifest = read_manifest(RankerManifest, version, path, RankerRejected)
        if manifest.version != version:
            raise RankerRejected(version, f"its manifest names version {manifest.version!r}")
        data = (path / MODEL_FILE).read_bytes()
        actual = model_checksum(data)
        if actual != manifest.checksum:
            raise RankerRejected(
                version,
                f"checksum mismatch: {MODEL_FILE} hashes to {actual[:19]}..., the manifest says "
                f"{manifest.checksum[:19]}... (corrupt or truncated file)",
            )
        try:
            model = ranker_from_bytes(manifest.family, data, manifest.feature_names, manifest.feature_schema)
        except (ValueError, RankerMismatch) as exc:
            raise RankerRejected(version, f"{MODEL_FILE} does not load as a {manifest.family} ranker: {exc}") from None
        return LoadedRanker(manifest, model)

    def active(self) -> str | None:
        """The active version's name (None: none active, serve the blend); not verified."""
        history = self.history()
        return history[-1] if history else None

    def history(self) -> list[str]:
        """Versions made active, oldest first; the last is active. Rollback walks it back."""
        try:
            record = json.loads((self.root / ACTIVE_FILE).read_bytes())
        except FileNotFoundError:
            return []
        except ValueError as exc:
            raise RankerRejected("active", f"{ACTIVE_FILE} in {self.root} is not JSON ({exc})") from None
        history = record.get("history") if isinstance(record, dict) else None
        if not isinstance(history, list) or not all(isinstance(v, str) and is_version_name(v) for v in history):
            raise RankerRejected("active", f"{ACTIVE_FILE} in {self.root} holds no list of version names")
        return history

    def load_active(self) -> LoadedRanker | None:
        """The active version, verified; None when none is active."""
        version = self.active()
        return None if version is None else self.load(version)

    # -- publishing and activation ----------------------------------------------------------

    def publish(
        self,
        model: RankerModel,
        parent: str | None,
        metrics: dict[str, float],
        examples_seen: int = 0,
        created: float | None = None,
    ) -> RankerManifest:
        """Write ``model`` as a new immutable version and return its manifest (it is not activated)."""
        data = model.to_bytes()
        checksum = model_checksum(data)
        staging = new_staging(self.root)
        manifests: dict[str, RankerManifest] = {}

        def render(version: str) -> bytes:
            manifests[version] = RankerManifest(
                version=version,
                family=model.family,
                parent=parent,
                feature_schema=model.feature_schema,
                feature_names=model.feature_names,
                created=time.time() if created is None else created,
                examples_seen=examples_seen,
                size=model.size,
                metrics={k: float(v) for k, v in metrics.items()},
                checksum=checksum,
            )
            return manifests[version].to_bytes()

        try:
            (staging / MODEL_FILE).write_bytes(data)
            return manifests[commit_version(self.root, staging, checksum, render)]
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def activate(self, version: str) -> LoadedRanker:
        """Make ``version`` active after verifying it; returns it loaded. A refused version changes nothing."""
        with self._locked():
            loaded = self.load(version)
            history = self.history()
            if not history or history[-1] != version:
                self._write_history([*history, version][-HISTORY_KEPT:])
            return loaded

    def rollback(self) -> LoadedRanker:
        """Make the version active before the current one active again (verified first); returns it loaded.

        Raises :class:`RankerRejected` when there is nothing to roll back to, or when that
        version no longer verifies; the active version then stays.
        """
        with self._locked():
            history = self.history()
            if len(history) < 2:
                raise RankerRejected(history[-1] if history else "active", "nothing to roll back to")
            loaded = self.load(history[-2])
            self._write_history(history[:-1])
            return loaded

    # -- internals -------------------------------------------------------------------------

    def _check_name(self, version: str) -> None:
        if not is_version_name(version):
            raise RankerRejected(version, "not a version name (v<6 digits>-<8 lowercase hex>)")

    def _write_history(self, history: list[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{ACTIVE_FILE}.{os.getpid()}.tmp"
        tmp.write_bytes(json.dumps({"history": history}).encode())
        fsync_path(tmp)
        os.replace(tmp, self.root / ACTIVE_FILE)
        fsync_path(self.root)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
