"""evaluation: prequential next-basket evaluation of freshrec against baselines (``freshrec eval``).

Modules: :mod:`~evaluation.data` (the dataset as arrays), :mod:`~evaluation.protocol`
(test-then-train replay, slices, the pre-registered split), :mod:`~evaluation.metrics`
(Recall@10, NDCG@10), :mod:`~evaluation.baselines` (popularity, repeat, cooccurrence),
:mod:`~evaluation.blend` (serving's blend over arrays, and the proposed log blend),
:mod:`~evaluation.methods` (``frozen`` and ``full``: the system's own components),
:mod:`~evaluation.plot`, :mod:`~evaluation.cli`.
"""
