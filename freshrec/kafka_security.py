"""TLS and SASL for an existing Kafka: the settings as each client library spells them.

freshrec talks to Kafka through three libraries: kafka-python (the validating producer,
the followers, topic creation), confluent-kafka (the flows' sinks, topic ids) and
Bytewax's ``KafkaSource`` (librdkafka underneath, like confluent-kafka). They name the
same options differently; this module is the one place that maps
``Settings.kafka_security_protocol`` / ``kafka_sasl_*`` / ``kafka_ssl_*`` onto each, so a
deployment against a managed Kafka sets ``FRESHREC_KAFKA_*`` once and every process,
whatever its client, connects the same way. ``tests/unit/test_kafka_security.py`` also
checks that every client constructed in the code base goes through here.
"""

from __future__ import annotations

from typing import Any

from .settings import Settings


def kafka_python_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for kafka-python's ``KafkaProducer`` / ``KafkaConsumer`` / ``KafkaAdminClient``."""
    out: dict[str, Any] = {"bootstrap_servers": settings.kafka_servers}
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return out
    out["security_protocol"] = protocol
    if protocol.startswith("SASL_"):
        assert settings.kafka_sasl_password is not None  # Settings refuses SASL without credentials
        out["sasl_mechanism"] = settings.kafka_sasl_mechanism
        out["sasl_plain_username"] = settings.kafka_sasl_username
        out["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    if protocol in ("SSL", "SASL_SSL"):
        out["ssl_check_hostname"] = settings.kafka_ssl_check_hostname
        for key, path in (
            ("ssl_cafile", settings.kafka_ssl_cafile),
            ("ssl_certfile", settings.kafka_ssl_certfile),
            ("ssl_keyfile", settings.kafka_ssl_keyfile),
        ):
            if path is not None:
                out[key] = str(path)
    return out


def librdkafka_options(settings: Settings) -> dict[str, str]:
    """Configuration entries for confluent-kafka's clients and Bytewax's Kafka connectors."""
    out = {"bootstrap.servers": settings.kafka_bootstrap}
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return out
    out["security.protocol"] = protocol.lower()
    if protocol.startswith("SASL_"):
        assert settings.kafka_sasl_password is not None
        out["sasl.mechanisms"] = str(settings.kafka_sasl_mechanism)
        out["sasl.username"] = str(settings.kafka_sasl_username)
        out["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    if protocol in ("SSL", "SASL_SSL"):
        out["ssl.endpoint.identification.algorithm"] = "https" if settings.kafka_ssl_check_hostname else "none"
        for key, path in (
            ("ssl.ca.location", settings.kafka_ssl_cafile),
            ("ssl.certificate.location", settings.kafka_ssl_certfile),
            ("ssl.key.location", settings.kafka_ssl_keyfile),
        ):
            if path is not None:
                out[key] = str(path)
    return out


def bytewax_source_config(settings: Settings) -> dict[str, str]:
    """``KafkaSource(add_config=...)``: the librdkafka entries minus the bootstrap servers it takes itself."""
    out = librdkafka_options(settings)
    del out["bootstrap.servers"]
    return out
