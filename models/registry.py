"""The adapter registry: immutable, verifiable LoRA adapter versions on disk.

A published version is one directory ``<root>/<version>/`` holding exactly

- ``adapter_model.safetensors`` and ``adapter_config.json`` (what peft's
  ``PeftModel.from_pretrained(base, path)`` reads), and
- ``manifest.json``: an :class:`AdapterManifest` naming its parent, the base model it
  was trained on, when, on how many pairs, its evaluation figures, and the SHA-256 of
  the two weights files.

Publishing writes a hidden staging directory and renames it into place, so a reader
sees a version whole or not at all (``rename(2)`` of a directory is atomic on one file
system, and it fails when the target exists, which is what keeps names unique among
concurrent publishers). Nothing rewrites a published version.

Loading trusts nothing: :meth:`AdapterRegistry.load` re-hashes the weights and checks
the base model, and raises :class:`AdapterRejected` naming the version and the problem,
so the caller (serving) can keep its active version and log why.

Example::

    registry = AdapterRegistry(settings.state_dir / "adapters")
    manifest = registry.publish(peft_model, parent=None, metrics={"recall@10": 0.21}, pairs_seen=640)
    manifest, path = registry.load(manifest.version)      # path feeds PeftModel.from_pretrained
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from freshrec.files import file_sha256, fsync_dir_files, fsync_path

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "manifest.json"
WEIGHT_FILES = (WEIGHTS_FILE, CONFIG_FILE)  # what the checksum covers, in this order
VERSION_FILES = frozenset((*WEIGHT_FILES, MANIFEST_FILE))
BASE_MODEL_NAME = "all-MiniLM-L6-v2"

# v<sequence>-<first 8 hex of the checksum>: sorts by publication order as plain strings,
# and two learners racing for one sequence number cannot both win the rename.
_VERSION_RE = re.compile(r"^v(\d{6})-([0-9a-f]{8})$")
_STAGING_PREFIX = ".staging-"
M = TypeVar("M", bound=BaseModel)


class VersionRejected(Exception):
    """A version of some registry that must not be loaded; the message names the kind, version and problem.

    The base of :class:`AdapterRejected` and ``models.ranker_registry.RankerRejected``, so
    the shared helpers below can refuse a version of either registry in its own words.
    """

    kind = "version"

    def __init__(self, version: str, problem: str) -> None:
        super().__init__(f"{self.kind} {version!r} rejected: {problem}")
        self.version = version
        self.problem = problem


class AdapterRejected(VersionRejected):
    """An adapter version that must not be loaded; the message names the version and the problem."""

    kind = "adapter"


class AdapterManifest(BaseModel):
    """What a published version says about itself (``manifest.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str
    parent: str | None = Field(None, description="version it was trained on top of; None for the base model")
    base_model: str = Field(description="identity of the base encoder, see base_model_id()")
    created: float = Field(description="Unix seconds at publication")
    pairs_seen: int = Field(ge=0, description="train pairs trained on, cumulative from the base model")
    metrics: dict[str, float] = Field(default_factory=dict, description="evaluation figures at publication")
    checksum: str = Field(description="sha256:<hex> over the weights files, see weights_checksum()")

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(), indent=2, sort_keys=True).encode()


@cache
def base_model_id() -> str:
    """Name plus content hash of the bundled base encoder.

    The hash and not the folder path, because the path differs between machines while
    an adapter is only valid on the exact weights it was trained against.
    """
    from models.encoder import model_dir

    digest = file_sha256(model_dir() / "model.safetensors")
    return f"{BASE_MODEL_NAME}@sha256:{digest[:16]}"


