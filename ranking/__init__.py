"""ranking: the domain logic of ranking, shared by the services, the evaluation and the benchmarks.

Floor 1 (see tests/unit/test_layers.py): pure functions and small dataclasses, no Kafka,
Redis, FAISS or HTTP; imports only :mod:`freshrec`.

- :mod:`ranking.user_state`: a shopper's state (:class:`~ranking.user_state.UserState`),
  :func:`~ranking.user_state.apply_event`, decay maths and fresh popularity.
- :mod:`ranking.pairs`: which events make train pairs, and their context.
- :mod:`ranking.scoring`: candidates, the recommend and search blends, the similarity scale.
"""
