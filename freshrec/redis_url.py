"""What ``settings.redis_url`` names, one Redis server or a Redis Cluster, and a client for it.

``redis://host:port/db`` (or ``rediss://`` for TLS) is one server, as redis-py reads it.
``redis+cluster://host:port[,host:port...]`` (or ``rediss+cluster://``) is a Redis
Cluster: the listed nodes are only where the client starts, it discovers the others and
the slot map itself (list more than one so a client can start while one node is down).
A cluster has database 0 only; user and password go before the first host as usual.

The cluster client returned here is a :class:`RedisCluster` whose multi-key reads work
across slots: ``mget`` splits its keys by slot (one MGET per slot, pipelined: not atomic
across slots, which no reader of freshrec needs: each value is written whole), and so
does an ``mget`` queued in one of its pipelines. Every *write* that must be atomic
(the flows' guarded Lua calls) keeps its keys in one slot by the hash tags of
:mod:`stores.user_store` and :mod:`stores.catalog_store`, so it needs no such help.

Example::

    >>> is_cluster_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7000")
    True
    >>> cluster_nodes("redis+cluster://:secret@10.0.0.1:7000,10.0.0.2:7001/0")
    [('10.0.0.1', 7000), ('10.0.0.2', 7001)]
    >>> is_cluster_url("redis://127.0.0.1:6379/0")
    False
"""

from __future__ import annotations

from typing import Any

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (a ``redis+cluster://`` or ``rediss+cluster://`` URL)."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def _split_cluster_url(url: str) -> tuple[str, str, list[tuple[str, int]]]:
    """(plain scheme, ``user:pass@`` or "", seed nodes) of a cluster URL; ValueError names what is wrong."""
    scheme, _, rest = url.partition("://")
    auth, at, hosts_path = rest.rpartition("@")
    hosts, _, path = hosts_path.partition("/")
    if path not in ("", "0"):
        raise ValueError(f"redis_url {url!r}: a Redis Cluster has database 0 only, not {path!r}; drop the /{path}")
    nodes: list[tuple[str, int]] = []
    for hostport in hosts.split(","):
        host, colon, port = hostport.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"redis_url {url!r}: each cluster node is host:port, not {hostport!r}")
        nodes.append((host.strip("[]"), int(port)))
    return CLUSTER_SCHEMES[scheme.lower()], auth + at, nodes


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The seed nodes ``(host, port)`` of a cluster URL."""
    return _split_cluster_url(url)[2]


def open_client(url: str, **options: Any) -> Any:
    """A redis-py client for ``url`` (bytes in, bytes out): :class:`redis.Redis` for one
    server, :class:`SlotSafeCluster` for a cluster URL. ``options`` go to the client
    (timeouts, ``retry``, ...)."""
    import redis

    options.setdefault("decode_responses", False)
    if not is_cluster_url(url):
        return redis.Redis.from_url(url, **options)
    from redis.cluster import ClusterNode

    scheme, auth, nodes = _split_cluster_url(url)
    (host, port), others = nodes[0], nodes[1:]
    # health_check_interval is a per-connection option redis-py's cluster client accepts too.
    return _cluster_class().from_url(
        f"{scheme}://{auth}{host}:{port}/0", startup_nodes=[ClusterNode(h, p) for h, p in others], **options
    )


_CLASS: Any = None


def _cluster_class() -> Any:
    """:class:`SlotSafeCluster`, defined on first use so importing this module needs no redis-py."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _define_cluster_class()
    return _CLASS


def _define_cluster_class() -> Any:
    from redis.cluster import ClusterPipeline, RedisCluster
    from redis.commands.helpers import list_or_args

    class SlotSafePipeline(ClusterPipeline):  # type: ignore[misc]
        """A cluster pipeline whose ``mget`` may span slots: one MGET per slot is queued,
        and :meth:`execute` hands back one reply for the call, in the keys' order."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._merges: list[tuple[int, list[list[Any]], list[Any]]] = []

        def mget(self, keys: Any, *args: Any) -> Any:
            wanted = list_or_args(keys, args)
            groups = list(self._partition_keys_by_slot(wanted).values())
            self._merges.append((len(self), groups, wanted))
            for group in groups:
                self.execute_command("MGET", *group)
            return self

        def execute(self, raise_on_error: bool = True) -> list[Any]:
            merges, self._merges = self._merges, []  # before: execute() ends with reset()
            replies = super().execute(raise_on_error)
            out: list[Any] = []
            at = 0
            for start, groups, wanted in merges:
                out.extend(replies[at:start])
                values: dict[Any, Any] = {}
                for group, reply in zip(groups, replies[start : start + len(groups)], strict=True):
                    values.update(zip(group, reply, strict=True))
                out.append([values[k] for k in wanted])
                at = start + len(groups)
            out.extend(replies[at:])
            return out

        def reset(self) -> None:
            super().reset()
            self._merges = []

    class SlotSafeCluster(RedisCluster):  # type: ignore[misc]
        """:class:`RedisCluster` with ``mget`` across slots (see the module docstring)."""

        def mget(self, keys: Any, *args: Any) -> Any:
            return self.mget_nonatomic(keys, *args)

        def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
            if transaction or shard_hint:
                return super().pipeline(transaction, shard_hint)
            # The arguments RedisCluster.pipeline passes (redis-py 8; tests/unit/test_redis_url.py).
            return SlotSafePipeline(
                nodes_manager=self.nodes_manager,
                commands_parser=self.commands_parser,
                startup_nodes=self.nodes_manager.startup_nodes,
                result_callbacks=self.result_callbacks,
                cluster_response_callbacks=self.cluster_response_callbacks,
                read_from_replicas=self.read_from_replicas,
                load_balancing_strategy=self.load_balancing_strategy,
                reinitialize_steps=self.reinitialize_steps,
                retry=self.retry,
                lock=self._lock,
                transaction=transaction,
                event_dispatcher=self._event_dispatcher,
            )

    return SlotSafeCluster
