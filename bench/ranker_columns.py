"""Is the study's remaining advantage in its feature values? The study's columns on the stream's examples.

``python -m bench.ranker_columns --json docs/bench/ranker_columns.json`` (validation window
only; ~45 min on 2 cores, most of it the stream's replay, which ``--cache PATH`` keeps for a rerun)

docs/ranker_study.md's GBDT reached 0.3217 test Recall@10 on the validation window, the
ranker built in the stream 0.3150 on the same 3,595 baskets. Its neighbours' exactness,
model settings, negatives and candidate pool were each ruled out (``bench.ranker_variants``).
Left: the values of the 17 features. The study recomputes them from whole, undecayed
counts (co-purchase over every basket, nearest shoppers rebuilt daily over exact
basket-count vectors, popularity over 3 and 60 days); the stream keeps them incrementally
(decayed, cut, hashed). Both name the same 17 columns.

1. Replays online_retail_ii as ``freshrec eval``'s ``ranker`` records examples
   (``evaluation.ranker_method.ExampleStream``, history ``--history-days`` before the window).
2. Replays it again with the study's recorder (``bench.ranker_study.FeatureRecorder``) from
   the same first day, which computes its columns for exactly the stream's candidates of
   each recorded basket (same shopper, same basket time).
3. Fits one LightGBM ranker per seed (``bench._fit_once``: the in-stream ranker's
   parameters and 50 sampled negatives, the same rows for every variant) on: the stream's
   columns; the study's; and the stream's with one group of columns swapped for the
   study's. The candidates, labels and baskets are the same in every row of the table, so
   a difference is the columns' alone.

It also prints, per column, how closely the two paths agree (the rank correlation over
every candidate), to show which signals the stream computes differently.
"""

from __future__ import annotations

import argparse
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import refuse_report_window
from bench._fit_once import (
    add_window_arguments,
    fit_and_recall,
    recall,
    replay_examples,
    sampled_rows,
)
from bench.report import write_json
from evaluation.data import EventLog, load_log, parse_date
from freshrec.settings import Settings
from ranking.features import FEATURE_NAMES

DAY_S = 86_400.0
# the study's name of each stream column (the two popularity columns are named by horizon there)
STUDY_NAME = {"log_pop_short": "log_pop_3d", "log_pop_long": "log_pop_60d"}
GROUPS = {  # the study's groups, in the stream's names
    "served": ["log_repeat", "log_pop", "sim", "new"],
    "state": ["log_baskets_with", "log_share", "log_days_since_basket", "log_days_since_item",
              "log_pop_short", "log_pop_long"],
    "co-purchase": ["log_cooc", "log_cooc_last", "in_last_basket", "log_buyers"],
    "neighbours": ["log_knn", "log_neighbour_recent", "log_reorder_ratio"],
}


@dataclass
class Recorded:
    """One stream example, what this bench needs of it."""

    user_id: str
    ts: float
    items: list[str]
    features: np.ndarray
    labels: np.ndarray
    basket_size: int


def stream_examples(log: EventLog, settings: Settings, eval_from: float) -> tuple[list[Recorded], dict[str, Any]]:
    """The stream's labelled examples (step 1) and ``frozen``'s figures as a check."""
    stream, figures = replay_examples(log, settings, eval_from)
    out = [Recorded(ex.user_id, ex.ts, list(ex.items), ex.features, ex.labels, ex.basket_size)
           for ex in stream.examples]
    return out, {"frozen_all_recall@10": figures["all"]["recall@10"], "feature_seconds": stream.feature_seconds}


def study_columns(log: EventLog, settings: Settings, record_from: float, until: float,
                  pools: dict[tuple[str, float], list[str]]) -> dict[tuple[str, float], np.ndarray]:
    """The study's 17 columns (in the stream's order) for each pool's items (step 2)."""
    from bench.ranker_study import ALL, FeatureRecorder
    from evaluation.methods import build_system_methods
    from evaluation.protocol import evaluate

    index = {iid: k for k, iid in enumerate(log.item_ids)}
    order = [ALL.index(STUDY_NAME.get(name, name)) for name in FEATURE_NAMES]
    found: dict[tuple[str, float], np.ndarray] = {}

    class PoolRecorder(FeatureRecorder):
        """The study's recorder, asked for the stream's candidates instead of its own pool."""

        def scores(self, user: int, now: float) -> np.ndarray:
            key = (log.user_ids[user], now)
            items = pools.get(key)
            if items is not None and user in self.history.baskets:
                sig = self.system.signals(user, now)
                if sig is not None:
                    pool = np.fromiter((index[i] for i in items), dtype=np.int64, count=len(items))
                    found[key] = self._features(user, now, pool, sig)[:, order]
            return self.system.scores(user, now)

    (system,) = build_system_methods(log, settings, record_from, ["frozen"], "cpu")
    evaluate(log, record_from, [PoolRecorder(log, system, record_from)], eval_until=until)
    return found


