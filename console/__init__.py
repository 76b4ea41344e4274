"""console: the ``freshrec`` command and what only it runs (floor 3, on top of every package).

- :mod:`console.cli`: the ``freshrec`` command; each component's own command is imported
  by name only when it runs.
- :mod:`console.demo`: ``freshrec demo``, the whole system on one machine.
- :mod:`console.replay`: replaying a dataset folder into Kafka.

``python -m freshrec`` reaches :func:`console.cli.main` through ``freshrec/__main__.py``,
the one import upwards from :mod:`freshrec` (an entry point: nothing imports it).
"""
