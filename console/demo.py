"""``freshrec demo``: the whole system on one machine, replaying the bundled sample.

It starts its own broker and Redis on free loopback ports (so it never touches a Redis
you run), then the six processes exactly as production runs them (``freshrec stream
catalog``, ``stream users``, ``stream collab``, ``index``, ``learn``, ``serve``), sends
the catalog, waits until serving is ready, and replays the events at a speed-up while
printing a live summary: freshness, the adapter and the ranker serving uses, how far the
collaborative flow trails the replay, and the share of /recommend answers the ranker
ordered (serving's ``/metrics``). The page at ``/`` follows one shopper. Ctrl-C, SIGTERM
or ``--minutes`` stops everything it started, and only that; a SIGKILLed demo leaves
nothing either (its children get SIGTERM from the kernel, and a
:class:`freshrec.children.Guard` stops the broker and Redis). A child that crashes is restarted, with a backoff and at most
``RESTART_LIMIT`` times a minute, and the console and the live line say so.
"""

from __future__ import annotations

import argparse
import collections
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from freshrec.children import Guard, popen, unwind
from freshrec.dataset import SAMPLE_DIR, locate, read_events
from freshrec.infra import InfraError, free_port, port_open, start_stack, stop_stack
from freshrec.settings import Settings

from .replay import Pace, replay

COMPONENTS = [
    ("catalog", ["stream", "catalog"]),
    ("users", ["stream", "users"]),
    ("collab", ["stream", "collab"]),  # co-purchase state, shopper vectors, rank-examples for the ranker
    ("indexer", ["index"]),
    ("learner", ["learn"]),
    ("serving", ["serve"]),
]


# The ranker's cadence, for the demo only (a FRESHREC_* variable the user sets still wins).
# The sample yields 1,994 labelled baskets over its three months, and on two shared cores
# the collaborative flow trails the replay (it applies ~700 events/s alone, far fewer beside
# the learner). Replayed through the learner's RankIntake and RankerUpdater with this cadence
# (2026-12-03, sim column 0), the gate held every candidate trained on under ~950 baskets
# (worse than the blend) and published the first at example 1,200, then two more by the end.
# With the production cadence (300 held back, then 1,000 new baskets or 300 s) there would
# be one candidate, at example 1,300, and at most one more (the 300 s rule) before the
# sample ends: likely no ranker in the demo.
# So: 150 held back (the gate still needs 30 with a bought candidate and a gain above 1 s.e.
# over the blend: its rule is unchanged), an update every 150 baskets or 30 s. And 50 trees
# instead of 200: in a 5-minute demo beside the learner's adapter training a 200-tree fit on
# ~600 baskets took 67 s, so updates fell behind the examples; in the same replay 50 trees
# fitted in a third of the time and the gate published the first version at the same example.
DEMO_RANKING: dict[str, Any] = {
    "ranker_learn": True,
    "ranker_gate_baskets": 150,
    "ranker_update_baskets": 150,
    "ranker_update_seconds": 30.0,
    "ranker_trees": 50,
}


def demo_ranking(settings: Settings) -> dict[str, Any]:
    """:data:`DEMO_RANKING` less the fields the user set (``FRESHREC_*``), which stay as set."""
    return {name: value for name, value in DEMO_RANKING.items() if name not in settings.model_fields_set}