def rank_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two columns (nan when either is constant)."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_window_arguments(p)
    p.add_argument("--cache", type=Path, help="keep the stream's examples here, and read them when present")
    args = p.parse_args()
    refuse_report_window(args.until, "a study")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(2)
    eval_from, until = parse_date(args.eval_from), parse_date(args.until)
    settings = Settings().model_copy(update={"ranker_eval_history_days": args.history_days,
                                             "ranker_window_baskets": 10**7})
    t0 = time.perf_counter()
    log = load_log(args.data, until)
    if args.cache and args.cache.exists():
        with args.cache.open("rb") as f:
            examples, check = pickle.load(f)
        print(f"read {len(examples):,} stream examples from {args.cache}", flush=True)
    else:
        examples, check = stream_examples(log, settings, eval_from)
        if args.cache:
            with args.cache.open("wb") as f:
                pickle.dump((examples, check), f)
    replay_s = time.perf_counter() - t0
    print(f"stream: {len(examples):,} examples in {replay_s:.0f} s; frozen all R@10 {check['frozen_all_recall@10']:.4f}",
          flush=True)

    t1 = time.perf_counter()
    record_from = eval_from - args.history_days * DAY_S
    pools = {(ex.user_id, ex.ts): ex.items for ex in examples}
    study = study_columns(log, settings, record_from, until, pools)
    study_s = time.perf_counter() - t1
    kept = [ex for ex in examples if (ex.user_id, ex.ts) in study]
    print(f"study: columns for {len(study):,} of {len(examples):,} examples in {study_s:.0f} s", flush=True)

    stream_all = np.concatenate([ex.features for ex in kept])
    study_all = np.concatenate([study[(ex.user_id, ex.ts)] for ex in kept])
    agreement = {name: rank_agreement(stream_all[:, k], study_all[:, k]) for k, name in enumerate(FEATURE_NAMES)}
    print("rank correlation, stream against study, per column:",
          {k: round(v, 3) for k, v in agreement.items()}, flush=True)

    matrices: dict[str, list[np.ndarray]] = {"stream": [ex.features for ex in kept],
                                             "study": [study[(ex.user_id, ex.ts)] for ex in kept]}
    for group, names in GROUPS.items():
        cols = [FEATURE_NAMES.index(n) for n in names]
        mats = []
        for ex in kept:
            m = ex.features.copy()
            m[:, cols] = study[(ex.user_id, ex.ts)][:, cols]
            mats.append(m)
        matrices[f"stream, {group} from the study"] = mats

    fit = [k for k, ex in enumerate(kept) if ex.ts < eval_from and ex.labels.any()]
    test = [k for k, ex in enumerate(kept) if ex.ts >= eval_from]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    rows = sampled_rows([kept[k].labels for k in fit], args.negatives)
    fit_labels = [kept[k].labels for k in fit]
    test_labels = [kept[k].labels for k in test]
    test_sizes = [kept[k].basket_size for k in test]
    from evaluation.ranker_method import BlendScorer, log_blend_weights

    blend = BlendScorer(log_blend_weights(settings))
    blend_recall = float(np.mean([recall(blend.score(kept[k].features), kept[k].labels, kept[k].basket_size)
                                  for k in test]))
    results: dict[str, dict[str, Any]] = {}
    print(f"{'columns':36}{'test R@10 per seed':>22}{'mean':>9}{'vs blend':>10}", flush=True)
    for name, mats in matrices.items():
        per_seed = fit_and_recall([mats[k] for k in fit], fit_labels, rows, [mats[k] for k in test],
                                  test_labels, test_sizes, seeds)
        mean = float(np.mean(per_seed))
        results[name] = {"per_seed": per_seed, "mean": mean, "vs_blend": mean / blend_recall}
        print(f"{name:36}{'  '.join(f'{r:.4f}' for r in per_seed):>22}{mean:>9.4f}{mean / blend_recall:>10.3f}",
              flush=True)
    print(f"{'blend (the stream columns)':36}{'':>22}{blend_recall:>9.4f}{1.0:>10.3f}")
    write_json(str(args.json) if args.json else None, {
        "window": {"eval_from": args.eval_from, "until": args.until, "history_days": args.history_days},
        "examples": {"stream": len(examples), "with study columns": len(kept), "fit": len(fit), "test": len(test)},
        "seeds": seeds, "negatives": args.negatives,
        "blend_on_candidates": blend_recall, "frozen_all_recall@10": check["frozen_all_recall@10"],
        "rank_correlation": agreement, "variants": results,
        "seconds": {"stream_replay": replay_s, "study_replay": study_s, "total": time.perf_counter() - t0},
    })


if __name__ == "__main__":
    main()
