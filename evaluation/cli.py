"""``freshrec eval DATASET_DIR --eval-from DATE [--json PATH] [--plot PATH.png]``.

Replays the dataset through every method (see :mod:`evaluation.protocol` for the
protocol and the pre-registered split), prints a table, and writes the figures as
``{method: {slice: {"recall@10", "ndcg@10", "baskets"}}}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import orjson

from freshrec.dataset import DatasetError
from freshrec.settings import Settings

from .data import format_ts, load_log, parse_date
from .protocol import SLICES, Method, count_baskets, evaluate

METHODS = ("popularity", "repeat", "cooccurrence", "frozen", "full")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freshrec eval", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("dataset_dir", type=Path, help="folder with events.csv[.gz] and items.csv")
    p.add_argument("--eval-from", required=True, help="first day scored (YYYY-MM-DD, UTC); earlier events are history")
    p.add_argument("--until", help="stop the replay before this day (for a validation window); default: the end")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--plot", type=Path, help="write the Recall@10-over-time PNG here")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--seed", type=int, help="seed of the learner and of pair sampling (default: settings.seed)")
    p.add_argument("--device", help="cpu or cuda (default: settings.device)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def build_methods(names: list[str], log, settings: Settings, eval_from: float, device: str) -> list[Method]:  # type: ignore[no-untyped-def]
    from .baselines import POPULARITY_HALF_LIFE_DAYS, CooccurrenceMethod, PopularityMethod, RepeatMethod

    out: list[Method] = []
    n = log.n_items
    for name in names:
        if name == "popularity":
            out.append(PopularityMethod(n, POPULARITY_HALF_LIFE_DAYS))
        elif name == "repeat":
            out.append(RepeatMethod(n, settings.eval_repeat_half_life_days, POPULARITY_HALF_LIFE_DAYS))
        elif name == "cooccurrence":
            out.append(
                CooccurrenceMethod(
                    n,
                    half_life_days=settings.eval_repeat_half_life_days,
                    popularity_half_life_days=POPULARITY_HALF_LIFE_DAYS,
                )
            )
    system = [m for m in names if m in ("frozen", "full")]
    if system:
        from .methods import build_system_methods

        out.extend(build_system_methods(log, settings, eval_from, system, device))
    order = {m: k for k, m in enumerate(names)}
    return sorted(out, key=lambda m: order[m.name])


def format_table(figures: dict[str, dict[str, dict[str, float | int]]]) -> str:
    head = f"{'method':14}" + "".join(f"{s + ' R@10':>14}{s + ' N@10':>14}{'n':>7}" for s in SLICES)
    lines = [head, "-" * len(head)]
    for name, slices in figures.items():
        row = f"{name:14}"
        for s in SLICES:
            f = slices[s]
            row += f"{f['recall@10']:>14.4f}{f['ndcg@10']:>14.4f}{f['baskets']:>7}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str], settings: Settings) -> int:
    args = build_parser().parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        print(f"freshrec eval: unknown method(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if args.seed is not None:
        settings = settings.model_copy(update={"seed": args.seed})
    try:
        eval_from = parse_date(args.eval_from)
        until = parse_date(args.until) if args.until else None
    except ValueError as exc:
        print(f"freshrec eval: bad date ({exc}); use YYYY-MM-DD", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        log = load_log(args.dataset_dir, until)
    except DatasetError as exc:
        print(f"freshrec eval: {exc}", file=sys.stderr)
        return 2
    n_baskets = count_baskets(log, eval_from)
    if n_baskets == 0:
        print(f"freshrec eval: no purchase baskets on or after {args.eval_from} in {args.dataset_dir}", file=sys.stderr)
        return 2
    device = args.device or settings.resolved_device()
    if device == "cpu":
        import torch

        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    methods = build_methods(names, log, settings, eval_from, device)
    print(
        f"{log.name}: {len(log):,} events, {log.n_items:,} items, {log.n_users:,} users; history < {args.eval_from}, "
        f"scoring {n_baskets:,} baskets to {format_ts(float(log.ts[-1]))}; methods {', '.join(names)}; seed {settings.seed}",
        flush=True,
    )
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(log), unit="ev", unit_scale=True, desc="replay", mininterval=1.0)
    results = evaluate(log, eval_from, methods, progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    figures = {name: res.as_dict() for name, res in results.items()}
    print(format_table(figures))
    for m in methods:
        extra = ""
        learner = getattr(m, "learner", None)
        if learner is not None:
            extra = (
                f" (adapter updates {learner.updates}, pairs trained {learner.pairs_trained:,}, "
                f"training {learner.train_seconds:.0f} s, re-encoding {learner.encode_seconds:.0f} s"
            )
            gate = learner.gate
            if gate is not None:
                extra += f", published {gate.published} of {learner.updates} by the gate ({learner.gate_seconds:.0f} s)"
                for n, reason in enumerate(gate.decisions, 1):
                    extra += f"\n{'':14}   update {n}: {reason}"
            extra += ")"
        print(f"{m.name:14} {results[m.name].seconds:8.1f} s{extra}")
    print(f"total {wall:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
    if args.plot:
        from .plot import plot_timeline

        title = f"{log.name}: weekly Recall@10 from {args.eval_from} (prequential, all baskets)"
        plot_timeline(results, eval_from, args.plot, title)
    return 0
