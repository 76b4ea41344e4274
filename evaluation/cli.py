"""``freshrec eval DATASET_DIR --eval-from DATE [--json PATH] [--plot PATH.png] [--seeds 7,8,9]``.

Replays the dataset through every method (see :mod:`evaluation.protocol` for the
protocol and the pre-registered split), prints a table, and writes the figures as
``{method: {slice: {"recall@10", "ndcg@10", "baskets"}}}``.

Seeds: a method whose figures depend on a seed (a learner; listed in ``SEEDED``, and a
built method may say so itself with ``seeded = True``) is run once per seed of
``--seeds`` (default ``settings.seed`` and the next two: 7, 8, 9); its figures are the
mean over seeds, and its slices also carry ``"seeds"`` and ``"spread"`` (sample standard
deviation, min, max, per seed; :func:`evaluation.metrics.seed_figures`). The table shows
them as ``mean ± sd``. Methods that do not depend on a seed run once. The seed reaches
``full`` through ``Settings.seed`` (``evaluation.methods`` reads it there): each seed's
run builds its methods from ``settings.model_copy(update={"seed": seed})``.

Runs: the first run replays every method with the first seed, and ``ranker`` with every
seed (its examples do not depend on the seed, so its seeds share one example stream);
each further seed is one more replay of the other seeded methods (``full``). Within a
run, the example streams of ``ranker`` and ``full`` share one collaborative replay, and
all runs share one feature cache (``evaluation.feature_cache``: ``full`` ranks over the
base vectors until its adapter publishes). ``--jobs N`` runs the replays in N worker
processes (spawned, each with ``2 // N`` torch threads at least 1), for machines where
one replay does not keep the cores busy; the default is one process.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from freshrec.children import die_with_parent, unwind
from freshrec.dataset import DatasetError
from freshrec.settings import Settings

from .collab_replay import CollabReplay
from .data import EventLog, format_ts, load_log, parse_date
from .feature_cache import FeatureCache
from .metrics import Timeline, seed_figures
from .protocol import SLICES, Method, MethodResult, count_baskets, evaluate

METHODS = ("popularity", "repeat", "cooccurrence", "tifuknn", "frozen", "ranker", "full")
# Methods whose figures depend on the seed (learners); each built one also says ``seeded = True``.
SEEDED = frozenset({"ranker", "full"})
# Seeded methods whose examples do not depend on the seed: every seed runs in the first run.
ONE_RUN_SEEDED = frozenset({"ranker"})
N_DEFAULT_SEEDS = 3

Figures = dict[str, dict[str, dict[str, object]]]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freshrec eval", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("dataset_dir", type=Path, help="folder with events.csv[.gz] and items.csv")
    p.add_argument("--eval-from", required=True, help="first day scored (YYYY-MM-DD, UTC); earlier events are history")
    p.add_argument("--until", help="stop the replay before this day (for a validation window); default: the end")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--plot", type=Path, help="write the Recall@10-over-time PNG here")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument(
        "--seeds",
        help=f"comma-separated seeds for the seeded methods ({', '.join(sorted(SEEDED))}); "
        f"default: settings.seed and the next {N_DEFAULT_SEEDS - 1}",
    )
    p.add_argument("--seed", type=int, help="one seed only (the same as --seeds N)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes for the per-seed replays (default 1)")
    p.add_argument("--device", help="cpu or cuda (default: settings.device)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_seeds(seeds: str | None, seed: int | None, default: int) -> list[int]:
    """The seeds to run, in order, without repeats; ValueError when unusable."""
    if seeds is not None and seed is not None:
        raise ValueError("give --seeds or --seed, not both")
    if seed is not None:
        return [seed]
    if seeds is None:
        return [default + k for k in range(N_DEFAULT_SEEDS)]
    out = [int(s) for s in seeds.split(",") if s.strip()]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"--seeds needs distinct integers, got {seeds!r}")
    return out


def build_methods(
    names: list[str], log: EventLog, settings: Settings, eval_from: float, device: str,
    ranker_seeds: Sequence[int] = (), cache: FeatureCache | None = None,
) -> list[Method]:
    """The named methods over ``log``; seeded ones take their seed from ``settings.seed``.

    ``ranker_seeds``: further seeds of ``ranker``, built as ``ranker/<seed>`` over the same
    example stream. ``cache``: the run's shared :class:`~evaluation.feature_cache.FeatureCache`.
    """
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
        elif name == "tifuknn":
            from .tifuknn import build_tifuknn

            out.append(build_tifuknn(log))
    if any(m in names for m in ("frozen", "ranker", "full")):
        from .methods import build_system_methods
        from .ranker_method import build_full_ranker, build_ranker_methods

        # ``ranker`` ranks over the base encoder's vectors and falls back to the blend: it
        # needs ``frozen`` whether or not ``frozen`` is reported (its observe drives it).
        need = [m for m in ("frozen", "full") if m in names or (m == "frozen" and "ranker" in names)]
        built = {m.name: m for m in build_system_methods(log, settings, eval_from, need, device)}
        if "frozen" in names:
            out.append(built["frozen"])
        collab = CollabReplay(settings)  # one collaborative replay for both example streams
        if "ranker" in names:
            seeds = [settings.seed, *ranker_seeds]
            label = lambda _fam, seed: "ranker" if seed == settings.seed else f"ranker/{seed}"  # noqa: E731
            out.extend(build_ranker_methods(log, settings, eval_from, built["frozen"], seeds, name=label,
                                            collab=collab, cache=cache))
        if "full" in names:
            # Everything learned in the stream: the ranker over the adapters' vectors, with the
            # adapter method (blend over its vectors) as the fallback it drives.
            out.append(build_full_ranker(log, settings, eval_from, built["full"], settings.seed,
                                         collab=collab, cache=cache))
    order = {m: k for k, m in enumerate(names)}
    return sorted(out, key=lambda m: (order[m.name.split("/")[0]], m.name))


@dataclass(frozen=True)
class Run:
    """One replay: these methods, built with this seed (and ``ranker`` also with ``shared_seeds``)."""

    seed: int
    names: tuple[str, ...]
    shared_seeds: tuple[int, ...] = ()


def plan_runs(names: Sequence[str], seeds: Sequence[int]) -> list[Run]:
    """Every method with the first seed (``ranker`` with every seed), then one run of the other
    seeded methods per further seed."""
    shared = tuple(seeds[1:]) if any(n in ONE_RUN_SEEDED for n in names) else ()
    runs = [Run(seeds[0], tuple(names), shared)]
    rest = tuple(n for n in names if n in SEEDED and n not in ONE_RUN_SEEDED)
    if rest:
        runs += [Run(s, rest) for s in seeds[1:]]
    return runs


@dataclass
class RunOutput:
    """What one run hands back (picklable: a worker process returns it)."""

    seed: int
    results: dict[str, MethodResult]
    notes: dict[str, str]


def method_note(m: Method, seconds: float) -> str:
    """The per-method timing line, with the learner's counts where there is one."""
    extra = ""
    # ``full`` is a ranker whose fallback is the adapter method: its learner sits one level down.
    learner = getattr(m, "learner", None) or getattr(getattr(m, "fallback", None), "learner", None)
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
    report = getattr(m, "report", None)
    if callable(report):
        extra += f"\n{'':14}   ranker: {report()}"
    return f"{seconds:8.1f} s{extra}"


