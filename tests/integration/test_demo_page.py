"""The demo, as a person sees it: `freshrec demo` runs, and its page in headless Chromium
shows a shopper's recommendations, which change as the stream goes on."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
        return [
            html.unescape(t).strip()
            for t in re.findall(rf'<li(?: class="{li_class}"[^>]*)?>(.*?)<span', block.group(1), re.S)
        ]

    return entries("recs", "(?:new )?rec"), entries("history", "")


def screenshot(chromium: str, tmp: Path, url: str, path: Path) -> bytes:
    _browser(chromium, tmp, "--virtual-time-budget=4000", f"--screenshot={path}", url)
    assert path.exists() and path.stat().st_size > 5_000, "no screenshot was written"
    return path.read_bytes()


@dataclass
class Demo:
    url: str  # the page's address as the demo printed it: /?user=<shopper>#token=<users token>
    lines: list[str]  # the demo's output so far


@pytest.fixture(scope="module")
def demo(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """`freshrec demo` with acting on (FRESHREC_DEMO_ACTIONS, passed on to its serving child);
    after the module's tests it must stop cleanly, with no request error and no restart."""
    state = tmp_path_factory.mktemp("demo")
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "FRESHREC_STATE_DIR": str(state / "state"),
        "FRESHREC_DEMO_ACTIONS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "freshrec", "demo", "--minutes", "8", "--port", str(free_port()),
         "--dataset", str(sample_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]
    try:
        url = None
        deadline = time.monotonic() + 300
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            for line in list(lines):
                m = re.search(r"open (http://\S+)", line)
                if m:
                    url = m.group(1)
            time.sleep(0.5)
        assert url is not None, "the demo never printed its page address:\n" + "".join(lines[-40:])
        yield Demo(url, lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    output = "".join(lines)
    assert rc == 0, output[-3000:]
    assert "demo summary" in output and "request errors        0" in output, output[-3000:]
    # The demo restarts a crashed child and goes on; in this run none may have crashed.
    assert "restarts              none" in output, output[-3000:]


def test_demo_page_shows_recommendations_that_change(chromium: str, tmp_path: Path, demo: Demo) -> None:
    url = demo.url
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


# -- acting on the page: Chromium driven over the DevTools Protocol ---------------------------


class Browser:
    """Headless chromium with one page, driven over CDP (``--remote-debugging-port``)."""

    def __init__(self, chromium: str, tmp: Path, width: int = 1360, height: int = 1000) -> None:
        import websocket  # websocket-client (the test extra)

        profile = tmp / f"cdp-profile-{time.monotonic_ns()}"
        self.proc = subprocess.Popen(
            [chromium, *[f for f in CHROMIUM_FLAGS if not f.startswith("--window-size")],
             f"--window-size={width},{height}", f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            # Port 0: chromium picks a free port and writes it here (no race with other tests).
            active = profile / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not (active.exists() and active.read_text().count("\n") >= 1) and time.monotonic() < deadline:
                time.sleep(0.1)
            port = int(active.read_text().split()[0])
            targets = _get_json(f"http://127.0.0.1:{port}/json/list")
            ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
            # No Origin header: chromium refuses websocket origins it was not told to allow.
            self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        except BaseException:
            self.close()
            raise
        self._id = 0
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:  # anything else is an event: not needed here
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression: str) -> Any:
        got = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in got:
            raise RuntimeError(f"{expression}: {got['exceptionDetails']}")
        return got["result"].get("value")

    def open(self, url: str) -> None:
        """Navigate to ``url`` and wait until the new document has loaded."""
        self.call("Page.navigate", url=url)
        wait_for(f"{url} to load", lambda: self.eval(
            f"document.readyState === 'complete' && location.search === {json.dumps(urlsplit(url).query and '?' + urlsplit(url).query)}"
        ), 30)

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the middle of the first ``selector``."""
        box = self.eval(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        assert box is not None, f"nothing on the page matches {selector}"
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def screenshot(self, path: Path) -> None:
        import base64

        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _get_json(url: str) -> Any:
    import httpx

    deadline = time.monotonic() + 30
    while True:
        try:
            return httpx.get(url, timeout=5).json()
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.1) -> Any:
    """``check()`` once truthy; an error in the page (still loading after a navigation) counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except RuntimeError:
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {got!r})")
        time.sleep(every)


REC_IDS = "[...document.querySelectorAll('#recs li[data-item]')].map((li) => li.dataset.item)"
WHO = "document.getElementById('who').className"
ACT_TEXT = "document.getElementById('act').textContent"


def test_acting_as_the_shopper_changes_the_recommendations(chromium: str, tmp_path: Path, demo: Demo) -> None:
    parts = urlsplit(demo.url)
    base = f"{parts.scheme}://{parts.netloc}"
    browser = Browser(chromium, tmp_path)
    try:
        # The followed shopper: each recommendation says why it is there, and can be acted on.
        browser.open(demo.url)
        wait_for("recommendations with reasons", lambda: browser.eval(
            "document.querySelectorAll('#recs li[data-item] .reason').length"), 120)
        wait_for("the act buttons (demo actions on)", lambda: browser.eval(
            "document.querySelectorAll('#recs button.act-click').length"), 30)
        reasons = browser.eval("[...document.querySelectorAll('#recs li[data-item]')].map("
                               "(li) => [...li.querySelectorAll('.reason')].map((r) => r.textContent))")
        assert reasons and all(reasons), f"a recommendation without a reason: {reasons}"

        # An unknown shopper is labelled so, and gets popular items.
        visitor = f"visitor-{uuid.uuid4().hex[:8]}"
        fragment = f"#token={parts.fragment.split('token=', 1)[1]}" if "token=" in parts.fragment else ""
        browser.open(f"{base}/?user={visitor}{fragment}")
        wait_for("the unknown-shopper label", lambda: browser.eval(f"{WHO} === 'unknown' && {REC_IDS}.length > 0 "
                                                                   "&& !!document.querySelector('#recs button.act-click')"), 60)
        assert "unknown shopper" in browser.eval("document.getElementById('who').textContent")
        before = browser.eval(REC_IDS)
        clicked_title = browser.eval("document.querySelector('#recs li[data-item]').firstChild.textContent.trim()")

        # Click the first recommendation as this shopper: through Kafka and the users flow,
        # the answer becomes personal and different, within 2 s of the click.
        browser.click("#recs li[data-item] button.act-click")
        t0 = time.monotonic()
        changed = None
        while time.monotonic() - t0 < 2.0:
            now_ids, who = browser.eval(f"[{REC_IDS}, {WHO}]")
            if now_ids and now_ids != before and who == "known":
                changed = time.monotonic() - t0
                break
            time.sleep(0.05)
        assert changed is not None, (
            f"the recommendations did not change within 2 s of the click: {before} -> {browser.eval(REC_IDS)}; "
            f"page says: {browser.eval(ACT_TEXT)}"
        )
        act = wait_for("the page's timing of the act", lambda: browser.eval(
            "(() => { const a = document.getElementById('act'); return a.dataset.state === 'done' ? "
            "[a.dataset.ms, a.textContent] : null; })()"), 5)
        assert 0 < int(act[0]) <= 2000 and "changed after" in act[1], act
        wait_for("the click in the shopper's history", lambda: clicked_title in browser.eval(
            "document.getElementById('history').textContent"), 5)

        # Back to the followed shopper: buy something, let the charts fill, and keep a picture.
        browser.open(demo.url)
        wait_for("the followed shopper's recommendations", lambda: browser.eval(
            "document.querySelectorAll('#recs button.act-purchase').length"), 60)
        browser.click("#recs li[data-item]:nth-child(2) button.act-purchase")
        wait_for("the purchase's timing", lambda: browser.eval("document.getElementById('act').dataset.state === 'done'"), 15)
        wait_for("charts with data", lambda: browser.eval(
            "['chartRate', 'chartLat'].every((id) => document.querySelector(`#${id} polyline`))"), 60, every=1.0)
        time.sleep(40)  # more points on the time axis (the page charts what it saw since it opened)
        shot = tmp_path / "demo_page.png"
        browser.screenshot(shot)
        assert shot.stat().st_size > 20_000
        keep = os.environ.get("FRESHREC_SCREENSHOT_DIR")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(keep) / "demo_page.png")
    finally:
        browser.close()
