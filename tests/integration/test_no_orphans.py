"""Design invariant 6: a process that exits leaves no child behind, however it exits.

Each test starts a real process (``serve``, ``index``, ``learn``, the demo, and a
benchmark's server as the benchmarks start it), waits until it has started its
children, sends the parent SIGTERM, SIGINT or SIGKILL, and then checks that nothing
it started still runs. Descendants are found by a tag in their environment (every
child inherits it, multiprocessing's spawned workers and resource tracker included),
so a child that was reparented to PID 1 is found as surely as one that was not; and a
process left over is killed by the test (it carries our tag) so that a failure does not
leave 550 MB behind.

Before freshrec.children, ``serve`` left its export worker and the resource tracker
running after SIGTERM, SIGINT and SIGKILL (and, SIGKILLed, itself under PID 1 too when
started by a benchmark), the demo left everything on SIGTERM and SIGKILL, and a
benchmark killed by a signal left its server.

Time: serve and the benchmark's server, about 45 s together; ``-m slow`` (index,
learn, the demo) several minutes more.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from freshrec.infra import free_port
from freshrec.settings import Settings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux only"),
]

TAG_VAR = "FRESHREC_ORPHAN_TEST_TAG"
SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGKILL]
GONE_WITHIN_S = 20.0  # serving's graceful stop is 5 s plus its lifespan; the machine is shared


# -- finding what a test started ------------------------------------------------------------


def tagged(tag: str) -> dict[int, str]:
    """pid -> "ppid command" of every live process whose environment carries ``tag``."""
    needle = f"{TAG_VAR}={tag}".encode()
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle not in fh.read().split(b"\0"):
                    continue  # a zombie's environment reads empty: it is not running
            with open(f"/proc/{entry}/stat") as fh:
                ppid = fh.read().rsplit(")", 1)[1].split()[1]
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        found[int(entry)] = f"ppid {ppid}: {cmd[:160]}"
    return found


def descendants(tag: str, root: int) -> dict[int, str]:
    return {pid: what for pid, what in tagged(tag).items() if pid != root}


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of a live process, None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else (int(fields[1]), int(fields[19]))


def tree(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of ``root``, by parent links.

    The environment tag misses a process that overwrites its environment block (redis-server
    does, to set its process title), so what the parent started is also taken from the tree
    while the parent lives, and checked by (pid, start time) afterwards.
    """
    stats = {int(e): st for e in os.listdir("/proc") if e.isdigit() and (st := _stat(int(e))) is not None}
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, started) in stats.items():
            if ppid == parent and pid not in found:
                found[pid] = started
                frontier.append(pid)
    return found


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
    except OSError:
        return "?"