# A crash loop (a bad setting, a port taken) must end the demo rather than spin: at most
# this many restarts of one child within the window, waiting longer before each.
RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass
class Child:
    """One supervised process: how to start it again, and when it was restarted."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    restarts: collections.deque[float] = field(default_factory=collections.deque)  # monotonic times, last window
    restarted: int = 0  # in all
    due: float | None = None  # a restart is scheduled for this monotonic time


class Children:
    """The processes the demo started: restarted when they crash, stopped in reverse order.

    Every child is started through :func:`freshrec.children.popen`, so it gets SIGTERM
    from the kernel when the thread that started it ends: the main thread for the first
    start, the supervisor thread for a restart. That is why the supervisor thread itself
    stops all children before it returns, and why :meth:`stop` only asks it to.
    """

    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        say: Callable[[str], None] = print,
        limit: int = RESTART_LIMIT,
        window_s: float = RESTART_WINDOW_S,
        backoff_s: tuple[float, ...] = RESTART_BACKOFF_S,
        command: tuple[str, ...] = (sys.executable, "-m", "freshrec"),
    ) -> None:
        self.env = env
        self.command = command  # what each child's argv follows
        self.log_dir = log_dir
        self.say = say
        self.limit, self.window_s, self.backoff_s = limit, window_s, backoff_s
        self.children: dict[str, Child] = {}
        self.failed: str | None = None  # why the supervisor gave up; the demo then stops
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._supervisor: threading.Thread | None = None

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            return popen(
                [*self.command, *argv],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the demo only; it stops the children in order
            )

    def start(self, name: str, argv: list[str]) -> None:
        with self._lock:
            self.children[name] = Child(name, argv, self._spawn(name, argv))

    @property
    def procs(self) -> dict[str, subprocess.Popen[bytes]]:
        return {name: c.proc for name, c in self.children.items()}

    def restarts(self) -> dict[str, int]:
        """Restarts so far, per child that had any."""
        return {name: c.restarted for name, c in self.children.items() if c.restarted}

    def supervise(self, on_give_up: Callable[[], None], poll_s: float = 0.5) -> None:
        """Start the supervisor thread: it restarts crashed children until :meth:`stop`."""
        self._supervisor = threading.Thread(target=self._supervise, args=(on_give_up, poll_s), name="supervisor")
        self._supervisor.start()

    def _supervise(self, on_give_up: Callable[[], None], poll_s: float) -> None:
        try:
            while not self._closing.wait(poll_s):
                try:
                    self._check(on_give_up)
                except Exception as exc:  # the supervisor must outlive any one bad restart
                    self.say(f"supervisor: {type(exc).__name__}: {exc}")
        finally:
            self._stop_all()

    def _check(self, on_give_up: Callable[[], None]) -> None:
        if self.failed:
            return  # gave up: the demo is stopping
        now = time.monotonic()
        with self._lock:
            for child in self.children.values():
                if child.due is None and child.proc.poll() is not None:
                    while child.restarts and child.restarts[0] < now - self.window_s:
                        child.restarts.popleft()
                    code = child.proc.returncode
                    if len(child.restarts) >= self.limit:
                        self.failed = (
                            f"{child.name} exited with code {code} after {self.limit} restarts within "
                            f"{self.window_s:.0f} s; giving up (log: {self.log_dir / (child.name + '.log')})"
                        )
                        self.say(self.failed)
                        on_give_up()
                        return
                    delay = self.backoff_s[min(len(child.restarts), len(self.backoff_s) - 1)]
                    child.due = now + delay
                    self.say(
                        f"{child.name} exited with code {code}; restarting in {delay:g} s "
                        f"(restart {len(child.restarts) + 1} of at most {self.limit} in {self.window_s:.0f} s; "
                        f"log: {self.log_dir / (child.name + '.log')})"
                    )
                elif child.due is not None and now >= child.due and not self._closing.is_set():
                    child.proc = self._spawn(child.name, child.argv)
                    child.restarts.append(now)
                    child.restarted += 1
                    child.due = None
                    self.say(f"{child.name} restarted (pid {child.proc.pid})")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every child (SIGTERM in reverse start order, SIGKILL after ``timeout``)."""
        self._closing.set()
        if self._supervisor is not None and self._supervisor.is_alive():
            self._supervisor.join(timeout + 10)
        else:
            self._stop_all(timeout)

    def _stop_all(self, timeout: float = 10.0) -> None:
        with self._lock:
            procs = list(self.procs.values())
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Live:
    """What the summary line shows; written by probe threads, read by the printer."""

    sent: int = 0
    freshness_ms: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=200))
    request_ms: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=500))
    request_errors: int = 0
    freshness_unseen: int = 0  # probed events not seen within 5 s (or pushed out of the id window)
    adapter: str = "-"
    adapters_seen: set[str] = field(default_factory=set)
    swaps: int = 0
    last_event: dict | None = None
    last_event_wall: float = 0.0
    # the ranking stage, from serving's /metrics (every /recommend, the page's too) and Redis
    ranker: str = "none"  # the version serving ranks with; "none" while the blend answers
    rankers_seen: set[str] = field(default_factory=set)
    answered_by: dict[str, float] = field(default_factory=dict)  # "ranker" / "blend" / "popularity" -> answers
    fallbacks: dict[str, float] = field(default_factory=dict)  # why the ranker did not answer -> answers
    collab_applied: int = 0  # events whose effects the collaborative flow has in Redis


