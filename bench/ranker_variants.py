"""Which settings of the collaborative state make the better ranker: one replay and one ranker per variant.

``python -m bench.ranker_variants --variants "base:;dim1024:collab_shopper_dim=1024" --json docs/bench/ranker_variants.json``
(validation window only; ~10 min a variant, ``--jobs`` variants at a time)

A variant is settings that differ from the defaults (``name:field=value,field=value``,
any ``Settings`` field of the collaborative flow or the features: ``collab_shopper_dim``,
``collab_neighbours``, ``collab_top_k``, ...). Unlike ``bench.ranker_copurchase``, which
swaps columns over one replay, such a setting changes the state every feature and
candidate is computed from, so each variant replays online_retail_ii itself (history
before 2011-03-01, examples recorded from ``--history-days`` before the window to its
end, exactly as ``freshrec eval``'s ``ranker`` records them) in a worker process of its own.

Each variant then fits one LightGBM ranker per seed on its examples before the window and
scores the window's (``bench._fit_once``: the in-stream ranker's parameters and 50 sampled
negatives a basket), beside the log blend over the same candidates. The candidates
themselves can differ between variants (nearest shoppers and co-purchase propose them), so
the blend's figure is printed per variant too; compare the rankers' test Recall@10, whose
baskets are the same in every variant. ``--models`` fits several LightGBM settings on every
variant's examples (e.g. fewer trees, the study's leaves, ``negatives=N`` sampled a basket
instead of ``--negatives``), so a model choice is compared on the very same baskets.
Readings: docs/ranker_study.md, "Nearest shoppers".
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import refuse_report_window
from bench._fit_once import (
    TREES,
    add_window_arguments,
    fit_and_recall,
    parse_models,
    recall,
    replay_examples,
    sampled_rows,
)
from bench.report import write_json


def parse_variants(text: str) -> dict[str, dict[str, str]]:
    """``"base:;dim1024:collab_shopper_dim=1024,collab_neighbours=100"`` -> {name: {field: raw value}}."""
    out: dict[str, dict[str, str]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, fields = part.partition(":")
        pairs = [f.split("=", 1) for f in fields.split(",") if f.strip()]
        if not name or any(len(p) != 2 for p in pairs):
            raise SystemExit(f"bad variant {part!r}: expected name:field=value,field=value")
        out[name.strip()] = {k.strip(): v.strip() for k, v in pairs}
    return out


def run_variant(name: str, fields: dict[str, str], data: str, eval_from_s: str, until_s: str,
                history_days: float, seeds: list[int], negatives: int,
                models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One variant, start to end, in its own process (its replay holds ~1 GB)."""
    from freshrec.children import die_with_parent

    die_with_parent()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    from evaluation.data import load_log, parse_date
    from evaluation.ranker_method import BlendScorer, log_blend_weights
    from freshrec.settings import Settings

    t0 = time.perf_counter()
    unknown = sorted(set(fields) - set(Settings.model_fields))
    if unknown:
        raise SystemExit(f"variant {name}: no setting {', '.join(unknown)}")
    # validated from the strings as the environment would be, unlike model_copy
    settings = Settings(**fields, ranker_eval_history_days=history_days, ranker_window_baskets=10**7)
    eval_from, until = parse_date(eval_from_s), parse_date(until_s)
    log = load_log(Path(data), until)
    stream, figures = replay_examples(log, settings, eval_from)
    replay_s = time.perf_counter() - t0
    examples = list(stream.examples)
    fit = [ex for ex in examples if ex.ts < eval_from and ex.labels.any()]
    test = [ex for ex in examples if ex.ts >= eval_from]
    blend = BlendScorer(log_blend_weights(settings))
    fits = {}
    for model, params in models.items():
        params = dict(params)
        trees = int(params.pop("trees", TREES))
        rows = sampled_rows([ex.labels for ex in fit], int(params.pop("negatives", negatives)))
        per_seed = fit_and_recall([ex.features for ex in fit], [ex.labels for ex in fit], rows,
                                  [ex.features for ex in test], [ex.labels for ex in test],
                                  [ex.basket_size for ex in test], seeds, params, trees)
        fits[model] = {"per_seed": per_seed, "mean": float(np.mean(per_seed))}
    first = fits[next(iter(models))]
    return {
        "settings": fields,
        "per_seed": first["per_seed"],  # the first model's
        "mean": first["mean"],
        "models": fits,
        "blend_on_candidates": float(np.mean([recall(blend.score(ex.features), ex.labels, ex.basket_size) for ex in test])),
        "frozen_all_recall@10": figures["all"]["recall@10"],
        "examples": {"fit": len(fit), "test": len(test)},
        "candidates_median": float(np.median([len(ex.items) for ex in test])),
        "bought_among_candidates": float(np.mean([ex.labels.sum() / ex.basket_size for ex in test])),
        "seconds": {"replay": round(replay_s, 1), "features": round(stream.feature_seconds, 1),
                    "total": round(time.perf_counter() - t0, 1)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--variants", default="base:", help="name:field=value,...;name:... (base: the defaults)")
    add_window_arguments(p)
    p.add_argument("--models", default="stream:", help="LightGBM settings fitted on every variant's examples: "
                   "name:param=value,...;name:... over bench._fit_once.PARAMS (trees=N: rounds, negatives=N: "
                   "sampled a basket); the first is the headline")
    p.add_argument("--jobs", type=int, default=2, help="variants replayed at a time (one process each)")
    args = p.parse_args(argv)
    refuse_report_window(args.until, "choosing settings")
    variants = parse_variants(args.variants)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    models = parse_models(args.models)
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=mp.get_context("spawn")) as pool:
        futures = {name: pool.submit(run_variant, name, fields, str(args.data), args.eval_from, args.until,
                                     args.history_days, seeds, args.negatives, models) for name, fields in variants.items()}
        print(f"{'variant':14}{'test R@10 per seed':>22}{'mean':>9}{'blend':>9}{'bought in cands':>17}{'min':>6}", flush=True)
        for name, fut in futures.items():
            r = results[name] = fut.result()
            print(f"{name:14}{'  '.join(f'{x:.4f}' for x in r['per_seed']):>22}{r['mean']:>9.4f}"
                  f"{r['blend_on_candidates']:>9.4f}{r['bought_among_candidates']:>17.4f}"
                  f"{r['seconds']['total'] / 60:>6.1f}", flush=True)
            for model, m in list(r["models"].items())[1:]:
                print(f"  {model:12}{'  '.join(f'{x:.4f}' for x in m['per_seed']):>22}{m['mean']:>9.4f}", flush=True)
    write_json(str(args.json) if args.json else None, {
        "window": {"eval_from": args.eval_from, "until": args.until, "history_days": args.history_days},
        "seeds": seeds, "negatives": args.negatives, "models": models, "variants": results,
        "seconds": round(time.perf_counter() - t0, 1),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
