"""serving: the HTTP API, the in-process encoder and index, and the hot-swap between versions.

The blends it ranks with are :mod:`ranking.scoring` (evaluation calls the same functions).

Modules, following a request and a swap:

- :mod:`serving.app`: the ASGI app (/recommend, /search, /similar, /healthz, /readyz, /metrics).
- :mod:`serving.admin`: /admin (adapters, activate, rollback, status), bearer token.
- :mod:`serving.pair`: the serving pair (encoder + index of one version) behind one reference.
- :mod:`serving.swap`: building a new pair in the background and swapping it in.
- :mod:`serving.vectors`: applying ``item-vectors`` to the active pair (and to a pair being built).
- :mod:`serving.shopper_data`: Redis reads that degrade instead of stalling; the popularity cache.
- :mod:`serving.result_cache`: finished /recommend answers, invalidated when anything they were made of moves.
- :mod:`serving.runtime`: the process state and its background threads.
- :mod:`serving.metrics`: Prometheus metrics and the timing middleware.
- :mod:`serving.cli`: ``freshrec serve``.
- :mod:`serving.testing`: a toy encoder, an in-memory catalog and a uvicorn thread for tests.
"""
