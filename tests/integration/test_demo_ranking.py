"""The demo runs the ranking stage: `freshrec demo` starts `stream collab`, whose state reaches
the demo's Redis and whose rank-examples reach the learner's ranker, and its console says so."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from freshrec.infra import free_port

pytestmark = pytest.mark.integration


def test_demo_runs_the_collab_flow_and_feeds_the_ranker(tmp_path: Path, sample_dir: Path) -> None:
    """A published ranker is not waited for: on two shared cores the demo needs minutes to
    start, the flow trails the replay, and the gate first passes a candidate after ~1,200 of
    the sample's ~2,000 labelled baskets (console/demo.py, DEMO_RANKING). What is asserted is
    what every later step needs: the flow runs, writes Redis and feeds the learner."""
    state = tmp_path / "state"
    logs = state / "demo" / "logs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FRESHREC_STATE_DIR": str(state)}
    demo = subprocess.Popen(
        [sys.executable, "-m", "freshrec", "demo", "--minutes", "10", "--port", str(free_port()),
         "--dataset", str(sample_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(demo.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]
    consumed = 0
    try:
        deadline = time.monotonic() + 300
        while not any("open http" in line for line in list(lines)) and time.monotonic() < deadline:
            assert demo.poll() is None, "the demo exited before serving was ready:\n" + "".join(lines[-40:])
            time.sleep(0.5)
        assert any("open http" in line for line in list(lines)), "the demo never printed its page address"
        assert (logs / "collab.log").exists(), "the demo started no `freshrec stream collab`"
        # Rank-examples come only from the collab flow; the learner's ranker loop logs what it took.
        deadline = time.monotonic() + 180
        while consumed == 0 and time.monotonic() < deadline and demo.poll() is None:
            time.sleep(2)
            found = re.findall(r"ranker: (\d+) examples consumed", (logs / "learner.log").read_text(errors="replace"))
            consumed = int(found[-1]) if found else 0
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
        try:
            rc = demo.wait(60)
        except subprocess.TimeoutExpired:
            demo.kill()
            rc = demo.wait()
    output = "".join(lines)
    assert rc == 0, output[-3000:]
    assert consumed > 0, "the learner's ranker took no rank-examples:\n" + (logs / "learner.log").read_text(errors="replace")[-2000:]
    # The summary reads the collab flow's applied offsets from the demo's Redis (collab:meta)...
    applied = re.search(r"collab flow applied\s+([\d,]+) of ([\d,]+) events", output)
    assert applied is not None and int(applied.group(1).replace(",", "")) > 0, output[-3000:]
    # ...and serving's own count of what ordered each /recommend answer.
    assert re.search(r"/recommend ordered by ranker \d+% · blend \d+% · popularity \d+% of [\d,]+ answers", output), output[-3000:]
    assert "restarts              none" in output, output[-3000:]
