"""The demo, as a person sees it: `freshrec demo` runs, and its page in headless Chromium
shows a shopper's recommendations, which change as the stream goes on."""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from freshrec.infra import free_port

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1200,800",
]


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium; installed here when missing (CI machines start without it)."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, check=False, capture_output=True, timeout=900)
        found = shutil.which("chromium")
    if found is None:
        pytest.fail("chromium is not installed and could not be installed (apt-get install chromium)")
    return found


def _browser(chromium: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / f"profile-{time.monotonic_ns()}"
    return subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=90,
    )


def page(chromium: str, tmp: Path, url: str) -> tuple[list[str], list[str]]:
    """(recommended titles, latest-purchase titles) as the rendered page shows them."""
    dom = _browser(chromium, tmp, "--virtual-time-budget=4000", "--dump-dom", url).stdout

    def entries(list_id: str, li_class: str) -> list[str]:
        block = re.search(rf'<(?:ol|ul) id="{list_id}">(.*?)</(?:ol|ul)>', dom, re.S)
        if block is None:
            return []
        return [html.unescape(t).strip() for t in re.findall(rf'<li(?: class="{li_class}")?>(.*?)<span', block.group(1), re.S)]

    return entries("recs", "(?:new )?rec"), entries("history", "")


def screenshot(chromium: str, tmp: Path, url: str, path: Path) -> bytes:
    _browser(chromium, tmp, "--virtual-time-budget=4000", f"--screenshot={path}", url)
    assert path.exists() and path.stat().st_size > 5_000, "no screenshot was written"
    return path.read_bytes()


def test_demo_page_shows_recommendations_that_change(chromium: str, tmp_path: Path, sample_dir: Path) -> None:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "FRESHREC_STATE_DIR": str(tmp_path / "state"),
    }
    demo = subprocess.Popen(
        [sys.executable, "-m", "freshrec", "demo", "--minutes", "6", "--port", str(free_port()),
         "--dataset", str(sample_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(demo.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]
    try:
        url = None
        deadline = time.monotonic() + 300
        while url is None and time.monotonic() < deadline and demo.poll() is None:
            for line in list(lines):
                m = re.search(r"open (http://\S+)", line)
                if m:
                    url = m.group(1)
            time.sleep(0.5)
        assert url is not None, "the demo never printed its page address:\n" + "".join(lines[-40:])

        # The shopper's own purchases arrive through the stream, and recommendations with them.
        first: list[str] = []
        bought: list[str] = []
        deadline = time.monotonic() + 120
        while not (first and bought) and time.monotonic() < deadline:
            first, bought = page(chromium, tmp_path, url)
        assert first, "no recommendations appeared on the page"
        assert bought, "the shopper's latest purchases never appeared on the page"
        shot1 = screenshot(chromium, tmp_path, url, tmp_path / "page-1.png")

        later = first
        deadline = time.monotonic() + 180
        while later == first and time.monotonic() < deadline:
            time.sleep(3)
            later = page(chromium, tmp_path, url)[0] or first
        assert later != first, f"the recommendations never changed: {first}"
        shot2 = screenshot(chromium, tmp_path, url, tmp_path / "page-2.png")
        assert shot1 != shot2
        for shot in ("page-1.png", "page-2.png"):
            keep = os.environ.get("FRESHREC_SCREENSHOT_DIR")
            if keep:
                Path(keep).mkdir(parents=True, exist_ok=True)
                shutil.copy(tmp_path / shot, Path(keep) / shot)
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
    assert "demo summary" in output and "request errors        0" in output, output[-3000:]
    # The demo restarts a crashed child and goes on; in this run none may have crashed.
    assert "restarts              none" in output, output[-3000:]
