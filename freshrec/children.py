"""Child processes that die with their parent (design invariant 6), however it exits.

A parent that exits cleanly can stop its children itself, but a SIGKILL (or an OOM
kill, or a segfault) gives it no chance: its children are reparented to PID 1 and keep
running, an export worker holding ~550 MB among them. So every place that starts a
child goes through this module, and the child asks the kernel to signal it when the
parent goes (Linux ``prctl(PR_SET_PDEATHSIG)``):

* a command: :func:`popen` (or :func:`wrap` for an argv) runs it through
  ``python -m freshrec.children --parent PID --signal N -- argv...``, which sets the
  death signal and then ``exec``\\ s the command (the setting survives ``exec``);
  ``preexec_fn`` would do the same without the extra interpreter start, but it is not
  safe in a process with threads, which every one of ours has;
* a ``multiprocessing`` worker: call :func:`die_with_parent` first thing in its
  initializer or target (it finds the expected parent by itself);
* a process started by code that cannot take a hook (the embedded broker and Redis,
  started in their own session on purpose so that ``freshrec up`` can exit): register
  its pid with a :class:`Guard`, a small child that stops them when the pipe from its
  parent closes, which happens however the parent exits.

Two kernel details shape the API. The death signal fires when the *thread* that
created the child ends, not the process, so start children from a thread that lives
as long as they should (the main thread, or a supervisor thread that stops them
before it returns). And a parent can die between ``fork`` and ``prctl``: the child
then already belongs to PID 1 and no signal will ever come, so after setting it the
child checks that its parent is still the one it was started by, and exits if not.

``multiprocessing``'s resource tracker needs nothing: it exits when the last process
holding its pipe (the parent and each worker) is gone.

Example::

    proc = popen([sys.executable, "-m", "freshrec", "serve"], env=env)
    ...
    stop(proc)  # SIGTERM, then SIGKILL after the timeout
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM, expected_parent: int | None = None) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies; exit now if it has.

    ``expected_parent`` defaults to the ``multiprocessing`` parent when called in a
    ``multiprocessing`` child, else to the current parent (which cannot detect a parent
    that died before the call). Returns False where the kernel offers no such request
    (not Linux): the caller then relies on its parent's clean shutdown alone.
    """
    if expected_parent is None:
        import multiprocessing

        parent = multiprocessing.parent_process()
        expected_parent = parent.pid if parent is not None and parent.pid is not None else os.getppid()
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != expected_parent:
        # The parent died before the request was in place: no signal will come.
        os.kill(os.getpid(), sig)
        os._exit(128 + int(sig))  # a handled or ignored ``sig`` must still end us
    return True


def wrap(argv: Sequence[str], sig: int = signal.SIGTERM) -> list[str]:
    """``argv`` run so that it gets ``sig`` when the calling process dies."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-m", "freshrec.children", "--parent", str(os.getpid()), "--signal", str(int(sig)), "--", *argv]


def popen(argv: Sequence[str], sig: int = signal.SIGTERM, **kwargs: Any) -> subprocess.Popen[Any]:
    """:class:`subprocess.Popen` of ``argv`` that gets ``sig`` when this process dies.

    SIGTERM by default so that the child can stop its own children in turn; use SIGKILL
    for one that holds nothing worth a goodbye.
    """
    return subprocess.Popen(wrap(argv, sig), **kwargs)


def unwind(signum: int, frame: Any) -> None:
    """A SIGTERM handler that unwinds like Ctrl-C (``KeyboardInterrupt``), so ``finally`` blocks
    stop what was started and remove what was written: SIGTERM's default ends a process without them."""
    raise KeyboardInterrupt


def stop(proc: subprocess.Popen[Any], timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
    """Send ``sig``, wait up to ``timeout`` s, then SIGKILL; return the exit code (reaped)."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None if it is gone or a zombie).

    A pid is reused once its process is reaped; (pid, start time) is not, so that pair
    is what a :class:`Guard` stops.
    """
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


class Guard:
    """Stops registered processes once this process is gone, however it went.

    For children that must live in their own session (the embedded broker and Redis,
    which ``freshrec up`` leaves running on purpose) and so cannot be started through
    :func:`popen` by the code that starts them. The guard is a child reading a pipe whose
    only writer is this process: the kernel closes it when this process exits, even by
    SIGKILL, and the guard then SIGTERMs each registered process that is still the same
    one (pid and start time), SIGKILLs it after ``grace_s``, and exits. A clean shutdown
    stops the processes itself first, so the guard finds nothing left to do.
    """

    def __init__(self, grace_s: float = 5.0) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "freshrec.children", "--guard", "--grace", str(grace_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            close_fds=True,
        )
        assert self._proc.stdin is not None
        self._pipe: IO[bytes] = self._proc.stdin

    def watch(self, pid: int | None) -> None:
        """Stop ``pid`` (if still the same process) when this process exits."""
        started = start_time(pid) if pid else None
        if pid and started is not None:
            self._pipe.write(f"{pid} {started}\n".encode())
            self._pipe.flush()

    def close(self, timeout: float = 10.0) -> None:
        """Let the guard stop what still runs of its processes, and wait for it."""
        try:
            self._pipe.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _guard(grace_s: float) -> int:
    # The guard must outlive its parent to do its job, so it ignores what is sent to the
    # whole process group (a terminal's Ctrl-C, ``kill -- -PGID``); the closed pipe ends it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watched: list[tuple[int, int]] = []
    for line in sys.stdin.buffer:  # ends when the parent closes the pipe or dies
        pid, started = line.split()
        watched.append((int(pid), int(started)))
    alive = [pid for pid, started in watched if start_time(pid) == started]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(start_time(pid) is not None for pid in alive):
        time.sleep(0.05)
    for pid, started in watched:
        if start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m freshrec.children``: the exec wrapper of :func:`wrap`, or a :class:`Guard`."""
    p = argparse.ArgumentParser(prog="python -m freshrec.children")
    p.add_argument("--parent", type=int, help="the pid this child must not outlive")
    p.add_argument("--signal", type=int, default=int(signal.SIGTERM), help="signal to get when the parent dies")
    p.add_argument("--guard", action="store_true", help="run as a Guard (pids on stdin)")
    p.add_argument("--grace", type=float, default=5.0, help="a Guard's wait between SIGTERM and SIGKILL")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.guard:
        return _guard(args.grace)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.parent is None or not command:
        p.error("needs --parent PID -- COMMAND...")
    die_with_parent(args.signal, args.parent)
    os.execvp(command[0], command)
    return 127  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
