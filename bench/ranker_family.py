"""Which model family the ranker should be: measured prequentially on the validation window.

``python -m bench.ranker_family --json docs/bench/ranker_family.json`` replays
online_retail_ii with history before 2011-03-01 and scores the baskets of
2011-03-01 .. 2011-05-31 (the validation window; the report window is never touched)
through ``frozen`` (the blend, the baseline measured in the same run) and one
``evaluation.ranker_method.RankerMethod`` per family and seed: LightGBM lambdarank refit
on the sliding window (``lgbm``), LightGBM continued with new trees (``lgbm_continue``),
and the small torch ranker trained incrementally (``torch``). All rankers share one
example stream (the examples do not depend on the model), so the run costs one replay
plus each model's own fitting and scoring, which are timed per model: fit seconds per
update and milliseconds of model scoring per ranked basket. The table and the choice are
in docs/ranker_family.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import orjson

from evaluation.data import load_log, parse_date
from evaluation.protocol import SLICES, count_baskets, evaluate
from freshrec.settings import Settings

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "online_retail_ii"


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation and range of per-seed figures."""
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--eval-from", default="2011-03-01")
    p.add_argument("--until", default="2011-06-01")
    p.add_argument("--families", default="lgbm,lgbm_continue,torch")
    p.add_argument("--seeds", default="7,8,9")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(2)
    from evaluation.methods import build_system_methods
    from evaluation.ranker_method import build_ranker_methods

    settings = Settings()
    eval_from, until = parse_date(args.eval_from), parse_date(args.until)
    families = [f for f in args.families.split(",") if f]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    t0 = time.perf_counter()
    log = load_log(args.data, until)
    (frozen,) = build_system_methods(log, settings, eval_from, ["frozen"], "cpu")
    rankers = build_ranker_methods(
        log, settings, eval_from, frozen, seeds, families, name=lambda fam, seed: f"{fam}/{seed}"
    )
    stream = rankers[0].stream
    for m in rankers:
        m.progress = lambda line: print(line, flush=True)
    t_setup = time.perf_counter() - t0
    n_baskets = count_baskets(log, eval_from)
    print(f"{log.name}: {len(log):,} events, {n_baskets:,} baskets from {args.eval_from} to {args.until}; setup {t_setup:.0f} s", flush=True)
    t1 = time.perf_counter()
    results = evaluate(log, eval_from, [frozen, *rankers])
    replay_s = time.perf_counter() - t1

    out: dict[str, object] = {
        "window": {"eval_from": args.eval_from, "until": args.until, "baskets": n_baskets, "events": len(log)},
        "settings": {k: v for k, v in settings.model_dump().items() if k.startswith(("ranker_", "collab_"))},
        "frozen": results["frozen"].as_dict(),
        "runs": {},
        "families": {},
        "shared": {
            "setup_seconds": t_setup,
            "replay_seconds": replay_s,
            "feature_seconds": stream.feature_seconds,
            "examples": stream.next_seq,
        },
    }
    runs: dict[str, dict[str, object]] = {}
    for m in rankers:
        fits = m.log.fit_seconds
        runs[m.name] = {
            "family": m.family,
            "seed": m.seed,
            "figures": results[m.name].as_dict(),
            "updates": len(fits),
            "adopted": m.log.adopted,
            "fit_seconds_total": sum(fits),
            "fit_seconds_per_update": float(np.mean(fits)) if fits else 0.0,
            "score_ms_per_basket": 1000 * m.score_seconds / max(m.ranked, 1),
            "ranked": m.ranked,
            "fallback": m.fallbacks,
            "decisions": m.log.decisions,
        }
    out["runs"] = runs
    fam_out: dict[str, dict[str, object]] = {}
    for fam in families:
        mine = [r for r in runs.values() if r["family"] == fam]
        fam_out[fam] = {
            **{
                f"{s}_recall@10": spread([r["figures"][s]["recall@10"] for r in mine])  # type: ignore[index]
                for s in SLICES
            },
            "fit_seconds_per_update": spread([r["fit_seconds_per_update"] for r in mine]),  # type: ignore[misc]
            "score_ms_per_basket": spread([r["score_ms_per_basket"] for r in mine]),  # type: ignore[misc]
            "adopted": [r["adopted"] for r in mine],
            "updates": [r["updates"] for r in mine],
        }
    out["families"] = fam_out

    fz = results["frozen"].as_dict()
    print(f"{'method':18}" + "".join(f"{s + ' R@10':>14}" for s in SLICES) + f"{'fit s/upd':>11}{'ms/basket':>11}{'adopted':>9}")
    print(f"{'frozen':18}" + "".join(f"{fz[s]['recall@10']:>14.4f}" for s in SLICES))
    for name, r in runs.items():
        f = r["figures"]
        print(
            f"{name:18}" + "".join(f"{f[s]['recall@10']:>14.4f}" for s in SLICES)  # type: ignore[index]
            + f"{r['fit_seconds_per_update']:>11.2f}{r['score_ms_per_basket']:>11.3f}{r['adopted']!s:>5}/{r['updates']}"
        )
    for fam, f in fam_out.items():
        a = f["all_recall@10"]
        print(f"{fam:18} all R@10 mean {a['mean']:.4f} sd {a['std']:.4f} (min {a['min']:.4f}, max {a['max']:.4f})")  # type: ignore[index]
    print(f"shared: replay {replay_s:.0f} s, features {stream.feature_seconds:.0f} s, {stream.next_seq:,} examples; setup {t_setup:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


if __name__ == "__main__":
    main()
