"""The HTTP collector: ``POST /events`` for producers without a Kafka client.

Web and mobile front ends send a batch of events over HTTP; the collector validates each
record with the same contract as every other edge (:func:`freshrec.contracts.parse_event`),
keys it by ``user_id``, sends the batch to the events topic, waits for the broker to
confirm it, and answers per record. Invalid records go to the dead letter, as they do
from ``freshrec produce``.

* :mod:`collector.batch`: pure: the body split into records, each record checked, the answer.
* :mod:`collector.sink`: the one Kafka adapter: send a checked batch, report what was confirmed.
* :mod:`collector.metrics`: Prometheus counters and the batch latency.
* :mod:`collector.app`: the FastAPI app (token, body limit, 503 with Retry-After).
* :mod:`collector.cli`: ``freshrec collect``.
"""