def _p(values: collections.deque[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def pick_shopper(dataset: Path) -> str:
    """A shopper who buys early in the replay and often, so the page has something to show
    from the first seconds and keeps moving: the most baskets among those with a basket in
    the first 3 % of the time span."""
    files = locate(dataset)
    baskets: dict[str, set[float]] = collections.defaultdict(set)
    for e in read_events(files.events, files.name):
        if e["kind"] == "purchase" and isinstance(e["ts"], float):
            baskets[e["user_id"]].add(e["ts"])
    if not baskets:
        return ""
    first = min(min(ts) for ts in baskets.values())
    last = max(max(ts) for ts in baskets.values())
    early = [u for u, ts in baskets.items() if min(ts) <= first + 0.03 * (last - first)] or list(baskets)
    return max(early, key=lambda u: (len(baskets[u]), u))


def _wait_ready(url: str, children: Children, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if children.failed:
            raise RuntimeError(children.failed)
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"serving was not ready within {timeout:.0f} s")


def _probe_requests(url: str, user: str, live: Live, stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=5.0) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = client.get("/recommend", params={"user_id": user, "k": 10})
                live.request_ms.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200:
                    live.request_errors += 1
                else:
                    version = r.json().get("adapter_version", "-")
                    if version != live.adapter and live.adapter != "-":
                        live.swaps += 1
                    live.adapter = version
                    live.adapters_seen.add(version)
            except httpx.HTTPError:
                live.request_errors += 1
            stop.wait(0.25)


def read_ranking(metrics_text: str) -> tuple[str | None, dict[str, float], dict[str, float]]:
    """(active ranker version or None, answers by what ordered them, fallbacks by reason) from serving's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    version: str | None = None
    by: dict[str, float] = {}
    reasons: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "freshrec_ranker_info" and sample.value == 1:
                version = sample.labels["version"]
            elif sample.name == "freshrec_recommend_ranked_total":
                by[sample.labels["by"]] = sample.value
            elif sample.name == "freshrec_ranker_fallbacks_total":
                reasons[sample.labels["reason"]] = sample.value
    return version, by, reasons


def _probe_ranking(url: str, settings: Settings, live: Live, stop: threading.Event) -> None:
    """Serving's ranker and answer counts (its /metrics), and the collaborative flow's progress (Redis)."""
    import redis

    from streams.flow_process import applied_count

    client = redis.Redis.from_url(settings.redis_url)
    with httpx.Client(base_url=url, timeout=5.0) as http:
        while not stop.wait(1.0):
            try:
                version, live.answered_by, live.fallbacks = read_ranking(http.get("/metrics").text)
                live.ranker = version or "none"
                if version:
                    live.rankers_seen.add(version)
            except httpx.HTTPError:
                pass
            try:
                live.collab_applied = applied_count(settings, "collab", client)
            except redis.RedisError:
                pass


def _probe_freshness(settings: Settings, live: Live, stop: threading.Event) -> None:
    """Time from sending an event until its user's Redis state holds it."""
    import redis

    from stores.user_store import read_user_state

    client = redis.Redis.from_url(settings.redis_url)
    probed: str | None = None
    while not stop.is_set():
        event, sent_wall = live.last_event, live.last_event_wall
        if event is None or event["event_id"] == probed:
            stop.wait(0.2)
            continue
        probed = event["event_id"]
        deadline = time.monotonic() + 5.0
        seen = False
        while time.monotonic() < deadline and not stop.is_set():
            try:
                state = read_user_state(client, settings, event["user_id"])
            except redis.RedisError:
                break
            if state is not None and event["event_id"] in state.recent_ids:
                live.freshness_ms.append((time.time() - sent_wall) * 1000)
                seen = True
                break
            time.sleep(0.002)
        if not seen and not stop.is_set():
            live.freshness_unseen += 1
        stop.wait(0.3)


def run_demo(settings: Settings, minutes: float, speedup: float | None, dataset: Path, port: int | None) -> int:
    state_dir = settings.state_dir / "demo"
    shutil.rmtree(state_dir, ignore_errors=True)
    api_port = port or (settings.api_port if not port_open("127.0.0.1", settings.api_port) else free_port())
    token = settings.admin_token or secrets.token_urlsafe(16)
    # /users (a shopper's history) needs its own token; the page gets it in the #fragment,
    # which browsers never send to the server, so it stays out of access logs.
    users_token = settings.users_token or secrets.token_urlsafe(16)
    demo = settings.model_copy(
        update={
            "kafka_bootstrap": f"127.0.0.1:{free_port()}",
            "redis_url": f"redis://127.0.0.1:{free_port()}/0",
            "state_dir": state_dir,
            "api_port": api_port,
            "admin_token": token,
            "users_token": users_token,
            "demo_actions": True,  # the page acts as the shopper it follows (loopback only)
            **demo_ranking(settings),
        }
    )
    env = demo.child_env(os.environ)
    url = f"http://127.0.0.1:{api_port}"
    # Until the replay runs, SIGINT and SIGTERM unwind as KeyboardInterrupt through the
    # ``finally`` below. SIGINT explicitly: a demo started in the background by a script
    # inherits it as ignored. SIGTERM: its default would end the demo without ``finally``.
    previous = {sig: signal.signal(sig, h) for sig, h in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, unwind))}
    # Started first, so that a demo killed at any later point has the broker and Redis stopped.
    guard = Guard()
    children = Children(env, state_dir / "logs", say=tqdm.write)
    live = Live()
    stop = threading.Event()
    try:
        try:
            stack = start_stack(demo, reuse_redis=False)
        except InfraError as exc:
            print(f"freshrec demo: {exc}", file=sys.stderr)
            return 1
        guard.watch(stack.kafka.pid)
        guard.watch(stack.redis.pid)
        print(f"broker {stack.bootstrap} · redis {stack.redis_url} · logs in {state_dir / 'logs'}")
        for name, argv in COMPONENTS[:-1]:
            children.start(name, argv)
        children.supervise(on_give_up=stop.set)
        catalog = replay(demo, dataset, limit=0, progress=False)
        print(f"catalog: {catalog.items} items sent")
        children.start("serving", COMPONENTS[-1][1])
        _wait_ready(url, children, timeout=180)
        shopper = pick_shopper(dataset)
        print(f"\nopen {url}/?user={shopper}#token={users_token}   (the page follows shopper {shopper})")
        print(f"admin token for {url}/admin: {token}\n")

        threading.Thread(target=_probe_requests, args=(url, shopper, live, stop), daemon=True).start()
        threading.Thread(target=_probe_freshness, args=(demo, live, stop), daemon=True).start()
        threading.Thread(target=_probe_ranking, args=(url, demo, live, stop), daemon=True).start()
        threading.Thread(target=_print_summary, args=(live, stop, children), daemon=True).start()

        def on_event(event: dict) -> None:
            live.sent += 1
            live.last_event, live.last_event_wall = event, time.time()
            if stop.is_set():
                raise KeyboardInterrupt

        total_s = minutes * 60
        if speedup is None:
            first, last = _time_span(dataset)
            # Leave the last fifth of the time to watch the final adapters go live.
            speedup = max((last - first) / (total_s * 0.8), 1.0)
        timer = threading.Timer(total_s, stop.set)
        timer.daemon = True
        timer.start()
        # From here Ctrl-C (SIGINT) or SIGTERM asks for a stop that on_event honours between
        # two sends: a KeyboardInterrupt raised inside the Kafka client could leave a record
        # half handed over (the browser test, which starts the demo in the background, once
        # had to kill it).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        try:
            replay(demo, dataset, Pace(speedup=speedup), progress=True, include_catalog=False, on_event=on_event)
            print("\nreplay finished; serving keeps running until the time is up (Ctrl-C to stop)")
            while not stop.is_set():
                stop.wait(0.5)
        except KeyboardInterrupt:
            pass
        if children.failed:
            print(f"\nfreshrec demo: {children.failed}", file=sys.stderr)
            return 1
        _final_summary(live, children)
        return 0
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"freshrec demo: {exc} (logs in {state_dir / 'logs'})", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():  # a second Ctrl-C while stopping interrupts again
            signal.signal(sig, handler)
        stop.set()
        children.stop()
        stop_stack(state_dir)
        guard.close()


