"""Every metric the Grafana dashboard queries exists on a real freshrec process's /metrics.

The processes, each on its own port and scraped over HTTP as Prometheus would: serving
(the real app over the real Redis, ONNX encoder and index, after a few requests), the
learner's metrics server, the collector (after one accepted and one rejected event) and
``freshrec monitor`` (the flows' progress). A metric name is read from each PromQL
expression of deploy/grafana/dashboards/freshrec.json (everything that is not a function,
keyword, label or string), and must be a sample of those scrapes, or a counter's
``_total`` / a histogram's ``_bucket``, ``_sum``, ``_count`` of a family declared there.
The second test checks the monitor's figures themselves on unapplied events.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from collector.app import create_app as create_collector
from freshrec.infra import free_port
from freshrec.producer import RecordProducer
from freshrec.settings import Settings
from learner.metrics import LearnerMetrics, MetricsServer
from models.ranker_registry import RankerRegistry
from monitor.exporter import monitor_registry
from serving.runtime import ServingRuntime
from tests.integration.test_serving_api import served, shared_exports  # noqa: F401 - fixtures
from tests.integration.test_serving_ranker import linear

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "freshrec.json"
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "inf", "nan",
}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created")}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions (followed by
    ``(``), keywords, label names (inside ``{}`` or ``by (...)``) or durations (``[5m]``)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", expr):
        if m.group(2) is None and m.group(1).lower() not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def dashboard_metric_names() -> dict[str, list[str]]:
    """metric name -> titles of the panels that query it."""
    out: dict[str, list[str]] = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            for name in promql_metric_names(target["expr"]):
                out.setdefault(name, []).append(panel["title"])
    return out


class Exposed:
    """What a set of /metrics texts offers: sample names, and declared families by type."""

    def __init__(self, texts: list[str]) -> None:
        self.samples: set[str] = set()
        self.families: dict[str, str] = {}
        for text in texts:
            for family in text_string_to_metric_families(text):
                self.families[family.name] = family.type
                self.samples |= {s.name for s in family.samples}

    def has(self, name: str) -> bool:
        if name in self.samples:
            return True
        return any(
            name.endswith(suffix) and SUFFIXES.get(self.families.get(name[: -len(suffix)], ""), ()) and
            suffix in SUFFIXES[self.families[name[: -len(suffix)]]]
            for suffix in ("_total", "_created", "_bucket", "_sum", "_count")
        )


def test_promql_names_are_read_without_functions_labels_or_keywords() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, endpoint) (rate(freshrec_request_seconds_bucket'
            '{endpoint=~"recommend|search", status!="5xx"}[5m]))) / ignoring(job) max(up_total offset 5m) > bool 2')
    assert promql_metric_names(expr) == {"freshrec_request_seconds_bucket", "up_total"}
    exposed = Exposed(["# TYPE freshrec_x counter\n# TYPE freshrec_h histogram\nfreshrec_g 1.0\n"])
    assert exposed.has("freshrec_x_total") and exposed.has("freshrec_h_bucket") and exposed.has("freshrec_g")
    assert not exposed.has("freshrec_x") and not exposed.has("freshrec_g_total") and not exposed.has("freshrec_nope")


@pytest.fixture
def monitor_url(fresh_settings: Settings) -> Iterator[str]:
    registry, monitor = monitor_registry(fresh_settings)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        monitor.close()


def test_every_metric_the_dashboard_queries_is_on_a_process_metrics(
    served: tuple[str, ServingRuntime, dict], monitor_url: str  # noqa: F811
) -> None:
    url, runtime, items = served
    settings = runtime.settings
    texts: dict[str, str] = {}
    ranker = RankerRegistry(settings.state_dir / "rankers").publish(linear("log_pop_short", 1.0), None, {}).version
    runtime.ranker.activate(ranker)  # a swap, and a ranker version to show
    with httpx.Client(base_url=url, timeout=30) as c:
        item = next(iter(items))
        assert c.get("/recommend", params={"user_id": "nobody", "k": 5}).status_code == 200
        assert c.post("/search", json={"query": items[item].title, "k": 5}).status_code == 200
        assert c.get(f"/similar/{item}", params={"k": 5}).status_code == 200
        texts["serving"] = c.get("/metrics").text

    learner = LearnerMetrics()
    learner.adapter(0, 0, None, "base")  # what learner.loop.Learner sets as it starts
    learner.ranker(  # and learner.rank_loop after its first records
        {"consumed": 10, "duplicates": 0, "skipped": 0, "updates": 0, "published": 0}, {"held": 2, "training": 8}, {}
    )
    server = MetricsServer(learner, free_port())
    try:
        texts["learner"] = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10).text
    finally:
        server.close()

    token = {"Authorization": "Bearer tok"}
    with TestClient(create_collector(settings.model_copy(update={"collector_token": "tok"}))) as client:
        event = {"event_id": "dash-1", "user_id": "u1", "kind": "click", "item_id": "i1", "ts": time.time()}
        r = client.post("/events", json=[event, {"event_id": "bad"}], headers=token)
        assert r.status_code == 200, r.text
        texts["collector"] = client.get("/metrics").text

    texts["monitor"] = httpx.get(monitor_url, timeout=30).text
    assert 'freshrec_monitor_up{source="kafka"} 1.0' in texts["monitor"]
    assert 'freshrec_monitor_up{source="redis"} 1.0' in texts["monitor"], texts["monitor"]

    wanted = dashboard_metric_names()
    assert len(wanted) >= 20, sorted(wanted)
    exposed = Exposed(list(texts.values()))
    missing = {name: panels for name, panels in wanted.items() if not exposed.has(name)}
    assert not missing, f"dashboard metrics no process exposes (name -> panels): {missing}"


def _sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_monitor_shows_unapplied_events_as_lag_and_their_age(fresh_settings: Settings, monitor_url: str) -> None:
    settings = fresh_settings
    sent = time.time()
    with RecordProducer(settings, client_id="dash-test") as producer:
        for n in range(3):  # one batch each: Tansu's end offsets are exact for single-record batches
            producer.send(settings.topics.events, f"u{n}", b"{}")
            assert producer.flush(timeout=20).failed == 0
            producer.send(settings.topics.dead_letter, None, b"{}")
            assert producer.flush(timeout=20).failed == 0
    time.sleep(1.0)
    text = httpx.get(monitor_url, timeout=30).text
    assert _sample(text, "freshrec_topic_messages", topic=settings.topics.events) == 3.0
    assert _sample(text, "freshrec_topic_messages", topic=settings.topics.dead_letter) == 3.0
    for flow in ("users", "collab"):  # no flow runs: everything waits
        assert _sample(text, "freshrec_flow_lag_messages", flow=flow) == 3.0, text
        assert _sample(text, "freshrec_flow_position", flow=flow) == 0.0
        age = _sample(text, "freshrec_flow_lag_seconds", flow=flow)
        assert age is not None and 1.0 <= age <= time.time() - sent + 1.0, (flow, age)
    assert _sample(text, "freshrec_flow_lag_messages", flow="catalog") == 0.0
    assert _sample(text, "freshrec_flow_lag_seconds", flow="catalog") == 0.0


def test_freshrec_monitor_serves_metrics_and_stops_on_sigterm(fresh_settings: Settings, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    log = (tmp_path / "monitor.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "freshrec", "monitor", "--port", str(port)],
        env=fresh_settings.child_env(os.environ), stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline, text = time.monotonic() + 60, ""
        while time.monotonic() < deadline and "freshrec_flow_lag_messages" not in text:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            except httpx.HTTPError:
                time.sleep(0.2)
        assert _sample(text, "freshrec_flow_lag_messages", flow="users") == 0.0, text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