def execute_run(
    run: Run, log: EventLog, settings: Settings, eval_from: float, device: str,
    progress: Callable[[int], None] | None = None, cache_path: Path | None = None,
) -> list[RunOutput]:
    """Build ``run``'s methods with its seed and replay them once: one output per seed it ran."""
    seeded_settings = settings.model_copy(update={"seed": run.seed})
    cache = FeatureCache(cache_path, settings) if cache_path is not None else None
    try:
        methods = build_methods(list(run.names), log, seeded_settings, eval_from, device, run.shared_seeds, cache)
        undeclared = [m.name for m in methods if getattr(m, "seeded", False) and m.name.split("/")[0] not in SEEDED]
        if undeclared:
            raise RuntimeError(f"methods {undeclared} declare seeded = True but are not in evaluation.cli.SEEDED")
        results = evaluate(log, eval_from, methods, progress=progress)
    finally:
        if cache is not None:
            cache.close()
    notes = {m.name: method_note(m, results[m.name].seconds) for m in methods}
    own = [m.name for m in methods if "/" not in m.name]
    out = [RunOutput(run.seed, {n: results[n] for n in own}, {n: notes[n] for n in own})]
    for seed in run.shared_seeds:
        name = f"ranker/{seed}"
        out.append(RunOutput(seed, {"ranker": results[name]}, {"ranker": notes[name]}))
    return out


