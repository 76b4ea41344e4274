"""Small file helpers for what must survive a crash or be checked later (registry, checkpoints, exports)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (model files are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file or a directory entry list to disk (a directory: so a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir_files(directory: Path) -> None:
    """Flush every file in ``directory`` and the directory itself, so a rename never exposes empty files after a crash."""
    for p in directory.iterdir():
        if p.is_file():
            fsync_path(p)
    fsync_path(directory)