def export_worker(procs: dict[int, str]) -> bool:
    """Whether serving's spawned export worker is among ``procs``."""
    return any("multiprocessing.spawn" in what and "resource_tracker" not in what for what in procs.values())


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``argv`` as the parent under test, in a session of its own (nothing else gets our signals)."""
    return subprocess.Popen(
        argv, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )


def tagged_env(settings: Settings, tag: str) -> dict[str, str]:
    return {**settings.child_env(os.environ), TAG_VAR: tag, "PYTHONUNBUFFERED": "1"}


def wait_for(check: Callable[[], bool], what: str, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            pytest.fail(f"the parent exited ({proc.returncode}) before {what}; log:\n{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout:.0f} s; log:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def signal_and_check(proc: subprocess.Popen[bytes], sig: int, tag: str, log: Path) -> None:
    """Send ``sig`` to the parent; the parent and everything it started must be gone in time."""
    started = tree(proc.pid)
    before = {**descendants(tag, proc.pid), **{pid: _describe(pid) for pid in started}}

    def running() -> dict[int, str]:
        from_tree = {pid: f"(untagged) {_describe(pid)}" for pid, t in started.items() if (st := _stat(pid)) and st[1] == t}
        return {**from_tree, **tagged(tag)}

    proc.send_signal(sig)
    deadline = time.monotonic() + GONE_WITHIN_S
    left = running()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        proc.poll()  # reap the parent (our child) so it does not count as running
        left = running()
    proc.poll()
    for pid in left:  # ours by the tag: clean up before failing
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.wait(5)
    assert not left, (
        f"{signal.Signals(sig).name} to pid {proc.pid} left {len(left)} process(es) running "
        f"{GONE_WITHIN_S:.0f} s later (of {len(before)} it had started):\n"
        + "\n".join(f"  {pid} {what}" for pid, what in left.items())
        + f"\nlog:\n{log.read_text(errors='replace')[-2000:]}"
    )


def ensure_gone(proc: subprocess.Popen[bytes], tag: str) -> None:
    """Test teardown: whatever still runs with our tag is killed (a failure must not leak)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
    for pid in tagged(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- the services -----------------------------------------------------------------------------


def export_workers_of_workers(procs: dict[int, str], root: int) -> int:
    """How many export workers run under uvicorn's workers (spawned grandchildren of ``root``)."""
    return sum(
        1 for what in procs.values()
        if "multiprocessing.spawn" in what and "resource_tracker" not in what and not what.startswith(f"ppid {root}:")
    )


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"workers{w}")
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_serve_leaves_no_export_worker(sig: int, workers: int, fresh_settings: Settings, tmp_path: Path) -> None:
    # With workers > 1 the parent is uvicorn's supervisor; each worker has its own export
    # worker, and a SIGKILLed supervisor must still take the workers (and theirs) with it.
    tag, log = uuid.uuid4().hex, tmp_path / "serve.log"
    proc = start(
        [sys.executable, "-m", "freshrec", "serve", "--port", str(free_port()), "--log-level", "warning",
         "--workers", str(workers)],
        tagged_env(fresh_settings, tag), log,
    )
    try:
        # The export worker is spawned at start-up (it imports torch before the first swap).
        if workers == 1:
            wait_for(lambda: export_worker(descendants(tag, proc.pid)), "the export worker was spawned", 120, proc, log)
        else:
            wait_for(lambda: export_workers_of_workers(descendants(tag, proc.pid), proc.pid) >= workers,
                     f"each of {workers} workers spawned its export worker", 180, proc, log)
        signal_and_check(proc, sig, tag, log)
    finally:
        ensure_gone(proc, tag)


# They start no child today (so they passed before freshrec.children too); kept, as slow,
# so that one that starts to (a process pool for encoding, say) is held to the invariant.
@pytest.mark.slow
@pytest.mark.parametrize("command", ["index", "learn"])
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_index_and_learn_leave_nothing(command: str, sig: int, fresh_settings: Settings, tmp_path: Path) -> None:
    tag, log = uuid.uuid4().hex, tmp_path / f"{command}.log"
    proc = start([sys.executable, "-m", "freshrec", command], tagged_env(fresh_settings, tag), log)
    try:
        # Running, past its imports (torch among them), and into its loop: it has logged.
        wait_for(lambda: log.stat().st_size > 0, f"`{command}` was running", 120, proc, log)
        time.sleep(1.0)
        signal_and_check(proc, sig, tag, log)
    finally:
        ensure_gone(proc, tag)


BENCH_PARENT = textwrap.dedent(
    """
    # A benchmark's shape (bench/serving.py, bench/hotswap.py): start the server through
    # bench._load.start_server, work, and kill it in ``finally``.
    import sys, time
    from pathlib import Path
    from bench._load import start_server
    from freshrec.settings import Settings

    server = start_server(Settings(), Path(sys.argv[1]))
    try:
        time.sleep(600)
    finally:
        server.kill()
    """
)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_benchmark_server_dies_with_the_benchmark(sig: int, fresh_settings: Settings, tmp_path: Path) -> None:
    tag, log = uuid.uuid4().hex, tmp_path / "bench.log"
    settings = fresh_settings.model_copy(update={"api_port": free_port()})
    repo = str(Path(__file__).resolve().parents[2])
    proc = start([sys.executable, "-c", BENCH_PARENT, str(tmp_path / "serving.log")], tagged_env(settings, tag) | {"PYTHONPATH": repo}, log)
    try:
        wait_for(lambda: export_worker(descendants(tag, proc.pid)), "the server's export worker was spawned", 120, proc, tmp_path / "serving.log")
        signal_and_check(proc, sig, tag, log)
    finally:
        ensure_gone(proc, tag)


