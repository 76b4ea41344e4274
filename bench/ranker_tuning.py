"""Which ranker settings pay: variants of the in-stream ranker, measured on the validation window only.

``python -m bench.ranker_tuning --variants "base:;w8000:window=8000,history=180" --json docs/bench/ranker_tuning.json``
replays online_retail_ii with history before 2011-03-01 and scores the baskets of
2011-03-01 .. 2011-05-31 (the validation window; the report window is never touched)
through ``frozen`` (the blend, measured in the same run) and one
``evaluation.ranker_method.RankerMethod`` per variant and seed. A variant is a name and
settings that differ from the defaults (short keys below, or any ``ranker_*`` field).
Every ranker shares one example stream, built with the longest history and the largest
window of all variants (examples do not depend on the model or on these settings); each
ranker trains only on examples from its own ``ranker_eval_history_days`` before the
window, so a variant with the default history sees what it would see alone. The table
and the choice are in docs/ranker_tuning.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench._common import refuse_report_window
from bench.ranker_family import DEFAULT_DATA, spread
from evaluation.data import load_log, parse_date
from evaluation.protocol import SLICES, count_baskets, evaluate
from freshrec.settings import Settings
from ranking.user_state import DAY_S

KEYS = {
    "window": "ranker_window_baskets",
    "history": "ranker_eval_history_days",
    "negatives": "ranker_train_negatives",
    "trees": "ranker_trees",
    "update": "ranker_update_baskets",
    "days": "ranker_update_days",
    "family": "ranker_family",
}


def parse_variants(text: str, seeds: list[int]) -> list[tuple[str, dict[str, Any], list[int]]]:
    """``name:key=value,key=value;...`` -> (name, settings update, seeds); ``seeds=7/8`` overrides the seeds."""
    out = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, _, body = part.partition(":")
        update: dict[str, Any] = {}
        mine = seeds
        for kv in (x.strip() for x in body.split(",")):
            if not kv:
                continue
            key, eq, value = kv.partition("=")
            if not eq:
                raise SystemExit(f"variant {name!r}: {kv!r} is not key=value")
            if key == "seeds":
                mine = [int(s) for s in value.split("/") if s]
                continue
            field = KEYS.get(key, key)
            if field not in Settings.model_fields or not field.startswith("ranker_"):
                raise SystemExit(f"variant {name!r}: unknown setting {key!r} (short keys: {', '.join(KEYS)}, or a ranker_* field)")
            update[field] = value
        out.append((name.strip(), update, mine))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--eval-from", default="2011-03-01")
    p.add_argument("--until", default="2011-06-01")
    p.add_argument("--variants", default="base:")
    p.add_argument("--seeds", default="7")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    refuse_report_window(args.until, "tune")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(2)
    from evaluation.methods import build_system_methods
    from evaluation.ranker_method import RankerMethod, example_stream

    base = Settings()
    eval_from, until = parse_date(args.eval_from), parse_date(args.until)
    variants = parse_variants(args.variants, [int(s) for s in args.seeds.split(",") if s])
    # validated through the settings object, so "window=8e3" fails here, not mid-replay
    vsettings = {name: Settings(**update) for name, update, _ in variants}
    t0 = time.perf_counter()
    log = load_log(args.data, until)
    (frozen,) = build_system_methods(log, base, eval_from, ["frozen"], "cpu")
    widest = base.model_copy(update={
        "ranker_eval_history_days": max(s.ranker_eval_history_days for s in vsettings.values()),
        "ranker_window_baskets": max(s.ranker_window_baskets for s in vsettings.values()),
        "ranker_gate_baskets": max(s.ranker_gate_baskets for s in vsettings.values()),
    })
    stream = example_stream(log, widest, frozen, eval_from)
    rankers: list[tuple[str, RankerMethod]] = []
    for name, _, seeds in variants:
        s = vsettings[name]
        for seed in seeds:
            m = RankerMethod(f"{name}/{seed}", stream, frozen, s, seed, s.ranker_family,
                             train_from=eval_from - s.ranker_eval_history_days * DAY_S)
            m.progress = lambda line: print(line, flush=True)
            rankers.append((name, m))
    t_setup = time.perf_counter() - t0
    n_baskets = count_baskets(log, eval_from)
    print(f"{log.name}: {len(log):,} events, {n_baskets:,} baskets from {args.eval_from} to {args.until}; "
          f"{len(rankers)} rankers; setup {t_setup:.0f} s", flush=True)
    t1 = time.perf_counter()
    results = evaluate(log, eval_from, [frozen, *(m for _, m in rankers)])
    replay_s = time.perf_counter() - t1

    runs: dict[str, dict[str, object]] = {}
    for name, m in rankers:
        fits = m.log.fit_seconds
        runs[m.name] = {
            "variant": name,
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
    groups: dict[str, dict[str, object]] = {}
    for name, update, _ in variants:
        mine = [r for r in runs.values() if r["variant"] == name]
        groups[name] = {
            "settings": {k: getattr(vsettings[name], k) for k in update},
            **{f"{s}_recall@10": spread([r["figures"][s]["recall@10"] for r in mine]) for s in SLICES},  # type: ignore[index]
            "fit_seconds_per_update": spread([r["fit_seconds_per_update"] for r in mine]),  # type: ignore[misc]
            "score_ms_per_basket": spread([r["score_ms_per_basket"] for r in mine]),  # type: ignore[misc]
            "adopted": [r["adopted"] for r in mine],
            "updates": [r["updates"] for r in mine],
        }
    fz = results["frozen"].as_dict()
    out: dict[str, object] = {
        "window": {"eval_from": args.eval_from, "until": args.until, "baskets": n_baskets, "events": len(log)},
        "defaults": {k: v for k, v in base.model_dump().items() if k.startswith("ranker_")},
        "stream": {k: v for k, v in widest.model_dump().items() if k in KEYS.values()},
        "frozen": fz,
        "variants": groups,
        "runs": runs,
        "shared": {
            "setup_seconds": t_setup,
            "replay_seconds": replay_s,
            "feature_seconds": stream.feature_seconds,
            "examples": stream.next_seq,
        },
    }

    print(f"{'method':18}" + "".join(f"{s + ' R@10':>14}" for s in SLICES) + f"{'fit s/upd':>11}{'ms/basket':>11}{'adopted':>9}")
    print(f"{'frozen':18}" + "".join(f"{fz[s]['recall@10']:>14.4f}" for s in SLICES))
    for name, r in runs.items():
        f = r["figures"]
        print(
            f"{name:18}" + "".join(f"{f[s]['recall@10']:>14.4f}" for s in SLICES)  # type: ignore[index]
            + f"{r['fit_seconds_per_update']:>11.2f}{r['score_ms_per_basket']:>11.3f}{r['adopted']!s:>5}/{r['updates']}"
        )
    for name, g in groups.items():
        a = g["all_recall@10"]
        print(f"{name:18} all R@10 mean {a['mean']:.4f} sd {a['std']:.4f} ({len(g['updates'])} seeds) {g['settings']}")  # type: ignore[index,arg-type]
    print(f"shared: replay {replay_s:.0f} s, features {stream.feature_seconds:.0f} s, {stream.next_seq:,} examples; setup {t_setup:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


if __name__ == "__main__":
    main()
