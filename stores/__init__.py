"""stores: the Redis adapters, the one place Redis is read and written.

Floor 1 (see tests/unit/test_layers.py): imports :mod:`freshrec` and :mod:`ranking` (the
user-state wire format).

- :mod:`stores.redis_client`: connections, the epoch-checked Lua write, outcomes.
- :mod:`stores.user_store`: shopper state and fresh popularity.
- :mod:`stores.catalog_store`: catalog items.
- :mod:`stores.redis_retry`: retrying a write through an outage.
"""
