"""Why the streamed co-purchase columns add nothing to the ranker, and which co-purchase would.

``python -m bench.ranker_copurchase --json docs/bench/ranker_copurchase.json`` (validation
window only; ~15 min on 2 cores):

1. Replays online_retail_ii with history before 2011-03-01 and records every labelled
   ranking example from ``--history-days`` (180) before the window to its end (the 3,991
   baskets of 2011-03-01 .. 2011-05-31), exactly as ``freshrec eval``'s ``ranker`` records
   them (``evaluation.ranker_method.ExampleStream`` over ``frozen``'s vectors).
2. Beside the stream, as a listener of the same collaborative replay (so it sees the same
   state before each basket), full co-purchase counts (``evaluation.baselines.CoPurchase``:
   every basket, no decay, no cut) give each example's candidates docs/ranker_study.md's
   co-purchase columns: the cosine ``C_ab / (sqrt(n_a n_b) + 10)`` summed over the
   shopper's 20 strongest items (weighted by their basket counts over the largest) and
   over the items of their last basket, from whole rows or from rows cut to their top K
   (by count, as the stream cuts them, or by cosine).
3. One LightGBM ranker per column set (the in-stream ranker's parameters and its 50
   sampled negatives a basket) is fitted once on the examples before the window and
   scores the window's examples; Recall@10 as the protocol counts it (hits over
   min(10, basket)), per seed. The variants differ only in the two co-purchase columns
   (``log_cooc``, ``log_cooc_last``), so the table isolates them.

The question it answers (docs/ranker_study.md, "The co-purchase columns"): the study
measured +5.2 % for a ranker over collaborative signals, the ranker built in the
stream gains about +2 %; is it the model, the window, or the signals?
"""

from __future__ import annotations

import argparse
import os
import time
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
from evaluation.baselines import CoPurchase, strongest_profile
from evaluation.data import PURCHASE, EventLog, load_log, parse_date
from freshrec.settings import Settings
from ranking.features import FEATURE_NAMES

PROFILE = 20  # the stream's FeatureRules.profile_items
CUTS = (50, 100, 400)
FLOOR = 1e-3  # log(x + FLOOR), as the study's columns


class StudyColumns:
    """Full co-purchase counts beside the replay; the study's columns for each recorded basket.

    A :class:`evaluation.collab_replay.CollabReplay` listener: ``before_group`` computes the
    columns of the group's baskets that the example stream records (same rule: a shopper
    with a basket in their state, from ``record_from``), ``after_group`` counts the group's
    baskets.
    """

    def __init__(self, log: EventLog, collab: Any, record_from: float) -> None:
        self.log = log
        self.collab = collab
        self.record_from = record_from
        self.index = {iid: k for k, iid in enumerate(log.item_ids)}
        self.co = CoPurchase(log.n_items)
        self.with_item: dict[str, dict[int, int]] = {}
        self.last: dict[str, np.ndarray] = {}
        self.columns: dict[tuple[str, float], dict[str, np.ndarray]] = {}
        self.seconds = 0.0

    def _baskets(self, start: int, stop: int) -> dict[str, np.ndarray]:
        log = self.log
        sel = log.kind[start:stop] == PURCHASE
        users, items = log.user[start:stop][sel], log.item[start:stop][sel]
        return {log.user_ids[u]: np.unique(items[users == u]) for u in np.unique(users).tolist()}

    def before_group(self, log: EventLog, start: int, stop: int) -> None:
        ts = float(log.ts[start])
        if ts < self.record_from:
            return
        t0 = time.perf_counter()
        for user in self._baskets(start, stop):
            state = self.collab.states.get(user)
            if state is None or not state.baskets or user not in self.with_item:
                continue
            self.columns[(user, ts)] = self._rows(user)
        self.seconds += time.perf_counter() - t0

    def _rows(self, user: str) -> dict[str, np.ndarray]:
        """Per variant, (profile column, last-basket column) over every item (candidates picked later)."""
        wi = self.with_item[user]
        own = np.fromiter(wi, dtype=np.int64, count=len(wi))
        counts = np.fromiter(wi.values(), dtype=np.float64, count=len(wi))
        profile, weights = strongest_profile(own, counts, PROFILE)
        out: dict[str, np.ndarray] = {}
        for part, rows, w in (("profile", profile, weights), ("last", self.last[user], np.ones(len(self.last[user])))):
            sim = self.co.similarity_rows(rows)
            raw = self.co.counts[rows].astype(np.float64)
            out[f"whole/{part}"] = w @ sim
            for k in CUTS:
                out[f"cosine top {k}/{part}"] = w @ _keep_top(sim, sim, k)
            out[f"count top 50/{part}"] = w @ _keep_top(sim, raw, 50)
        return out

    def after_group(self, log: EventLog, start: int, stop: int) -> None:
        for user, basket in self._baskets(start, stop).items():
            self.co.add_basket(basket)
            wi = self.with_item.setdefault(user, {})
            for i in basket.tolist():
                wi[i] = wi.get(i, 0) + 1
            self.last[user] = basket