# -- the demo ---------------------------------------------------------------------------------


class Demo:
    """``freshrec demo`` on the bundled sample, its console collected line by line."""

    def __init__(self, tmp: Path, sample: Path, tag: str, minutes: float = 10) -> None:
        self.tag = tag
        self.log = tmp / "demo.log"
        env = {**os.environ, TAG_VAR: tag, "PYTHONUNBUFFERED": "1", "FRESHREC_STATE_DIR": str(tmp / "state")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "freshrec", "demo", "--minutes", str(minutes), "--port", str(free_port()),
             "--dataset", str(sample)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log, "ab") as out:
            for raw in iter(self.proc.stdout.readline, b""):
                self.lines.append(raw.decode(errors="replace"))
                out.write(raw)
                out.flush()

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text())
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        pytest.fail(f"the demo never printed /{pattern}/:\n{self.text()[-3000:]}")

    def child_pid(self, name: str) -> int:
        """The pid of the demo's child running ``freshrec <name...>`` (e.g. "stream users")."""
        for pid, what in descendants(self.tag, self.proc.pid).items():
            if f"-m freshrec {name}" in what and "freshrec.children" not in what:
                return pid
        raise LookupError(f"no `freshrec {name}` among the demo's processes")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: signal.Signals(s).name)
def test_demo_leaves_nothing(sig: int, tmp_path: Path, sample_dir: Path) -> None:
    # SIGINT is covered by test_demo_restarts_a_crashed_child, which ends with it.
    tag = uuid.uuid4().hex
    demo = Demo(tmp_path, sample_dir, tag)
    try:
        demo.wait_for_line(r"open (http://\S+)", 300)
        wait_for(lambda: export_worker(descendants(tag, demo.proc.pid)), "serving's export worker was spawned",
                 60, demo.proc, demo.log)
        started = [_describe(pid) for pid in tree(demo.proc.pid)]
        for service in ("tansu", "redis-server"):  # in their own session: the guard has work to do
            assert any(service in what for what in started), started
        signal_and_check(demo.proc, sig, tag, demo.log)
    finally:
        ensure_gone(demo.proc, tag)


@pytest.mark.slow
def test_demo_restarts_a_crashed_child(tmp_path: Path, sample_dir: Path) -> None:
    tag = uuid.uuid4().hex
    demo = Demo(tmp_path, sample_dir, tag)
    try:
        url = demo.wait_for_line(r"open (http://\S+)/\?user=(\S+)", 300)
        base, user = url.group(1), url.group(2)
        victim = demo.child_pid("stream users")
        os.kill(victim, signal.SIGKILL)
        demo.wait_for_line(r"users .*restart", 30)
        deadline = time.monotonic() + 60
        replacement = None
        while replacement is None and time.monotonic() < deadline:
            try:
                pid = demo.child_pid("stream users")
                replacement = pid if pid != victim else None
            except LookupError:
                pass
            time.sleep(0.5)
        assert replacement is not None, "no new users flow was started:\n" + demo.text()[-3000:]
        # The demo goes on: serving answers, and the live line counts the restart.
        assert httpx.get(f"{base}/recommend", params={"user_id": user, "k": 5}, timeout=10).status_code == 200
        demo.wait_for_line(r"restarts users×1", 30)
        assert demo.proc.poll() is None, demo.text()[-3000:]
        signal_and_check(demo.proc, signal.SIGINT, tag, demo.log)
        assert demo.proc.returncode == 0, demo.text()[-3000:]
        assert "restarts              users×1" in demo.text(), demo.text()[-3000:]
    finally:
        ensure_gone(demo.proc, tag)
