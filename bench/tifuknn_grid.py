"""TIFU-KNN's parameters, chosen on the validation window only.

``python -m bench.tifuknn_grid --json docs/bench/tifuknn_grid.json`` replays
online_retail_ii with history before 2011-03-01 and scores the baskets of
2011-03-01 .. 2011-05-31 (the validation window; the report window from 2011-06-01 is
never loaded: the log is cut at ``--until``) through a grid of ``tifuknn`` methods, in
three stages:

1. the neighbour metric, cosine against Euclidean (the paper's), at the paper's common
   vector setting (m 7, r_b 0.9, r_g 0.7) for k in {100, 300, 900} x alpha in {0.7, 0.9};
2. with the better metric, m in {3, 7, 14} x r_b in {0.9, 1.0} x r_g in {0.6, 0.7, 0.9}
   x k in {100, 300, 900} x alpha in {0.5, 0.7, 0.8, 0.9};
3. stage 2's best group size was its smallest (3), so the grid goes past that edge:
   m in {1, 2} x r_b in {0.9, 1.0} x r_g in {0.6, 0.7} x k in {100, 300} x alpha in
   {0.7, 0.8} (m 1 makes every basket its own group: r_b plays no part).

The choice is the best Recall@10 on ``all`` (the issue's primary figure) over all
stages. ``repeat`` (the shopper's own frequency) is measured in the same run as the
reference. Methods with the same vector parameters share one
:class:`evaluation.tifuknn.TifuState`, so one replay per vector setting serves all its
(k, alpha): the whole grid costs a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import orjson
from tqdm import tqdm

from evaluation.baselines import POPULARITY_HALF_LIFE_DAYS, RepeatMethod
from evaluation.data import EventLog, load_log, parse_date
from evaluation.protocol import Method, count_baskets, evaluate
from evaluation.tifuknn import TifuKnnMethod, TifuParams, TifuState
from freshrec.settings import Settings

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "online_retail_ii"
REPORT_FROM = "2011-06-01"

STAGE1 = {"group_size": [7], "r_b": [0.9], "r_g": [0.7], "k": [100, 300, 900], "alpha": [0.7, 0.9]}
STAGE2 = {
    "group_size": [3, 7, 14], "r_b": [0.9, 1.0], "r_g": [0.6, 0.7, 0.9],
    "k": [100, 300, 900], "alpha": [0.5, 0.7, 0.8, 0.9],
}

STAGE3 = {"group_size": [1, 2], "r_b": [0.9, 1.0], "r_g": [0.6, 0.7], "k": [100, 300], "alpha": [0.7, 0.8]}


def label(p: TifuParams) -> str:
    return f"m{p.group_size}/rb{p.r_b}/rg{p.r_g}/k{p.k}/a{p.alpha}/{p.metric}"


def grid(spec: dict[str, list], metric: str) -> list[TifuParams]:  # type: ignore[type-arg]
    keys = list(spec)
    return [TifuParams(**dict(zip(keys, vals, strict=True)), metric=metric) for vals in itertools.product(*spec.values())]  # type: ignore[arg-type]


def run_grid(log: EventLog, eval_from: float, params: list[TifuParams], desc: str) -> dict[str, dict[str, object]]:
    """One replay per vector setting (all its k and alpha share the state); figures per label."""
    by_vector: dict[tuple[int, float, float, str], list[TifuParams]] = {}
    for p in params:
        by_vector.setdefault(p.vector_key(), []).append(p)
    out: dict[str, dict[str, object]] = {}
    bar = tqdm(total=len(by_vector) * len(log), unit="ev", unit_scale=True, desc=desc, mininterval=1.0)
    for (m, r_b, r_g, metric), ps in by_vector.items():
        state = TifuState(log.n_users, log.n_items, m, r_b, r_g, metric)  # type: ignore[arg-type]
        methods: list[Method] = [TifuKnnMethod(state, p.k, p.alpha, label(p)) for p in ps]
        t0 = time.perf_counter()
        res = evaluate(log, eval_from, methods, progress=bar.update)
        seconds = time.perf_counter() - t0
        for p in ps:
            out[label(p)] = {"params": p.__dict__, "figures": res[label(p)].as_dict(), "replay_seconds_shared": seconds}
    bar.close()
    return out


def best(runs: dict[str, dict[str, object]]) -> str:
    """Label with the highest all Recall@10 (ties: the first in grid order)."""
    return max(runs, key=lambda k: runs[k]["figures"]["all"]["recall@10"])  # type: ignore[index]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--eval-from", default="2011-03-01")
    p.add_argument("--until", default="2011-06-01")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if parse_date(args.until) > parse_date(REPORT_FROM):
        raise SystemExit(f"--until {args.until} reaches into the report window (from {REPORT_FROM}); tune on validation only")
    eval_from, until = parse_date(args.eval_from), parse_date(args.until)
    t0 = time.perf_counter()
    log = load_log(args.data, until)
    n_baskets = count_baskets(log, eval_from)
    print(f"{log.name}: {len(log):,} events, {n_baskets:,} baskets from {args.eval_from} to {args.until}", flush=True)
    settings = Settings()
    rep = evaluate(log, eval_from, [RepeatMethod(log.n_items, settings.eval_repeat_half_life_days, POPULARITY_HALF_LIFE_DAYS)])
    stage1 = {**run_grid(log, eval_from, grid(STAGE1, "cosine"), "stage 1 cosine"),
              **run_grid(log, eval_from, grid(STAGE1, "euclidean"), "stage 1 euclidean")}
    metric = stage1[best(stage1)]["params"]["metric"]  # type: ignore[index]
    stage2 = run_grid(log, eval_from, grid(STAGE2, metric), f"stage 2 {metric}")  # type: ignore[arg-type]
    stage3 = run_grid(log, eval_from, grid(STAGE3, metric), f"stage 3 {metric}")  # type: ignore[arg-type]
    both = {**stage1, **stage2, **stage3}
    chosen = best(both)
    wall = time.perf_counter() - t0

    def row(name: str, f: dict[str, dict[str, float]]) -> str:
        return f"{name:44}" + "".join(f"{f[s]['recall@10']:>10.4f}" for s in ("all", "warm", "explore", "new"))

    print(f"{'setting':44}{'all':>10}{'warm':>10}{'explore':>10}{'new':>10}   (Recall@10)")
    print(row("repeat (reference)", rep["repeat"].as_dict()))  # type: ignore[arg-type]
    for name in sorted(both, key=lambda k: -both[k]["figures"]["all"]["recall@10"])[:15]:  # type: ignore[index]
        print(row(name, both[name]["figures"]))  # type: ignore[arg-type]
    for m in ("cosine", "euclidean"):
        mine = {k: v for k, v in stage1.items() if v["params"]["metric"] == m}  # type: ignore[index]
        print(f"stage 1 best {m}: {best(mine)} {mine[best(mine)]['figures']['all']['recall@10']:.4f}")  # type: ignore[index]
    print(f"chosen: {chosen}; {len(both)} settings in {wall:.0f} s")
    if args.json:
        out = {
            "window": {"eval_from": args.eval_from, "until": args.until, "baskets": n_baskets, "events": len(log)},
            "criterion": "highest Recall@10 on all baskets",
            "grid": {"stage1": {**STAGE1, "metric": ["cosine", "euclidean"]}, "stage2": {**STAGE2, "metric": [metric]},
                     "stage3": {**STAGE3, "metric": [metric]}},
            "chosen": both[chosen]["params"],
            "chosen_figures": both[chosen]["figures"],
            "repeat_reference": rep["repeat"].as_dict(),
            "seconds": wall,
            "stage1": stage1,
            "stage2": stage2,
            "stage3": stage3,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