def _time_span(dataset: Path) -> tuple[float, float]:
    files = locate(dataset)
    first = last = None
    for e in read_events(files.events, files.name):
        if isinstance(e["ts"], float):
            first = e["ts"] if first is None else first
            last = e["ts"]
    return (first or 0.0), (last or 0.0)


def _restarts(restarts: dict[str, int]) -> str:
    return ", ".join(f"{name}×{n}" for name, n in restarts.items())


def _summary_line(
    live: Live, rate: float, restarts: dict[str, int] | None = None, answered_since: dict[str, float] | None = None
) -> str:
    """The live line; the ranker's share is of the answers since ``answered_since`` (the previous line's counts)."""
    return (
        f"events/s {rate:7.0f} · freshness p99 {_p(live.freshness_ms, 99):6.1f} ms · "
        f"adapter {live.adapter} ({len(live.adapters_seen - {'base', '-'})} learned, {live.swaps} swaps) · "
        f"collab lag {max(live.sent - live.collab_applied, 0):,} events · "
        f"ranker {live.ranker} (ordered {_share(live.answered_by, 'ranker', answered_since)} of /recommend) · "
        f"/recommend p50 {_p(live.request_ms, 50):5.1f} ms p99 {_p(live.request_ms, 99):5.1f} ms · "
        f"errors {live.request_errors}"
        + (f" · restarts {_restarts(restarts)}" if restarts else "")
    )