def _keep_top(values: np.ndarray, by: np.ndarray, k: int) -> np.ndarray:
    """``values`` with only each row's ``k`` largest entries of ``by`` kept (the rest 0)."""
    if by.shape[1] <= k:
        return values
    keep = np.argpartition(-by, k, axis=1)[:, :k]
    mask = np.zeros_like(values)
    np.put_along_axis(mask, keep, 1.0, axis=1)
    return values * mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_window_arguments(p)
    args = p.parse_args()
    refuse_report_window(args.until, "study")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(2)
    from evaluation.ranker_method import BlendScorer, log_blend_weights

    eval_from, until = parse_date(args.eval_from), parse_date(args.until)
    settings = Settings().model_copy(update={"ranker_eval_history_days": args.history_days, "ranker_window_baskets": 10**7})
    t0 = time.perf_counter()
    log = load_log(args.data, until)
    studies: list[StudyColumns] = []

    def attach(stream: Any) -> None:  # after the stream: both read the state before each group
        studies.append(StudyColumns(log, stream.collab, stream.record_from))
        stream.collab.listeners.append(studies[0])

    stream, figures = replay_examples(log, settings, eval_from, attach)
    (study,) = studies
    replay_s = time.perf_counter() - t0
    examples = list(stream.examples)
    print(f"replay {replay_s:.0f} s: {len(examples):,} examples, features {stream.feature_seconds:.0f} s, "
          f"study columns {study.seconds:.0f} s; frozen all R@10 {figures['all']['recall@10']:.4f}", flush=True)

    variants = ["whole", *(f"cosine top {k}" for k in CUTS), "count top 50"]
    keep = [k for k, name in enumerate(FEATURE_NAMES) if name not in ("log_cooc", "log_cooc_last")]
    matrices: dict[str, list[np.ndarray]] = {"streamed": [], "no co-purchase": [], **{v: [] for v in variants},
                                             "whole, last basket only": []}
    index = study.index
    for ex in examples:
        cols = study.columns[(ex.user_id, ex.ts)]
        cand = np.fromiter((index[i] for i in ex.items), dtype=np.int64, count=len(ex.items))
        matrices["streamed"].append(ex.features)
        base = ex.features[:, keep]
        matrices["no co-purchase"].append(base)
        for v in variants:
            extra = np.log(np.stack([cols[f"{v}/profile"][cand], cols[f"{v}/last"][cand]], axis=1) + FLOOR)
            matrices[v].append(np.concatenate([base, extra.astype(np.float32)], axis=1))
        last_only = np.log(cols["whole/last"][cand] + FLOOR).astype(np.float32)[:, None]
        matrices["whole, last basket only"].append(np.concatenate([base, last_only], axis=1))

    fit = [k for k, ex in enumerate(examples) if ex.ts < eval_from and ex.labels.any()]
    test = [k for k, ex in enumerate(examples) if ex.ts >= eval_from]
    blend = BlendScorer(log_blend_weights(settings))
    blend_recall = float(np.mean([recall(blend.score(examples[k].features), examples[k].labels, examples[k].basket_size)
                                  for k in test]))
    seeds = [int(s) for s in args.seeds.split(",") if s]
    rows = sampled_rows([examples[k].labels for k in fit], args.negatives)  # the same negatives for every variant
    test_labels = [examples[k].labels for k in test]
    test_sizes = [examples[k].basket_size for k in test]

    results: dict[str, dict[str, Any]] = {}
    print(f"{'columns':28}{'test R@10 per seed':>26}{'mean':>9}{'vs blend':>10}", flush=True)
    for name, mats in matrices.items():
        t1 = time.perf_counter()
        per_seed = fit_and_recall([mats[k] for k in fit], [examples[k].labels for k in fit], rows,
                                  [mats[k] for k in test], test_labels, test_sizes, seeds)
        mean = float(np.mean(per_seed))
        results[name] = {"per_seed": per_seed, "mean": mean, "vs_blend": mean / blend_recall,
                         "fit_seconds": (time.perf_counter() - t1) / len(seeds)}
        print(f"{name:28}{'  '.join(f'{r:.4f}' for r in per_seed):>26}{mean:>9.4f}{mean / blend_recall:>10.3f}", flush=True)
    print(f"{'blend (the same columns)':28}{'':>26}{blend_recall:>9.4f}{1.0:>10.3f}")

    nonzero = (study.co.counts > 0).sum(axis=1)
    nonzero = nonzero[nonzero > 0]
    out = {
        "window": {"eval_from": args.eval_from, "until": args.until, "history_days": args.history_days},
        "examples": {"fit": len(fit), "test": len(test), "all": len(examples)},
        "frozen": figures,
        "blend_on_candidates": blend_recall,
        "variants": results,
        "seeds": seeds,
        "negatives": args.negatives,
        "full_rows": {"items": int(nonzero.size), "median_entries": float(np.median(nonzero)),
                      "p90_entries": float(np.percentile(nonzero, 90)), "max_entries": int(nonzero.max())},
        "stream_rows": {"top_k": settings.collab_top_k, "row_cap": settings.collab_row_cap,
                        "half_life_days": settings.collab_copurchase_half_life_days},
        "seconds": {"replay": replay_s, "features": stream.feature_seconds, "study_columns": study.seconds,
                    "total": time.perf_counter() - t0},
    }
    write_json(str(args.json) if args.json else None, out)


if __name__ == "__main__":
    main()
