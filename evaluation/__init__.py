"""evaluation: prequential next-basket evaluation of freshrec against baselines (``freshrec eval``).

Modules: :mod:`~evaluation.data` (the dataset as arrays), :mod:`~evaluation.protocol`
(test-then-train replay, slices, the pre-registered split), :mod:`~evaluation.metrics`
(Recall@10, NDCG@10), :mod:`~evaluation.baselines` (popularity, repeat, cooccurrence),
:mod:`~evaluation.tifuknn` (TIFU-KNN), :mod:`~evaluation.methods` (``frozen`` and the
adapter learner: serving's own ranking functions over serving's int8 item space,
:mod:`~evaluation.item_space`), :mod:`~evaluation.collab_replay` and
:mod:`~evaluation.ranker_method` (``ranker`` and ``full``: the ranking stage as served),
:mod:`~evaluation.plot`, :mod:`~evaluation.cli`.
"""