def _share(answered_by: dict[str, float], by: str, since: dict[str, float] | None = None) -> str:
    """``by``'s share of the /recommend answers counted in ``answered_by`` (less those in ``since``)."""
    since = since or {}
    counts = {name: n - since.get(name, 0) for name, n in answered_by.items()}
    total = sum(counts.values())
    return f"{counts.get(by, 0) / total:.0%}" if total else "-"


def _print_summary(live: Live, stop: threading.Event, children: Children) -> None:
    last_sent, last_t, last_answered = 0, time.monotonic(), dict(live.answered_by)
    while not stop.wait(2.0):
        now = time.monotonic()
        rate = (live.sent - last_sent) / (now - last_t)
        answered = dict(live.answered_by)
        tqdm.write(_summary_line(live, rate, children.restarts(), last_answered))
        last_sent, last_t, last_answered = live.sent, now, answered


def _final_summary(live: Live, children: Children) -> None:
    print("\ndemo summary")
    print(f"  events sent           {live.sent:,}")
    print(
        f"  freshness p50/p99     {_p(live.freshness_ms, 50):.1f} / {_p(live.freshness_ms, 99):.1f} ms "
        f"({len(live.freshness_ms)} probes, {live.freshness_unseen} not seen within 5 s)"
    )
    print(f"  /recommend p50/p99    {_p(live.request_ms, 50):.1f} / {_p(live.request_ms, 99):.1f} ms")
    print(f"  adapter versions      {sorted(live.adapters_seen)} ({live.swaps} swaps)")
    print(f"  ranker versions       {sorted(live.rankers_seen)} (active at the end: {live.ranker})")
    answers = int(sum(live.answered_by.values()))
    reasons = ", ".join(f"{r} {int(n)}" for r, n in sorted(live.fallbacks.items(), key=lambda rn: -rn[1]))
    shares = " · ".join(f"{by} {_share(live.answered_by, by)}" for by in ("ranker", "blend", "popularity"))
    print(f"  /recommend ordered by {shares} of {answers:,} answers (not by the ranker: {reasons or 'none'})")
    print(f"  collab flow applied   {live.collab_applied:,} of {live.sent:,} events")
    print(f"  request errors        {live.request_errors}")
    print(f"  restarts              {_restarts(children.restarts()) or 'none'}")


def main(argv: list[str], settings: Settings) -> int:
    parser = argparse.ArgumentParser(prog="freshrec demo", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=5.0, help="stop after this long (default 5)")
    parser.add_argument("--speedup", type=float, help="times real time (default: fit the sample into the minutes)")
    parser.add_argument("--dataset", type=Path, default=settings.data_dir or SAMPLE_DIR)
    parser.add_argument("--port", type=int, help="API port (default: FRESHREC_API_PORT, or a free one if taken)")
    args = parser.parse_args(argv)
    return run_demo(settings, args.minutes, args.speedup, args.dataset, args.port)