def weights_checksum(directory: Path) -> str:
    """``sha256:<hex>`` over the weights files' names and bytes, in a fixed order."""
    h = hashlib.sha256()
    for name in WEIGHT_FILES:
        h.update(name.encode() + b"\0")
        with open(directory / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


VERSION_FORMAT = "v<6 digits>-<8 lowercase hex>, e.g. v000003-1a2b3c4d"


def is_version_name(name: str) -> bool:
    """Whether ``name`` is a published version's name, judged on the string alone.

    For edges that take a version from outside (the admin API) and must refuse before
    the name reaches the file system: a name that passes is 16 ASCII characters with no
    ``/``, ``..`` or NUL, so ``root / name`` stays inside the registry. ``fullmatch``,
    not ``match``: ``$`` would let a trailing newline through.
    """
    # isascii: \d also matches other scripts' digits.
    return isinstance(name, str) and name.isascii() and _VERSION_RE.fullmatch(name) is not None


def parse_version(version: str) -> int:
    """The sequence number of a version name; ValueError if it is not one."""
    m = _VERSION_RE.match(version)
    if not m:
        raise ValueError(f"{version!r} is not an adapter version (expected v<6 digits>-<8 hex>)")
    return int(m.group(1))


# -- shared by every registry of immutable versions (adapters here, rankers in models.ranker_registry) --


def version_names(root: Path) -> list[str]:
    """Published version directories under ``root``, oldest first (staging directories and strays excluded)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _VERSION_RE.match(p.name))


def new_staging(root: Path) -> Path:
    """A fresh hidden directory under ``root`` to write a version into before :func:`commit_version` renames it."""
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir()
    return staging


def commit_version(root: Path, staging: Path, checksum: str, manifest_bytes: Callable[[str], bytes]) -> str:
    """Rename ``staging`` into place as the next version and return its name.

    ``manifest_bytes(version)`` renders the manifest for a candidate name; it is written
    (with everything else flushed) before the rename, so a reader never sees a version
    without its manifest. The rename fails when another publisher took the sequence
    number first, and then the next number is tried.
    """
    for _ in range(100):
        versions = version_names(root)
        seq = parse_version(versions[-1]) + 1 if versions else 1
        version = f"v{seq:06d}-{checksum.removeprefix('sha256:')[:8]}"
        (staging / MANIFEST_FILE).write_bytes(manifest_bytes(version))
        fsync_dir_files(staging)
        try:
            os.rename(staging, root / version)
        except OSError:
            if (root / version).exists():
                continue  # another publisher took this sequence number: take the next
            raise
        fsync_path(root)
        return version
    raise RuntimeError(f"could not claim a version name in {root} after 100 attempts")


def read_manifest(model: type[M], version: str, path: Path, rejected: type[VersionRejected]) -> M:
    """Parse ``path/manifest.json`` as ``model``; a missing or invalid one raises ``rejected`` saying which field."""
    try:
        return model.model_validate_json((path / MANIFEST_FILE).read_bytes())
    except FileNotFoundError:
        raise rejected(version, f"missing {MANIFEST_FILE} in {path}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "manifest"
        raise rejected(version, f"{MANIFEST_FILE} is invalid: {where}: {err['msg']}") from None


def check_version_files(
    version: str, path: Path, expected: frozenset[str], rejected: type[VersionRejected], known: Callable[[], list[str]]
) -> None:
    """Refuse a version directory that is absent or does not hold exactly ``expected``."""
    if not path.is_dir():
        latest = ", ".join(known()[-5:]) or "none"
        raise rejected(version, f"no such version in {path.parent} (latest known: {latest})")
    present = {p.name for p in path.iterdir()}
    missing = sorted(expected - present)
    if missing:
        raise rejected(version, f"missing {', '.join(missing)} in {path}")
    extra = sorted(present - expected)
    if extra:
        raise rejected(version, f"unexpected {', '.join(extra)} in {path}: a published version holds only {sorted(expected)}")


class AdapterRegistry:
    """Published adapter versions under ``root`` (``settings.state_dir / "adapters"``)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # -- reading ---------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Published versions, oldest first (staging directories and strays excluded)."""
        return version_names(self.root)

    def latest(self) -> str | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def path(self, version: str) -> Path:
        return self.root / version

    def manifest(self, version: str) -> AdapterManifest:
        """The manifest as written, unverified (for listings); use :meth:`load` before use."""
        return self._read_manifest(version, self.path(version))

    def load(self, version: str) -> tuple[AdapterManifest, Path]:
        """Verify one version and return its manifest and directory.

        Checks, in order: the directory exists; it holds exactly the weights, config and
        manifest; the manifest parses and names this version; the weights hash to the
        manifest's checksum (catches flipped bytes and truncation); the config is peft
        LoRA JSON; the base model is the one bundled here. Any failure raises
        :class:`AdapterRejected` and loads nothing.
        """
        path = self.path(version)
        check_version_files(version, path, VERSION_FILES, AdapterRejected, self.versions)
        manifest = self._read_manifest(version, path)
        if manifest.version != version:
            raise AdapterRejected(version, f"its manifest names version {manifest.version!r}")
        actual = weights_checksum(path)
        if actual != manifest.checksum:
            raise AdapterRejected(
                version,
                f"checksum mismatch: the weights hash to {actual[:19]}..., the manifest says "
                f"{manifest.checksum[:19]}... (corrupt or truncated files)",
            )
        try:
            config = json.loads((path / CONFIG_FILE).read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise AdapterRejected(version, f"{CONFIG_FILE} is not JSON ({exc})") from None
        if not isinstance(config, dict) or config.get("peft_type") != "LORA":
            raise AdapterRejected(version, f"{CONFIG_FILE} is not a peft LoRA config")
        expected = base_model_id()
        if manifest.base_model != expected:
            raise AdapterRejected(
                version, f"trained on base model {manifest.base_model!r}, but this encoder is {expected!r}"
            )
        return manifest, path

    def _read_manifest(self, version: str, path: Path) -> AdapterManifest:
        return read_manifest(AdapterManifest, version, path, AdapterRejected)

    # -- publishing ------------------------------------------------------------------------

    def publish(
        self,
        peft_model: Any,
        parent: str | None,
        metrics: dict[str, float],
        pairs_seen: int,
        created: float | None = None,
    ) -> AdapterManifest:
        """Write ``peft_model``'s adapter as a new immutable version and return its manifest.

        ``peft_model`` is a peft ``PeftModel`` (only its adapter weights are written).
        The version appears atomically under :attr:`root`; announcing it on the
        ``adapters`` topic is the caller's job (the learner does it).
        """
        staging = new_staging(self.root)
        try:
            peft_model.save_pretrained(str(staging), safe_serialization=True)
            # peft also writes a model card; a version holds the weights, config and manifest only.
            for extra in staging.iterdir():
                if extra.name not in WEIGHT_FILES:
                    shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
            for name in WEIGHT_FILES:
                if not (staging / name).is_file():
                    raise RuntimeError(f"peft save_pretrained wrote no {name}; is this a LoRA PeftModel?")
            return self._commit(staging, parent, metrics, pairs_seen, time.time() if created is None else created)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def publish_files(
        self,
        weights_dir: Path,
        parent: str | None,
        metrics: dict[str, float],
        pairs_seen: int,
        created: float | None = None,
        base_model: str | None = None,
    ) -> AdapterManifest:
        """Publish adapter files already on disk (a peft ``save_pretrained`` folder).

        For tools and tests; ``base_model`` overrides the identity recorded (only a test
        of foreign-adapter refusal has a reason to).
        """
        staging = new_staging(self.root)
        try:
            for name in WEIGHT_FILES:
                shutil.copyfile(Path(weights_dir) / name, staging / name)
            return self._commit(
                staging, parent, metrics, pairs_seen, time.time() if created is None else created, base_model
            )
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _commit(
        self,
        staging: Path,
        parent: str | None,
        metrics: dict[str, float],
        pairs_seen: int,
        created: float,
        base_model: str | None = None,
    ) -> AdapterManifest:
        checksum = weights_checksum(staging)
        base = base_model or base_model_id()
        manifests: dict[str, AdapterManifest] = {}

        def render(version: str) -> bytes:
            manifests[version] = AdapterManifest(
                version=version,
                parent=parent,
                base_model=base,
                created=created,
                pairs_seen=pairs_seen,
                metrics={k: float(v) for k, v in metrics.items()},
                checksum=checksum,
            )
            return manifests[version].to_bytes()

        return manifests[commit_version(self.root, staging, checksum, render)]