def _worker(
    run: Run, log: EventLog, settings: Settings, eval_from: float, device: str, threads: int, cache_path: Path | None,
) -> list[RunOutput]:
    """A run in a spawned process (its own torch threads)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if device == "cpu":
        import torch

        torch.set_num_threads(threads)
    return execute_run(run, log, settings, eval_from, device, cache_path=cache_path)


def execute_runs(
    runs: Sequence[Run], log: EventLog, settings: Settings, eval_from: float, device: str, jobs: int, quiet: bool,
) -> list[RunOutput]:
    """Every run's outputs, in order of ``runs``: in this process (with a progress bar) or in ``jobs`` workers.

    The runs share one feature cache in a temporary folder, removed at the end, also when
    the run is stopped: SIGTERM unwinds like Ctrl-C here (its default would end the process
    without removing the folder, a few hundred MB), and workers are stopped with it.
    """
    import signal
    import tempfile

    previous = signal.signal(signal.SIGTERM, unwind) if threading.current_thread() is threading.main_thread() else None
    try:
        with tempfile.TemporaryDirectory(prefix="freshrec-eval-") as tmp:
            return _execute_runs(runs, log, settings, eval_from, device, jobs, quiet, Path(tmp) / "features.sqlite")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _init_worker() -> None:
    """A worker gets SIGTERM when the eval process dies or stops it, and then exits at once,
    removing its temporary folders (adapter exports, registries: ``atexit`` hooks) first."""
    import signal

    die_with_parent()
    signal.signal(signal.SIGTERM, _stop_worker)


def _stop_worker(signum: int, frame: Any) -> None:
    import atexit
    import os

    atexit._run_exitfuncs()
    os._exit(128 + signum)


def _execute_runs(
    runs: Sequence[Run], log: EventLog, settings: Settings, eval_from: float, device: str, jobs: int, quiet: bool,
    cache_path: Path,
) -> list[RunOutput]:
    if jobs <= 1 or len(runs) == 1:
        if device == "cpu":
            import torch

            torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
        out = []
        for k, run in enumerate(runs):
            bar = None
            if not quiet:
                from tqdm import tqdm

                desc = "replay" if len(runs) == 1 else f"replay {k + 1}/{len(runs)} (seed {run.seed})"
                bar = tqdm(total=len(log), unit="ev", unit_scale=True, desc=desc, mininterval=1.0)
            out.extend(execute_run(run, log, settings, eval_from, device, bar.update if bar is not None else None, cache_path))
            if bar is not None:
                bar.close()
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, 2 // jobs)
    # Workers die with this process however it ends (freshrec.children.die_with_parent), and
    # are stopped at once when it unwinds: the pool's own shutdown would wait for each
    # running replay to finish (tens of minutes).
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker)
    try:
        futures = [pool.submit(_worker, run, log, settings, eval_from, device, threads, cache_path) for run in runs]
        out = []
        for run, fut in zip(runs, futures, strict=True):
            out.extend(fut.result())
            if not quiet:
                print(f"run seed {run.seed} ({', '.join(run.names)}) done", flush=True)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in mp.active_children():
            proc.terminate()
        raise
    pool.shutdown()
    return out


def combine(outputs: Sequence[RunOutput], names: Sequence[str]) -> tuple[Figures, dict[str, MethodResult]]:
    """Figures per method (means and spread over seeds for seeded ones) and a per-method result to plot."""
    figures: Figures = {}
    merged: dict[str, MethodResult] = {}
    for name in names:
        runs = [(o.seed, o.results[name]) for o in outputs if name in o.results]
        if len(runs) == 1:  # an unseeded method, or a single seed: no spread to report
            figures[name] = runs[0][1].as_dict()  # type: ignore[assignment]
            merged[name] = runs[0][1]
            continue
        seeds = [s for s, _ in runs]
        figures[name] = {s: seed_figures([r.slices[s].as_dict() for _, r in runs], seeds) for s in SLICES}
        merged[name] = MethodResult(
            timeline=Timeline.merged([r.timeline for _, r in runs]), seconds=sum(r.seconds for _, r in runs)
        )
    return figures, merged


def format_cell(f: dict[str, object], metric: str) -> str:
    """``0.3012`` or, for a seeded method, ``0.3012 ± 0.0011`` (mean ± sample sd over seeds)."""
    mean = float(f[metric])  # type: ignore[arg-type]
    spread = f.get("spread")
    if isinstance(spread, dict):
        return f"{mean:.4f} ± {float(spread[metric]['std']):.4f}"
    return f"{mean:.4f}"


def format_table(figures: Figures) -> str:
    """One row per method, R@10, N@10 and baskets per slice; seeded methods as mean ± sd."""
    seeded = any(isinstance(f.get("spread"), dict) for slices in figures.values() for f in slices.values())
    w = 17 if seeded else 14
    head = f"{'method':14}" + "".join(f"{s + ' R@10':>{w}}{s + ' N@10':>{w}}{'n':>7}" for s in SLICES)
    lines = [head, "-" * len(head)]
    for name, slices in figures.items():
        row = f"{name:14}"
        for s in SLICES:
            f = slices[s]
            row += f"{format_cell(f, 'recall@10'):>{w}}{format_cell(f, 'ndcg@10'):>{w}}{f['baskets']:>7}"
        lines.append(row)
    for name, slices in figures.items():
        f = slices["all"]
        spread = f.get("spread")
        if isinstance(spread, dict):
            r = spread["recall@10"]
            lines.append(
                f"{name}: seeds {','.join(str(s) for s in f['seeds'])}; all R@10 min {r['min']:.4f} max {r['max']:.4f}"  # type: ignore[union-attr]
            )
    return "\n".join(lines)


def main(argv: list[str], settings: Settings) -> int:
    args = build_parser().parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        print(f"freshrec eval: unknown method(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    try:
        seeds = parse_seeds(args.seeds, args.seed, settings.seed)
    except ValueError as exc:
        print(f"freshrec eval: {exc}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print("freshrec eval: --jobs must be at least 1", file=sys.stderr)
        return 2
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
    runs = plan_runs(names, seeds)
    seeded = [n for n in names if n in SEEDED]
    seed_text = f"seeds {','.join(map(str, seeds))} for {', '.join(seeded)}" if seeded else "no seeded method"
    print(
        f"{log.name}: {len(log):,} events, {log.n_items:,} items, {log.n_users:,} users; history < {args.eval_from}, "
        f"scoring {n_baskets:,} baskets to {format_ts(float(log.ts[-1]))}; methods {', '.join(names)}; {seed_text}; "
        f"{len(runs)} replay(s), {args.jobs} process(es)",
        flush=True,
    )
    outputs = execute_runs(runs, log, settings, eval_from, device, args.jobs, args.quiet)
    wall = time.perf_counter() - t0
    figures, merged = combine(outputs, names)
    print(format_table(figures))
    for o in outputs:
        for name, note in o.notes.items():
            label = f"{name}/{o.seed}" if name in SEEDED else name
            print(f"{label:14} {note}")
    print(f"total {wall:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
    if args.plot:
        from .plot import plot_timeline

        labels = {n: f"{n} (mean of {len(seeds)} seeds)" for n in seeded if len(seeds) > 1}
        title = f"{log.name}: weekly Recall@10 from {args.eval_from} (prequential, all baskets)"
        plot_timeline(merged, eval_from, args.plot, title, labels)
    return 0
