"""One LightGBM ranker fitted once on recorded examples and scored on the window's: the
paired protocol of the ranking-stage benches (``bench.ranker_copurchase``, ``bench.ranker_variants``).

The in-stream ranker refits every 1,000 baskets and is gated; fitting once on everything
before the window removes that machinery, so two feature sets (or two settings of the
collaborative state) are compared on the model they allow, not on when a gate adopted it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from evaluation.data import EventLog
    from evaluation.ranker_method import ExampleStream
    from freshrec.settings import Settings

# the in-stream ranker's LightGBM parameters (models.ranker at the defaults), two threads
PARAMS: dict[str, Any] = {
    "objective": "lambdarank", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 200,
    "bagging_fraction": 0.8, "bagging_freq": 1, "feature_fraction": 0.8, "lambdarank_truncation_level": 20,
    "verbose": -1, "num_threads": 2,
}
TREES = 200


def parse_models(text: str) -> dict[str, dict[str, Any]]:
    """``"stream:;study:num_leaves=31,min_data_in_leaf=50,trees=300"`` -> {name: LightGBM parameters
    over :data:`PARAMS`} (``trees``: boosting rounds; numbers parsed as int or float)."""
    out: dict[str, dict[str, Any]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, fields = part.partition(":")
        params: dict[str, Any] = {}
        for f in filter(None, (f.strip() for f in fields.split(","))):
            key, sep, raw = f.partition("=")
            if not sep or not key.strip():
                raise SystemExit(f"bad model {part!r}: expected name:param=value,param=value")
            params[key.strip()] = float(raw) if "." in raw or "e" in raw.lower() else int(raw)
        out[name.strip()] = params
    if not out:
        raise SystemExit("no model given")
    return out


def add_window_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments every fit-once bench shares: data, the validation window, the history of
    recorded examples before it, seeds, sampled negatives and the JSON path."""
    from bench._common import DEFAULT_DATA

    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--eval-from", default="2011-03-01")
    p.add_argument("--until", default="2011-06-01")
    p.add_argument("--history-days", type=float, default=180.0, help="examples recorded this long before the window")
    p.add_argument("--seeds", default="7,8")
    p.add_argument("--negatives", type=int, default=50)
    p.add_argument("--json", type=Path)


def recall(scores: np.ndarray, labels: np.ndarray, basket_size: int) -> float:
    """Recall@10 as the protocol counts it: hits in the top ten over min(10, basket)."""
    top = np.argsort(-scores, kind="stable")[:10]
    return float(labels[top].sum() / min(10, basket_size))


def sampled_rows(labels: Sequence[np.ndarray], negatives: int, seed: int = 7) -> list[np.ndarray]:
    """Per fitted basket, its bought candidates and at most ``negatives`` others drawn at random
    (the in-stream ranker's sampling), in candidate order."""
    rng = np.random.default_rng(seed)
    rows = []
    for lab in labels:
        pos, neg = np.flatnonzero(lab > 0), np.flatnonzero(lab == 0)
        if neg.size > negatives:
            neg = np.sort(rng.choice(neg, size=negatives, replace=False))
        rows.append(np.concatenate((pos, neg)))
    return rows


def fit_and_recall(
    fit_x: Sequence[np.ndarray],
    fit_labels: Sequence[np.ndarray],
    rows: Sequence[np.ndarray],
    test_x: Sequence[np.ndarray],
    test_labels: Sequence[np.ndarray],
    test_sizes: Sequence[int],
    seeds: Sequence[int],
    params: dict[str, Any] | None = None,
    trees: int = TREES,
) -> list[float]:
    """Test Recall@10 of one ranker per seed, fitted on the sampled ``rows`` of the fit baskets
    (``params`` over :data:`PARAMS`)."""
    import lightgbm as lgb

    x = np.concatenate([m[r] for m, r in zip(fit_x, rows, strict=True)])
    y = np.concatenate([lab[r] for lab, r in zip(fit_labels, rows, strict=True)])
    groups = [r.size for r in rows]
    out = []
    for seed in seeds:
        booster = lgb.train({**PARAMS, **(params or {}), "seed": seed}, lgb.Dataset(x, y, group=groups),
                            num_boost_round=trees)
        out.append(float(np.mean([recall(booster.predict(m), lab, n)
                                  for m, lab, n in zip(test_x, test_labels, test_sizes, strict=True)])))
    return out


def replay_examples(log: EventLog, settings: Settings, eval_from: float,
                    attach: Callable[[ExampleStream], None] | None = None) -> tuple[ExampleStream, dict[str, Any]]:
    """Replay ``log`` as ``freshrec eval``'s ``ranker`` records examples (history before
    ``eval_from``, examples from ``settings.ranker_eval_history_days`` before it, frozen's base
    vectors) and return the stream with ``frozen``'s figures, a check that the replay is the
    usual one. ``attach(stream)`` runs before the replay: a listener it adds to
    ``stream.collab`` comes after the stream, so both see the same state before each group
    (``bench.ranker_copurchase``'s study columns)."""
    from evaluation.methods import build_system_methods
    from evaluation.protocol import evaluate
    from evaluation.ranker_method import example_stream

    (frozen,) = build_system_methods(log, settings, eval_from, ["frozen"], "cpu")
    stream = example_stream(log, settings, frozen, eval_from)
    if attach is not None:
        attach(stream)

    class Recorder:
        """Drives frozen and the stream through the protocol."""

        name = "frozen"

        def observe(self, log: EventLog, start: int, stop: int) -> None:
            frozen.observe(log, start, stop)
            stream.observe(log, start, stop)

        def advance(self, now: float) -> None:
            frozen.advance(now)

        def scores(self, user: int, now: float) -> np.ndarray:
            return frozen.scores(user, now)

    return stream, evaluate(log, eval_from, [Recorder()])["frozen"].as_dict()
