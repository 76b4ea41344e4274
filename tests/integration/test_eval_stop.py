"""A `freshrec eval` stopped with SIGTERM leaves no worker and no temporary folder behind.

Found by stopping a report-window run: the parent died at once, its two replay workers
kept running for minutes, and ~430 MB of temporary folders (the shared feature cache,
adapter exports) stayed in /tmp. The run here is the bundled slice with `full` in two
workers, stopped as soon as the workers have started training (their registry folders
exist), long before it would finish on its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.test_eval_determinism import _write_dataset

pytestmark = pytest.mark.integration


def _ours(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("freshrec-eval"))


def test_sigterm_stops_the_workers_and_removes_the_temporary_folders(sample_dir: Path, tmp_path: Path) -> None:
    data = _write_dataset(sample_dir, tmp_path / "slice")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = os.environ | {"TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "FRESHREC_STATE_DIR": str(tmp_path / "state")}
    argv = [sys.executable, "-m", "freshrec", "eval", str(data), "--eval-from", "2011-05-16",
            "--methods", "frozen,full", "--seeds", "7,8", "--jobs", "2", "--quiet", "--json", str(tmp_path / "eval.json")]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while not any(n.startswith("freshrec-eval-registry-") for n in _ours(tmp)):
            assert proc.poll() is None, f"eval ended before it could be stopped: {proc.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no worker started training within 240 s"
            time.sleep(0.2)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len([w for w in workers if "spawn_main" in " ".join(w.cmdline())]) == 2
        assert any(n.startswith("freshrec-eval-") and "-registry-" not in n and "-exports-" not in n for n in _ours(tmp))

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"left running: {[w.pid for w in alive]}"
        assert _ours(tmp) == []  # the feature cache, and each worker's exports and registries
    finally:  # a failing run leaves nothing running either
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for w in workers:
            if w.is_running():
                w.kill()
