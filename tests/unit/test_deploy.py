"""docker-compose.yml and deploy/ checked without a container engine (none can be had here).

* the compose file validates against the compose-spec JSON schema that check-jsonschema
  ships (a test dependency: nothing is fetched at run time), and a broken copy does not;
* its topics are freshrec's settings: kafka-init runs ``freshrec topics`` with the same
  FRESHREC_* environment as every process (tests/integration/test_topics.py creates them);
* every freshrec service that serves /metrics is a Prometheus target on the port compose
  starts it on, and the proxy and Grafana provisioning point at what compose starts.

Which metric names the dashboard queries is checked against the real processes in
tests/integration/test_dashboard_metrics.py.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from freshrec.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "freshrec.json"


def compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def compose_errors(doc: Any) -> list[str]:
    """Every schema violation of a parsed compose file, as ``path: message``."""
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return sorted(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)
    )


def load_compose(text: str | None = None) -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text() if text is None else text)


def _argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else list(command)


def _flag(service: dict[str, Any], flag: str) -> str | None:
    argv = _argv(service)
    return argv[argv.index(flag) + 1] if flag in argv else None


def _freshrec_settings(service: dict[str, Any]) -> Settings:
    """The Settings a service's process builds from its compose environment (${...} left out)."""
    env = {
        k.removeprefix("FRESHREC_").lower(): v
        for k, v in (service.get("environment") or {}).items()
        if k.startswith("FRESHREC_") and "${" not in str(v)
    }
    return Settings(**env)


# -- the compose file against the compose specification -------------------------------------


def test_compose_file_validates_against_the_compose_spec() -> None:
    assert compose_errors(load_compose()) == []


@pytest.mark.parametrize(
    ("what", "break_it"),
    [
        ("a misspelt service key", lambda d: d["services"]["serving"].update(comand=["freshrec", "serve"])),
        ("a port that is a mapping", lambda d: d["services"]["proxy"].update(ports=[{"8000": 8000}])),
        ("volumes that are not a list", lambda d: d["services"]["redis"].update(volumes="redis-data:/data")),
        ("depends_on a condition that does not exist", lambda d: d["services"]["serving"]["depends_on"]["redis"].update(
            condition="service_ready")),
        ("an unknown top-level section", lambda d: d.update(service={})),
    ],
)
def test_a_broken_copy_fails_validation(what: str, break_it: Any) -> None:
    doc = copy.deepcopy(load_compose())
    break_it(doc)
    assert compose_errors(doc), f"{what} passed the schema"


def test_a_compose_file_that_is_not_yaml_fails() -> None:
    broken = COMPOSE.read_text().replace("services:\n", "services:\n  serving: [\n", 1)
    with pytest.raises(yaml.YAMLError):
        load_compose(broken)


def test_every_service_restarts_and_every_freshrec_service_runs_the_image() -> None:
    services = load_compose()["services"]
    assert all("restart" in s for s in services.values()), [n for n, s in services.items() if "restart" not in s]
    freshrec = {n for n, s in services.items() if s.get("image") == "freshrec:latest"}
    commands = {_argv(services[n])[1] for n in freshrec}
    assert {"topics", "stream", "index", "learn", "serve", "collect", "monitor"} <= commands
    flows = {_argv(services[n])[2] for n in freshrec if _argv(services[n])[1] == "stream"}
    assert flows == {"users", "collab", "catalog"}


# -- topics: one source, freshrec's settings ------------------------------------------------


def test_topics_come_from_the_settings_every_process_reads() -> None:
    doc = load_compose()
    services = doc["services"]
    init = services["kafka-init"]
    assert _argv(init)[:2] == ["freshrec", "topics"], "kafka-init must create the topics from freshrec's settings"
    assert "FRESHREC_PARTITIONS" in doc["x-freshrec"]["environment"]
    expected = _freshrec_settings(init)
    assert expected.partitions == int(doc["x-freshrec"]["environment"]["FRESHREC_PARTITIONS"])
    for name, service in services.items():
        if service.get("image") == "freshrec:latest":
            got = _freshrec_settings(service)
            assert (got.topics.all(), got.partitions) == (expected.topics.all(), expected.partitions), name
    # and no second, hand-written list of topic names anywhere in the file
    code = re.sub(r"#.*", "", COMPOSE.read_text())
    names = [t.removeprefix(expected.topic_prefix) for t in expected.topics.all()]
    assert not [n for n in names if "-" in n and n in code], "topic names written into docker-compose.yml"


# -- ports: the proxy, Prometheus, Grafana --------------------------------------------------


def test_replicated_services_have_no_host_port_and_the_proxy_reaches_them() -> None:
    services = load_compose()["services"]
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    for name in ("serving", "collector"):
        assert "ports" not in services[name], f"{name} replicas would fight over one host port"
        port = _flag(services[name], "--port")
        assert f"{name}:{port}" in conf, f"nginx does not proxy {name}:{port}"
        assert f"listen {port};" in conf and any(p.startswith(f"{port}:") for p in services["proxy"]["ports"])
    assert services["serving"]["deploy"]["replicas"] >= 2
    mount = next(v for v in services["proxy"]["volumes"] if "nginx.conf" in v)
    assert (ROOT / mount.split(":")[0]).resolve() == DEPLOY / "nginx" / "nginx.conf"


def _scrape_targets() -> dict[str, set[str]]:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    out: dict[str, set[str]] = {}
    for job in prom["scrape_configs"]:
        hosts = out.setdefault(job["job_name"], set())
        for sd in job.get("dns_sd_configs", []):
            hosts |= {f"{n}:{sd['port']}" for n in sd["names"]}
        for sc in job.get("static_configs", []):
            hosts |= set(sc["targets"])
    return out


def test_prometheus_scrapes_every_freshrec_process_with_metrics_on_its_port() -> None:
    services = load_compose()["services"]
    learner = _freshrec_settings(services["learner"])
    expected = {
        "serving": f"serving:{_flag(services['serving'], '--port')}",
        "collector": f"collector:{_flag(services['collector'], '--port')}",
        "monitor": f"monitor:{_flag(services['monitor'], '--port')}",
        "learner": f"learner:{learner.learner_metrics_port}",
    }
    assert learner.learner_metrics_port is not None and learner.learner_metrics_host == "0.0.0.0"
    for name in ("serving", "collector", "monitor"):
        assert _flag(services[name], "--host") == "0.0.0.0", f"{name} binds loopback: Prometheus cannot reach it"
    targets = _scrape_targets()
    assert {job: targets.get(job) for job in expected} == {job: {t} for job, t in expected.items()}
    mount = next(v for v in services["prometheus"]["volumes"] if "prometheus.yml" in v)
    assert (ROOT / mount.split(":")[0]).resolve() == DEPLOY / "prometheus" / "prometheus.yml"


def test_grafana_provisions_the_datasource_the_dashboard_uses_and_loads_its_folder() -> None:
    services = load_compose()["services"]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("./"))
    provisioning = ROOT / next(h for h, c in mounts.items() if c == "/etc/grafana/provisioning")
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [d["url"] for d in datasources] == ["http://prometheus:9090"]
    provider = yaml.safe_load((provisioning / "dashboards" / "freshrec.yml").read_text())["providers"][0]
    dashboards = ROOT / next(h for h, c in mounts.items() if c == provider["options"]["path"])
    assert dashboards.resolve() == DASHBOARD.parent
    dash = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
    assert uids == {datasources[0]["uid"]}
    assert all(t["expr"].strip() for p in dash["panels"] for t in p.get("targets", []))
