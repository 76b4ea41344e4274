"""TLS/SASL settings reach every Kafka client, spelled as each library wants them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import ValidationError

from freshrec.kafka_security import bytewax_source_config, kafka_python_options, librdkafka_options
from freshrec.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("freshrec", "streams", "learner", "indexer", "serving", "collector", "monitor", "console", "stores", "models", "ranking")
CLIENTS = {"KafkaProducer", "KafkaConsumer", "KafkaAdminClient", "Producer", "Consumer", "AdminClient", "KafkaSource"}


def test_plaintext_is_just_the_bootstrap() -> None:
    s = Settings(kafka_bootstrap="a:9092,b:9092")
    assert kafka_python_options(s) == {"bootstrap_servers": ["a:9092", "b:9092"]}
    assert librdkafka_options(s) == {"bootstrap.servers": "a:9092,b:9092"}
    assert bytewax_source_config(s) == {}


def test_sasl_ssl_in_both_spellings() -> None:
    s = Settings(
        kafka_bootstrap="k:9093", kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="shop", kafka_sasl_password="s3cret", kafka_ssl_cafile=Path("/etc/ca.pem"),
        kafka_ssl_check_hostname=False,
    )
    py = kafka_python_options(s)
    assert py["security_protocol"] == "SASL_SSL" and py["sasl_mechanism"] == "SCRAM-SHA-512"
    assert py["sasl_plain_username"] == "shop" and py["sasl_plain_password"] == "s3cret"
    assert py["ssl_cafile"] == "/etc/ca.pem" and py["ssl_check_hostname"] is False
    rd = librdkafka_options(s)
    assert rd["security.protocol"] == "sasl_ssl" and rd["sasl.mechanisms"] == "SCRAM-SHA-512"
    assert rd["sasl.username"] == "shop" and rd["sasl.password"] == "s3cret"
    assert rd["ssl.ca.location"] == "/etc/ca.pem" and rd["ssl.endpoint.identification.algorithm"] == "none"
    assert "bootstrap.servers" not in bytewax_source_config(s)
    assert "s3cret" not in repr(s)  # the password stays out of logs and tracebacks


def test_mutual_tls_paths_only_for_tls() -> None:
    s = Settings(kafka_security_protocol="SSL", kafka_ssl_certfile=Path("c.pem"), kafka_ssl_keyfile=Path("k.pem"))
    assert kafka_python_options(s)["ssl_certfile"] == "c.pem"
    assert librdkafka_options(s)["ssl.key.location"] == "k.pem"
    assert "sasl_mechanism" not in kafka_python_options(s)
    plain_sasl = Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                          kafka_sasl_username="u", kafka_sasl_password="p", kafka_ssl_cafile=Path("ca.pem"))
    assert "ssl_cafile" not in kafka_python_options(plain_sasl)


def test_sasl_without_credentials_is_refused_with_the_variables_to_set() -> None:
    with pytest.raises(ValidationError, match="FRESHREC_KAFKA_SASL_USERNAME"):
        Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="PLAIN", kafka_sasl_password="p")


def test_child_processes_get_the_real_password() -> None:
    s = Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                 kafka_sasl_username="u", kafka_sasl_password="p@ss")
    env = s.child_env({})
    assert env["FRESHREC_KAFKA_SASL_PASSWORD"] == "p@ss"
    assert "FRESHREC_KAFKA_SASL_MECHANISM" in env


def _client_calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in CLIENTS:
                out.append(node)
    return out


def test_every_kafka_client_in_the_code_goes_through_kafka_security() -> None:
    """A client built from ``settings.kafka_bootstrap`` alone would ignore TLS/SASL and fail against a secured Kafka."""
    unsecured = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for call in _client_calls(path):
                text = ast.unparse(call)
                if not any(f in text for f in ("kafka_python_options", "librdkafka_options", "bytewax_source_config")):
                    unsecured.append(f"{path.relative_to(ROOT)}:{call.lineno}: {text[:80]}")
    # freshrec.infra creates the embedded broker's topics (`freshrec up`, loopback, no TLS).
    allowed = {"freshrec/infra.py"}
    unsecured = [u for u in unsecured if u.split(":")[0] not in allowed]
    assert not unsecured, "Kafka clients that skip freshrec.kafka_security:\n" + "\n".join(unsecured)
