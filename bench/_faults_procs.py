"""The processes a fault run starts, kills and restarts, and the guarantee it leaves none behind.

Every child runs in a session of its own, so its process group holds whatever it spawns
(serving's export worker, a resource tracker): a fault is ``kill -9`` of the main pid
only, as an OOM killer or a crashed host would do it, and what that leaves alive in the
group is counted as an orphan (issue 13 item 5). Cleanup then kills whole groups, and
only the groups this run created.

Redis is started here, not through :func:`freshrec.infra.start_redis`: the fault needs
AOF (``appendfsync everysec``: a write reaches the kernel before Redis answers, so a
``kill -9`` of the process, unlike a power cut, loses nothing the flows were told was
written) whatever that launcher's default is at the time, and a restart on the same port
and data directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from freshrec.infra import port_open, redis_answers, redis_binary, tansu_binary
from freshrec.settings import Settings


def group_members(pgid: int) -> list[int]:
    """Live pids whose process group is ``pgid`` (read from /proc; zombies left out)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry))
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
    except OSError:
        return f"pid {pid}"


def alive(pid: int) -> bool:
    """True for a live, non-zombie process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def kill_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the group, then SIGKILL what is still there after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not group_members(pgid):
            return


class Child:
    """One restartable process: ``argv`` under ``env``, its own session, a log that grows across restarts.

    ``ready`` (optional) says when a start has finished (a port answers, Redis pings).
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log: Path,
        ready: Callable[[], bool] | None = None,
        ready_timeout_s: float = 60.0,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log = log
        self.ready = ready
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.groups: list[int] = []  # every process group this child ever had, for cleanup

    def start(self, wait: bool = True) -> Child:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as fh:
            fh.write(f"\n=== start {time.strftime('%H:%M:%S')} ===\n".encode())
            fh.flush()
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.groups.append(self.proc.pid)
        if wait and self.ready is not None:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while not (self.ready and self.ready()):
            if not self.alive():
                raise RuntimeError(f"{self.name} exited during start-up; its log ends:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready within {self.ready_timeout_s:.0f} s; see {self.log}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> list[int]:
        """SIGKILL the main pid only; return the other pids of its group, to be judged later.

        Children that watch their parent (PR_SET_PDEATHSIG, a closed pipe) need a moment
        to notice; the caller checks after recovery which of these still live (orphans).
        """
        assert self.proc is not None
        pid = self.proc.pid
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        return group_members(pid)

    def cleanup(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for pgid in self.groups:
            kill_group(pgid, grace_s=2.0)
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def redis_child(settings: Settings, data_dir: Path, log: Path) -> Child:
    """redis-server with AOF in ``data_dir`` on the settings' port; restarts reload the AOF."""
    host, port = settings.redis_host_port
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_binary(), "--bind", host, "--port", str(port), "--save", "", "--appendonly", "yes",
        "--appendfsync", "everysec", "--dir", str(data_dir), "--daemonize", "no", "--protected-mode", "no",
    ]
    return Child("redis", argv, dict(os.environ), log, ready=lambda: redis_answers(host, port))


def broker_child(settings: Settings, storage_url: str, log: Path) -> Child:
    """Tansu on the settings' bootstrap port with the given storage engine."""
    host, port = settings.kafka_host_port
    url = f"tcp://{host}:{port}"
    argv = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", storage_url]
    return Child("broker", argv, dict(os.environ), log, ready=lambda: port_open(host, port))


def freshrec_child(name: str, settings: Settings, args: list[str], log: Path,
                   ready: Callable[[], bool] | None = None, ready_timeout_s: float = 120.0) -> Child:
    """``python -m freshrec ARGS`` with exactly these settings (as production starts each service)."""
    env = settings.child_env(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Child(name, [sys.executable, "-m", "freshrec", *args], env, log, ready, ready_timeout_s)


def psql(sql: str, db: str = "postgres", timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """One statement through the psql client (no Python driver is installed here)."""
    return subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
        capture_output=True, text=True, timeout=timeout,
    )


def probe_tansu_storage(storage_url: str, settings: Settings, log: Path, timeout_s: float = 8.0) -> str | None:
    """Start Tansu on ``storage_url``, create a topic, stop it; None if it works, else why not.

    Tansu exits at start-up when its binary lacks the storage feature, so the log's
    ``Error:`` line is the reason; a broker that starts is then asked to create a topic,
    which is the first write to the storage.
    """
    child = broker_child(settings, storage_url, log)
    child.ready_timeout_s = timeout_s
    try:
        try:
            child.start()
        except (RuntimeError, TimeoutError):
            lines = [l for l in child.log_tail(4000).splitlines() if "Error" in l]
            return (lines[-1] if lines else child.log_tail(400)).strip()
        from freshrec.infra import create_topics

        try:
            create_topics(settings.kafka_bootstrap, [f"{settings.topic_prefix}probe"], 1, timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            return f"the broker started but could not create a topic: {exc}"
        return None
    finally:
        child.cleanup()
