"""Followers never skip: serving's connection to the broker is killed mid-stream, and nothing is lost.

Each test starts its own Tansu broker whose advertised listener is a loopback
:class:`~tests.integration.tcp_proxy.TcpProxy`, so every client connection goes through
the proxy. The proxy cuts serving's connections (client ids ``freshrec-serving*``) and
refuses them for a while, as a broker or network outage would, while the test's own
producer keeps writing: records arrive that serving has not read. Afterwards, serving's
index must equal the catalog (every item present with its latest vector, deleted ones
gone), and an adapter announced during the cut must be live.

Serving runs for real (its follower threads, the routing of item vectors, the swap,
a real ``LiveIndex``) over the deterministic :class:`~serving.testing.HashEncoder` and an
in-memory catalog, so the expected vector of every item is known exactly.

The consumers' request timeout is set to 2 s here (kafka-python's default is 30 s): the
old followers lost records when a request timed out during an outage (they reopened at
the end of the topic), and a 2 s timeout lets a 12 s outage show that instead of a 40 s one.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from freshrec.contracts import AdapterAnnouncement, CatalogItem, ItemVector
from freshrec.infra import Stack, create_topics, free_port, port_open, tansu_binary
from freshrec.producer import RecordProducer
from freshrec.settings import Settings
from serving.runtime import ServingRuntime
from serving.testing import CatalogTwin, HashEncoder, hash_tools
from tests.integration.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

DIM = 32
OUTAGE_S = 12.0  # > the 5 s lag probe period + its timeout, with room for a loaded machine
SERVING = ("freshrec-serving",)  # both serving followers' client ids start with this


@dataclasses.dataclass
class ProxiedBroker:
    proxy: TcpProxy
    settings: Settings


@pytest.fixture
def proxied(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ProxiedBroker]:
    """A dedicated Tansu broker reachable only through a cuttable proxy, with freshrec's topics."""
    from kafka import KafkaConsumer

    monkeypatch.setitem(KafkaConsumer.DEFAULT_CONFIG, "request_timeout_ms", 2000)
    broker_port = free_port()
    proxy = TcpProxy("127.0.0.1", broker_port)
    log = open(tmp_path / "tansu.log", "wb")
    broker = subprocess.Popen(
        [tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{broker_port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{proxy.port}", "--storage-engine", "memory://tansu/"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", broker_port):
            assert broker.poll() is None and time.monotonic() < deadline, "the Tansu broker did not start"
            time.sleep(0.05)
        tag = uuid.uuid4().hex[:8]
        settings = Settings(
            kafka_bootstrap=f"127.0.0.1:{proxy.port}",
            redis_url=stack.redis_url,
            topic_prefix=f"c{tag}.",
            redis_prefix=f"c{tag}:",
            state_dir=tmp_path / "state",
            partitions=4,
            serve_version="base",
        )
        create_topics(settings.kafka_bootstrap, settings.topics.all(), settings.partitions)
        yield ProxiedBroker(proxy, settings)
    finally:
        proxy.close()
        broker.terminate()
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()
        log.close()


def _item(n: int, rev: int = 0) -> CatalogItem:
    words = ["red", "lunch", "bag", "mug", "candle", "tin", "heart", "star", "jar", "lamp"]
    return CatalogItem(item_id=f"it{n:03d}", title=f"{words[n % 10]} {words[(n // 10) % 10]} item {n} rev {rev}")


class Catalog:
    """The catalog (what serving's build reads) and the item-vectors topic, kept in step as
    the catalog flow and the indexer keep them: each change updates the catalog, then
    publishes the item's vector as the indexer would encode it (or None for a delete)."""

    def __init__(self, settings: Settings, n: int) -> None:
        self.settings = settings
        self.twin = CatalogTwin({(it := _item(i)).item_id: it for i in range(n)})
        self.encoder = HashEncoder("base", DIM)
        self.producer = RecordProducer(settings, client_id="test-producer")  # never cut

    def update(self, numbers: range, rev: int) -> None:
        for n in numbers:
            item = _item(n, rev)
            self.twin.put(item)
            vec = ItemVector(item.item_id, "base", self.encoder.encode([item.text()])[0], time.time())
            self.producer.send(self.settings.topics.item_vectors, item.item_id, vec.to_bytes())
        self._flush()

    def delete(self, numbers: range) -> None:
        for n in numbers:
            item_id = _item(n).item_id
            self.twin.delete(item_id)
            self.producer.send(self.settings.topics.item_vectors, item_id, ItemVector(item_id, "base", None).to_bytes())
        self._flush()

    def _flush(self) -> None:
        report = self.producer.flush(30)
        assert report.failed == 0, report.errors[-3:]

    def mismatches(self, runtime: ServingRuntime) -> list[str]:
        """What differs between serving's active index and the catalog ([] when equal)."""
        pair = runtime.active.pair
        assert pair is not None
        items = self.twin.all()
        out = [f"{i}: in the index, not in the catalog" for i in sorted(set(pair.index.item_ids()) - set(items))]
        for item_id, item in sorted(items.items()):
            have = pair.index.reconstruct(item_id)
            if have is None:
                out.append(f"{item_id}: missing from the index")
            elif not np.allclose(have, self.encoder.encode([item.text()])[0], atol=1e-6):
                out.append(f"{item_id}: stale vector ({item.title!r} in the catalog)")
        return out

    def close(self) -> None:
        self.producer.close()


def _serving(settings: Settings, tools: Any) -> ServingRuntime:
    runtime = ServingRuntime(settings, tools=tools)
    runtime.start()
    assert runtime.wait_ready(60)
    assert runtime.vectors is not None and runtime.vectors.ready.wait(30)
    return runtime


def _wait(check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not result or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_item_vectors_published_while_serving_is_cut_off_all_reach_the_index(proxied: ProxiedBroker) -> None:
    settings = proxied.settings
    catalog = Catalog(settings, 40)
    runtime = _serving(settings, hash_tools(catalog.twin, dim=DIM))
    try:
        catalog.update(range(0, 20), rev=1)
        catalog.update(range(40, 50), rev=1)  # new items
        assert _wait(lambda: catalog.mismatches(runtime), 30) == []

        with proxied.proxy.outage(OUTAGE_S, clients=SERVING):
            catalog.update(range(10, 30), rev=2)  # changes serving has not read...
            catalog.update(range(50, 60), rev=2)  # ...new items...
            catalog.delete(range(30, 35))  # ...and deletes
            time.sleep(OUTAGE_S / 2)
            catalog.update(range(12, 14), rev=3)  # a second change of some during the outage
        assert proxied.proxy.dropped + proxied.proxy.refused > 0  # the cut did reach serving
        catalog.update(range(35, 40), rev=4)  # and traffic goes on after it

        left = _wait(lambda: catalog.mismatches(runtime), 60)
        assert left == [], f"{len(left)} items differ after the outage, e.g. {left[:5]}"
        assert runtime.vectors.errors > 0  # the outage was noticed (a lag probe timed out)...
        assert _wait(lambda: runtime.vectors.outage_s, 10) == 0.0  # ...and is over
    finally:
        runtime.stop()
        catalog.close()


def test_an_adapter_announced_while_serving_is_cut_off_goes_live_after_it(proxied: ProxiedBroker) -> None:
    """The announcement arrives during the cut, and the first attempt to act on it fails
    (the adapter registry is briefly unreadable: it sat behind the same outage). The old
    follower reopened at the end of the topic after that error, so the version never went
    live; now the announcement is handled again after a backoff."""
    settings = proxied.settings
    catalog = Catalog(settings, 20)
    tools = hash_tools(catalog.twin, dim=DIM, known={"v1"})
    failures = {"left": 1}
    load = tools.load_adapter

    def flaky_load(version: str) -> Path | None:
        if version == "v1" and failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(f"adapter registry unreadable for {version}: transport endpoint is not connected")
        return load(version)

    runtime = _serving(settings, dataclasses.replace(tools, load_adapter=flaky_load))
    try:
        assert runtime.active_version() == "base"
        with proxied.proxy.outage(OUTAGE_S, clients=SERVING):
            ann = AdapterAnnouncement(version="v1", path=str(settings.state_dir / "adapters" / "v1"), created=time.time())
            catalog.producer.send(settings.topics.adapters, "v1", ann.to_bytes())
            catalog._flush()
        assert proxied.proxy.dropped + proxied.proxy.refused > 0

        deadline = time.monotonic() + 60
        while runtime.active_version() != "v1" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert runtime.active_version() == "v1", (
            f"v1 announced during the outage is not live: failures left {failures['left']}, "
            f"announcements seen {runtime.announcements}"
        )
        assert failures["left"] == 0 and runtime.adapter_errors >= 1
    finally:
        runtime.stop()
        catalog.close()


class HeldEncoder(HashEncoder):
    """A :class:`HashEncoder` that can hold one ``encode`` call until released, so a test
    can cut the broker exactly while the indexer has a batch in hand."""

    def __init__(self, version: str, dim: int) -> None:
        super().__init__(version, dim)
        self.hold = threading.Event()
        self.holding = threading.Event()
        self.release = threading.Event()

    def encode(self, texts: Any, batch_size: int = 64) -> np.ndarray:
        if self.hold.is_set():
            self.hold.clear()
            self.holding.set()
            self.release.wait(30)
        return super().encode(texts, batch_size)


def test_the_indexer_re_reads_the_batch_it_could_not_publish_during_a_cut(
    proxied: ProxiedBroker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The indexer loses the broker while publishing a batch: the publish fails (3 s delivery
    timeout here; 2 min by default) and, before, the process died on it. Now it re-reads
    changed-items from its checkpoint and every item ends with its latest vector."""
    from kafka import KafkaProducer

    from indexer.process import IndexerProcess

    caplog.set_level(logging.WARNING, logger="freshrec.indexer")
    monkeypatch.setitem(KafkaProducer.DEFAULT_CONFIG, "request_timeout_ms", 2000)
    monkeypatch.setitem(KafkaProducer.DEFAULT_CONFIG, "delivery_timeout_ms", 3000)
    settings = proxied.settings.model_copy(update={"indexer_flush_seconds": 0.2})
    encoder = HeldEncoder("base", DIM)
    proc = IndexerProcess(settings, version="base", make_encoder=lambda v: encoder, follow_adapters=False)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            proc.run(stop=stop)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    expected: dict[str, CatalogItem] = {}
    with RecordProducer(settings, client_id="test-changes") as producer:

        def change(numbers: range, rev: int) -> None:
            for n in numbers:
                item = _item(n, rev)
                expected[item.item_id] = item
                producer.send(settings.topics.changed_items, item.item_id, item.to_bytes())
            assert producer.flush(30).failed == 0

        thread.start()
        try:
            change(range(0, 10), rev=1)
            assert _wait(lambda: _vector_mismatches(settings, expected, 5), 30) == []
            encoder.hold.set()
            change(range(10, 20), rev=1)
            assert encoder.holding.wait(30), "the indexer did not pick up the batch"
            with proxied.proxy.outage(OUTAGE_S, clients=("freshrec-indexer",)):
                encoder.release.set()  # it publishes now, into the cut
                change(range(5, 25), rev=2)  # and changes keep coming meanwhile
            change(range(25, 30), rev=1)
            left = _wait(lambda: _vector_mismatches(settings, expected, 5), 60)
            assert not errors, f"the indexer stopped: {errors[0]!r}"
            assert left == [], f"{len(left)} items without their latest vector, e.g. {left[:5]}"
            retried = [r.getMessage() for r in caplog.records if "from the last checkpoint in" in r.getMessage()]
            assert retried, "the cut never made a publish fail: the test did not exercise the retry"
        finally:
            stop.set()
            thread.join(30)


def _vector_mismatches(settings: Settings, expected: dict[str, CatalogItem], read_s: float) -> list[str]:
    """Items whose last vector on item-vectors is not their latest text's ([] when all are)."""
    from freshrec.consumer import TopicFollower

    last: dict[str, np.ndarray | None] = {}
    with TopicFollower(settings, settings.topics.item_vectors, start="beginning", client_id="test-vectors") as follower:
        deadline = time.monotonic() + read_s
        while time.monotonic() < deadline:
            batch = follower.poll(0.2)
            for m in batch:
                vec = ItemVector.from_bytes(m.value)
                last[vec.item_id] = vec.vector
            if not batch and len(last) >= len(expected):
                break
    enc = HashEncoder("base", DIM)
    out = []
    for item_id, item in sorted(expected.items()):
        have = last.get(item_id)
        if have is None or not np.allclose(have, enc.encode([item.text()])[0], atol=1e-6):
            out.append(f"{item_id}: {'no vector' if have is None else 'stale vector'} ({item.title!r})")
    return out
