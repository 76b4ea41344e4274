"""Prometheus metrics of one collector process (its own registry, so tests can run several).

Every label value comes from a fixed set (:data:`collector.batch.REASON_LABELS`, the
answer statuses, the HTTP status codes the app sends), so what a client sends can never
grow the label space.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from .batch import Checked, Rejected

# A batch waits for the broker's acks=all: milliseconds when healthy, up to the send timeout when not.
BATCH_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class CollectorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.accepted = Counter("freshrec_collector_accepted", "Events confirmed on the events topic", registry=r)
        self.rejected = Counter(
            "freshrec_collector_rejected", "Records rejected (and dead-lettered), by reason", ["reason"], registry=r
        )
        self.unconfirmed = Counter(
            "freshrec_collector_unconfirmed", "Records the broker did not confirm in time (answered 503)", ["kind"], registry=r
        )
        self.requests = Counter("freshrec_collector_requests", "POST /events answers by HTTP status", ["status"], registry=r)
        self.batch_seconds = Histogram(
            "freshrec_collector_batch_seconds", "Send of one request's batch until the broker confirmed it (or gave up)",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.batch_records = Histogram(
            "freshrec_collector_batch_records", "Records per POST /events", buckets=(1, 10, 50, 100, 500, 1000, 5000, 10000),
            registry=r,
        )

    def count(self, checked: Sequence[Checked], confirmed: Sequence[bool]) -> None:
        """Count one answered batch; a reject counts as rejected whether or not its dead letter was confirmed."""
        accepted = 0
        for record, ok in zip(checked, confirmed):
            if isinstance(record, Rejected):
                self.rejected.labels(record.label).inc()
                if not ok:
                    self.unconfirmed.labels("dead_letter").inc()
            elif ok:
                accepted += 1
            else:
                self.unconfirmed.labels("event").inc()
        self.accepted.inc(accepted)
        self.batch_records.observe(len(checked))

    def answered(self, status: int) -> None:
        self.requests.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

