"""An exclusive lock on a file, shared by every process on the machine that uses the same path.

The ONNX export and the catalog encodings of an adapter version are each built once and
then read by the indexer and every serving replica (:mod:`models.export`,
:mod:`models.encodings`). Without a lock, the processes that learn of a new version at the
same moment would all build it at once, competing for the same cores; with it, the first
builds and the others wait, then find the result on disk.

``flock`` rather than a lock file created with ``O_EXCL``: the kernel releases it when
its holder dies (a SIGKILL mid-build leaves no stale lock behind), and it needs no pid
bookkeeping. It is advisory and local to one machine (and to file systems that support
it); replicas on several machines share ``state_dir`` on such a file system or build
their own copy.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("freshrec.models.lock")


@contextmanager
def exclusive(path: Path, what: str = "") -> Iterator[float]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block.

    Yields the seconds spent waiting for another holder, so a caller can say it waited
    rather than built. ``what`` names the work in the log line written while waiting.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        t0 = time.perf_counter()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building %s (%s)", what or path.name, path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield time.perf_counter() - t0
    finally:
        os.close(fd)  # closing the last descriptor of the open file releases the lock
