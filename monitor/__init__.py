"""The flows' progress on a Prometheus ``/metrics`` (``freshrec monitor``).

The Bytewax flows keep their positions in Redis (the applied offset per input partition,
written atomically with the state) and serve no HTTP themselves; this process reads those
positions and the topics' end offsets at each scrape and shows how far behind each flow
is, in messages and in seconds, and how fast each topic grows (events/s, dead letters/s).

- :mod:`monitor.progress`: pure: lag and freshness from offsets and timestamps.
- :mod:`monitor.exporter`: the reads (Kafka, Redis) and the Prometheus collector.
- :mod:`monitor.cli`: ``freshrec monitor``.
"""
