"""One fault scenario: a private system under a paced replay, a process killed and restarted, then judged.

The system is what production runs, one process per service (``freshrec stream users``,
``stream catalog``, ``index``, ``serve``; ``learn`` only in the learner scenario, whose
CPU training would otherwise starve the rest of two shared cores), on a broker and a
Redis of its own on free loopback ports and a state directory of its own.

Anything else that dies meanwhile is restarted too, as a supervisor (compose's
``restart: on-failure``) would, and counted as a crash: a flow that dies of a Redis
outage is a finding, and what it lost is still measured after its restart.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from freshrec.consumer import TopicFollower
from freshrec.infra import create_topics, free_port
from freshrec.producer import RecordProducer
from freshrec.settings import Settings
from serving.cli import worker_count
from serving.runtime import admin_enabled
from streams.flow_process import FlowProcess, applied_count, wait_applied
from stores.redis_client import connect

from . import _faults_check as check
from ._faults_procs import Child, alive, broker_child, cmdline, freshrec_child, group_members, redis_child
from ._faults_requests import RequestLoop, split_errors

RECOVERY_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 180.0


@dataclass
class Config:
    events: list[dict[str, Any]]
    items: list[dict[str, Any]]
    rate: float = 1000.0
    kills: int = 2
    seed: int = 7
    request_rate: float = 10.0
    serving: bool = True
    indexer: bool = True
    catalog_head: int = 500  # catalog records sent before serving starts (it needs a catalog to be ready)
    learner_events: int = 3000
    exports: Path | None = None  # a shared base-model ONNX export, linked into each state dir
    broker_storage: str = "memory://tansu/"


@dataclass
class FlowChild:
    """A :class:`FlowProcess` behind the same small interface as :class:`Child`."""

    name: str
    flow: FlowProcess

    def start(self, wait: bool = True) -> FlowChild:
        self.flow.start()
        return self

    def alive(self) -> bool:
        return self.flow.alive()

    def kill9(self) -> list[int]:
        pid = self.flow.proc.pid if self.flow.proc else 0
        kids = _children(pid)
        self.flow.kill()
        return kids

    def cleanup(self) -> None:
        self.flow.stop()

    def log_tail(self, chars: int = 2000) -> str:
        return self.flow.log_tail(chars)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


@dataclass
class Kill:
    at_s: float  # seconds after the replay started
    down_s: float
    orphans: list[str]
    recovery_s: float | None = None


@dataclass
class Scenario:
    """State of one run; :meth:`run` returns its figures."""

    fault: str
    cfg: Config
    root: Path
    rng: random.Random = field(init=False)
    children: dict[str, Any] = field(default_factory=dict)
    crashes: dict[str, int] = field(default_factory=dict)
    crash_logs: dict[str, str] = field(default_factory=dict)
    sent_events: list[str] = field(default_factory=list)
    sent_items: int = 0
    down: set[str] = field(default_factory=set)
    orphan_pids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"{self.cfg.seed}:{self.fault}")
        learner = self.fault == "learner"
        self.settings = Settings(
            kafka_bootstrap=f"127.0.0.1:{free_port()}",
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
            state_dir=self.root / "state",
            api_port=free_port(),
            topic_prefix="faults.",
            redis_prefix="faults:",
            partitions=4,
            device="cpu",
            # No evaluation, so no publication: the learner scenario checks delivery, and a
            # swap would make serving rebuild mid-run for reasons unrelated to the fault.
            learner_eval_every=1_000_000 if learner else 10,
            # A short held-out window: pairs in it are not trained until pushed out, and a
            # few thousand events give only a few hundred pairs.
            learner_eval_window=32 if learner else 256,
            learner_flush_seconds=1.0,
        )
        self.events = self.cfg.events[: self.cfg.learner_events] if learner else self.cfg.events
        # The learner skips a pair whose target it cannot name (no text, not yet in the catalog):
        # by design, and a race with the catalog tail. The whole catalog first makes every pair
        # trainable, so any pair neither trained nor held is lost, not skipped.
        self.catalog_head = len(self.cfg.items) if learner else self.cfg.catalog_head

    # -- processes -----------------------------------------------------------------------

    def _start_system(self) -> None:
        s, logs = self.settings, self.root / "logs"
        s.state_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.exports is not None:
            (s.state_dir / "exports").symlink_to(self.cfg.exports, target_is_directory=True)
        self.children["broker"] = broker_child(s, self.cfg.broker_storage, logs / "broker.log").start()
        self.children["redis"] = redis_child(s, self.root / "redis", logs / "redis.log").start()
        create_topics(s.kafka_bootstrap, s.topics.all(), s.partitions)
        for flow in ("users", "catalog"):
            self.children[flow] = FlowChild(flow, FlowProcess(s, flow, log=logs / f"{flow}.log")).start()
        if self.cfg.indexer or self.fault == "indexer":
            self.children["indexer"] = freshrec_child("indexer", s, ["index"], logs / "indexer.log").start()
        if self.fault == "learner":
            self.children["learner"] = freshrec_child("learner", s, ["learn", "--device", "cpu"],
                                                      logs / "learner.log").start()

    def _serving(self) -> Child:
        return freshrec_child("serving", self.settings, ["serve", "--log-level", "info"],
                              self.root / "logs" / "serving.log", ready=self._serving_ready, ready_timeout_s=180)

    def _serving_ready(self) -> bool:
        """Every worker process answers /readyz 200 (each loads its own pair after a
        restart, so one ready worker is not a recovered service): fresh connections,
        which the kernel spreads over the workers, until each worker has said ready."""
        workers = worker_count(self.settings, admin=admin_enabled(self.settings))
        seen: set[int] = set()
        try:
            for _ in range(8 * workers):
                r = httpx.get(f"http://127.0.0.1:{self.settings.api_port}/readyz", timeout=5)
                if r.status_code != 200:
                    return False
                seen.add(int(r.json().get("worker") or 0))
                if len(seen) >= workers:
                    return True
        except (httpx.HTTPError, ValueError):
            return False
        return False

    def _serving_answers(self, healthy: bool = False) -> bool:
        """/recommend answers 200 (and, with ``healthy``, not degraded)."""
        try:
            r = httpx.get(f"http://127.0.0.1:{self.settings.api_port}/recommend",
                          params={"user_id": self.events[0]["user_id"], "k": 10}, timeout=5)
            return r.status_code == 200 and not (healthy and r.json().get("degraded"))
        except (httpx.HTTPError, ValueError):
            return False

    def supervise(self) -> None:
        """Restart any child that died without being killed by this run, and count it."""
        if self.down & {"broker", "redis"}:
            return  # a restart now would only die again; the outage is being measured
        for name, child in self.children.items():
            if name in self.down or child.alive():
                continue
            self.crashes[name] = self.crashes.get(name, 0) + 1
            self.crash_logs.setdefault(name, child.log_tail(1500))
            tqdm.write(f"  {self.fault}: {name} exited by itself; restarting it (crash {self.crashes[name]})")
            child.start(wait=name in ("broker", "redis"))

    def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.supervise()
            try:
                if condition():
                    return True
            except Exception:  # noqa: BLE001 - Redis or the broker may still be coming back
                pass
            time.sleep(0.1)
        return False

    # -- the replay ----------------------------------------------------------------------

    def _send_catalog_head(self) -> None:
        with RecordProducer(self.settings, client_id="faults-catalog") as producer:
            for row in self.cfg.items[: self.catalog_head]:
                producer.send_catalog(row)
            producer.flush()
        self.sent_items = min(self.catalog_head, len(self.cfg.items))

    def _replay(self, done: threading.Event, report: dict[str, Any]) -> None:
        """Events at ``rate``, the rest of the catalog spread evenly among them."""
        try:
            self._replay_paced(report)
        except Exception as exc:  # noqa: BLE001 - reported in the figures, never a hung run
            report["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            done.set()

    def _replay_paced(self, report: dict[str, Any]) -> None:
        tail = self.cfg.items[self.catalog_head:]
        every = max(len(self.events) // max(len(tail), 1), 1)
        with RecordProducer(self.settings, client_id="faults-replay") as producer:
            t0 = time.monotonic()
            bar = tqdm(total=len(self.events), desc=f"{self.fault}: replay", unit="ev", leave=False)
            for i, event in enumerate(self.events):
                delay = t0 + i / self.cfg.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if producer.send_event(event) is not None:
                    self.sent_events.append(event["event_id"])
                if tail and i % every == 0:
                    producer.send_catalog(tail.pop(0))
                    self.sent_items += 1
                if i % 500 == 499:
                    bar.update(500)
            for row in tail:
                producer.send_catalog(row)
                self.sent_items += 1
            bar.update(len(self.events) - bar.n)
            bar.close()
            report["delivery"] = producer.flush()

    # -- a kill --------------------------------------------------------------------------

    def _progress_at_kill(self) -> Callable[[], bool]:
        """The condition "recovered" for this fault, fixed at the moment of the kill."""
        s, client = self.settings, connect(self.settings)
        events_at, items_at = len(self.sent_events), self.sent_items
        flows_caught_up = lambda: (applied_count(s, "users", client) >= events_at  # noqa: E731
                                   and applied_count(s, "catalog", client) >= items_at)
        if self.fault == "users":
            return lambda: applied_count(s, "users", client) >= events_at
        if self.fault == "catalog":
            return lambda: applied_count(s, "catalog", client) >= items_at
        if self.fault == "indexer":
            # Up again (it logs where it resumes from) and its checkpoint covers the catalog of the kill.
            target = client.hlen(f"{s.redis_prefix}catalog")
            starts = self._log_count("indexer", "indexer: following")
            return lambda: (self._log_count("indexer", "indexer: following") > starts
                            and sum(check.indexer_positions(s).values()) >= target)
        if self.fault == "learner":
            # A checkpoint written by the restarted learner that covers the broker's end offsets at
            # the kill (a lower bound on the embedded broker). The learner trains slower than pairs
            # arrive, so it always has a backlog then and does write one.
            with TopicFollower(s, s.topics.train_pairs, client_id="faults-ends") as follower:
                ends = follower.end_offsets()
            t_kill = time.time()

            def learner_recovered() -> bool:
                state = check.learner_state(s)
                return state is not None and state.created > t_kill and all(
                    state.offsets.get(p, 0) >= o for p, o in ends.items())

            return learner_recovered
        if self.fault == "serving":
            # Every worker ready, not just the first to answer: each loads its own pair after
            # the restart, and the others answer 503 until they have.
            return lambda: self._serving_ready() and self._serving_answers()
        if self.fault in ("redis", "redis_empty") and self.cfg.serving:
            return lambda: flows_caught_up() and self._serving_answers(healthy=True)
        return flows_caught_up

    def _log_count(self, name: str, text: str) -> int:
        return self.children[name].log_tail(10**8).count(text)

    def _working(self, target: str) -> bool:
        """The target has done some work since it (re)started, so a kill lands mid-work, not mid-start."""
        s = self.settings
        if target == "indexer":
            return check.indexer_positions(s) != {}
        if target == "learner":
            return check.learner_positions(s) != {}
        if target == "serving":
            return self._serving_ready()
        return True

    def _kill_once(self, target: str, t_replay: float) -> tuple[Kill, tuple[float, float]]:
        self.wait_for(lambda: self._working(target), RECOVERY_TIMEOUT_S)
        recovered = self._progress_at_kill()
        child = self.children[target]
        t_kill = time.time()
        self.down.add(target)
        survivors = child.kill9()
        down_s = self.rng.uniform(0.5, 2.0)
        if self.fault == "redis_empty":
            shutil.rmtree(self.root / "redis")  # a new, empty Redis: the flows must rebuild it from their snapshots
            (self.root / "redis").mkdir()
        time.sleep(down_s)
        child.start(wait=target in ("broker", "redis"))
        self.down.discard(target)
        ok = self.wait_for(recovered, RECOVERY_TIMEOUT_S)
        t_end = time.time()
        time.sleep(max(0.0, 3.0 - (t_end - t_kill)))  # every survivor of the kill had 3 s to notice
        orphans = [cmdline(p) for p in survivors if alive(p)]
        self.orphan_pids.extend(p for p in survivors if alive(p))
        kill = Kill(round(t_kill - t_replay, 2), round(down_s, 2), orphans, round(t_end - t_kill, 2) if ok else None)
        return kill, (t_kill, t_end)

    # -- the whole run -------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        s = self.settings
        loop: RequestLoop | None = None
        kills: list[Kill] = []
        windows: list[tuple[float, float]] = []
        try:
            self._start_system()
            self._send_catalog_head()
            wait_applied(s, "catalog", self.sent_items, timeout=60)
            if self.cfg.serving:
                self.children["serving"] = self._serving().start()
                users = sorted({e["user_id"] for e in self.events})
                loop = RequestLoop(s.api_port, self.rng.sample(users, min(200, len(users))),
                                   rate=self.cfg.request_rate, seed=self.cfg.seed).start()
            done, report = threading.Event(), {}
            replay = threading.Thread(target=self._replay, args=(done, report), daemon=True)
            duration = len(self.events) / self.cfg.rate
            t_replay = time.time()
            replay.start()
            target = None if self.fault == "none" else "redis" if self.fault == "redis_empty" else self.fault
            if target is not None:
                at = sorted(self.rng.uniform(0.1, 0.8) * duration for _ in range(self.cfg.kills))
                for k, when in enumerate(at):
                    self.wait_for(lambda w=when: time.time() - t_replay >= w, duration + 60)
                    kill, window = self._kill_once(target, t_replay)
                    kills.append(kill)
                    windows.append(window)
                    tqdm.write(f"  {self.fault}: kill {k + 1} at {kill.at_s:.1f} s, down {kill.down_s:.1f} s, "
                               f"recovered in {kill.recovery_s} s, orphans {len(kill.orphans)}")
            self.wait_for(done.is_set, duration + 300)
            if "delivery" not in report:
                raise RuntimeError(f"the replay did not finish: {report.get('error', 'timed out')}")
            delivery = report["delivery"]
            figures = self._drain_and_check(delivery)
            if loop is not None:
                loop.stop()
                figures["serving_requests"] = split_errors(loop.outcomes, windows)
                figures["serving_requests"]["skipped_client_side"] = loop.skipped
                bad = [o for o in loop.outcomes if o.status != 200][:5]
                figures["serving_requests"]["error_examples"] = [f"{o.status} {o.error}" for o in bad]
                loop = None
            figures["kills"] = [vars(k) for k in kills]
            figures["crashes"] = dict(self.crashes)
            figures["crash_log_tails"] = {k: v[-600:] for k, v in self.crash_logs.items()}
            figures["delivery"] = {"confirmed": delivery.confirmed, "failed": delivery.failed,
                                   "rejected": delivery.rejected}
            figures["events"] = len(self.events)
            return figures
        finally:
            if loop is not None:
                loop.stop()
            for name in reversed(list(self.children)):
                self.children[name].cleanup()
            for pid in self.orphan_pids:  # survivors of our own kills (their groups are gone with the flows')
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            left = [pid for c in self.children.values() for g in getattr(c, "groups", []) for pid in group_members(g)]
            if left:
                tqdm.write(f"  {self.fault}: processes still alive after cleanup: {left}")

    def _drain_and_check(self, delivery: Any) -> dict[str, Any]:
        s = self.settings
        client = connect(s)
        bar = tqdm(total=5, desc=f"{self.fault}: drain and check", leave=False)
        events = check.read_messages(s, s.topics.events, len(self.sent_events))
        catalog = check.read_messages(s, s.topics.catalog, self.sent_items)
        ev_last, cat_last = check.last_offsets(events), check.last_offsets(catalog)
        bar.update()
        caught = {
            flow: self.wait_for(lambda f=flow, last=last: check.reached(check.flow_offsets(client, s, f), last),
                                DRAIN_TIMEOUT_S)
            for flow, last in (("users", ev_last), ("catalog", cat_last))
        }
        bar.update()
        ref_users = check.users_reference(s, events)
        ref_items = check.catalog_reference(catalog)
        out: dict[str, Any] = {
            "broker": check.broker_loss(self.sent_events, events, "event_id"),
            "users": check.compare_users(client, s, ref_users),
            "catalog": check.compare_catalog(client, s, ref_items),
        }
        bar.update()
        if "indexer" in self.children:
            changed = len(check.read_messages(s, s.topics.changed_items, len(ref_items), timeout_s=30))
            caught["indexer"] = self.wait_for(lambda: sum(check.indexer_positions(s).values()) >= changed,
                                              DRAIN_TIMEOUT_S)
            out["indexer"] = check.compare_vectors(s, ref_items, changed)
        if self.cfg.serving:
            caught["serving"] = self.wait_for(lambda: check.served_items(s) >= len(ref_items), 90)
            served = check.served_items(s)
            out["serving"] = {"lost": max(len(ref_items) - served, 0), "doubled": 0, "items": served}
        bar.update()
        if "learner" in self.children:
            pairs = check.read_messages(s, s.topics.train_pairs, 1, timeout_s=30)
            pair_last = {int(k.rsplit(":", 1)[1]): v + 1 for k, v in check.last_offsets(pairs).items()}
            # Drained: every pair consumed and nothing pending (trained, or in the held-out window).
            caught["learner"] = self.wait_for(
                lambda: (all(check.learner_positions(s).get(p, 0) >= o for p, o in pair_last.items())
                         and not check.learner_state(s).pending), DRAIN_TIMEOUT_S)
            self.down.add("learner")
            self.children["learner"].cleanup()  # SIGTERM: it checkpoints, then the state is final
            out["learner"] = check.compare_learner(s.state_dir, pairs, ref_items)
        bar.update()
        bar.close()
        out["caught_up"] = caught
        return out
