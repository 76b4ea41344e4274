"""freshrec's shared contracts (floor 0): record schemas, topic names, settings, topic
epochs, the embedded infrastructure launcher and ``reset``, child processes, the Kafka
adapters. Every other package imports from here; this package imports none of them
(except ``freshrec/__main__.py``, the entry point of ``python -m freshrec``)."""

__version__ = "0.1.0"
