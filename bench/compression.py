"""Compression study (issue 15 item 4): a layer-pruned, distilled student against the encoder.

    python -m bench.compression --json docs/bench/compression.json \\
        [--layers 0,2,4 | --layer-study "0,1,2 0,2,4 0,3,5 1,3,5"] [--eval]

One run, one table, teacher (the bundled all-MiniLM-L6-v2) against the student
(:mod:`models.student`), each as int8 and fp32 ONNX exported by :mod:`models.export`'s
own code:

1. distillation data: online_retail_ii before ``--train-until`` (2011-03-01, the start
   of the validation window; nothing later is read for training): the titles of the
   items with an event then, less a seeded 10 % held out, plus shopper-history pseudo
   queries: the context text ``ranking.pairs`` would give a purchase (the shopper's
   recent distinct items' titles, most recent first, ``"; "``-joined), made only of
   held-in titles, for a seeded sample of purchases;
2. ``--layer-study``: each candidate set of kept layers is distilled briefly on the same
   texts and judged on the held-out titles (top-10 overlap of their neighbours among the
   training-period catalog, teacher against student, PyTorch fp32); the best is distilled
   in full. Without it, ``--layers`` is used. A student folder that already holds the
   same layers and recipe is reused (``--retrain`` forces training);
3. timing, interleaved so machine noise hits all back ends alike (``bench.encoder``'s
   ``_time_interleaved``; ONNX Runtime on ``--threads`` threads): query p50 at batch 1,
   catalog items/s at batch 64 over the bundled sample catalog;
4. retrieval parity against the teacher int8 over the sample catalog (bench.encoder's
   functions): top-10 overlap of item-to-item neighbours (all items, and the items the
   student never saw in training) and of query-to-item search, and next-item Recall@10
   on the sample's events. The mean cosine to the teacher's vector is shown too: the
   student is trained *into* the teacher's space, so unlike two independent models it is
   a meaningful distance here;
5. ``--eval``: ``freshrec eval``'s ``frozen`` method on the validation window
   (``--eval-from 2011-03-01 --until 2011-06-01``), once with the teacher and once with
   the student's vectors (setting ``eval_encoder_dir``). It is deterministic: one run each.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.encoder import _catalog, _next_item_pairs, _overlap, _queries, _recall10, _time_interleaved, _top10
from bench.report import write_json
from freshrec.dataset import SAMPLE_DIR
from freshrec.settings import Settings

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "online_retail_ii"
HOLDOUT_SHARE = 0.10


def training_texts(log: Any, until: float, contexts: int, context_size: int, seed: int) -> dict[str, Any]:
    """Titles (held in / held out) and pseudo-queries from the events of ``log`` before ``until``."""
    from evaluation.data import CANCEL, PURCHASE

    n = int(np.searchsorted(log.ts, until, side="left"))
    seen = sorted(set(log.item[:n].tolist()))
    rng = np.random.default_rng(seed)
    held = set(rng.choice(seen, size=int(round(HOLDOUT_SHARE * len(seen))), replace=False).tolist())
    train_items = [i for i in seen if i not in held]
    recent: dict[int, list[int]] = {}
    drafts: list[tuple[int, ...]] = []
    last_ts: dict[int, float] = {}
    basket: dict[int, list[int]] = {}  # lines of the shopper's current basket: not yet context
    for k in range(n):
        u, i, ts = int(log.user[k]), int(log.item[k]), float(log.ts[k])
        if last_ts.get(u) != ts:  # a new basket: the last one's lines become history
            hist = recent.setdefault(u, [])
            for j in basket.pop(u, []):
                if j in hist:
                    hist.remove(j)
                hist.insert(0, j)
            del hist[context_size:]
            last_ts[u] = ts
        if int(log.kind[k]) == PURCHASE and i not in held:
            ctx = tuple(j for j in recent.get(u, []) if j not in held)
            if ctx:
                drafts.append(ctx)
        if int(log.kind[k]) != CANCEL:  # as ranking.pairs: a cancel is no context
            basket.setdefault(u, []).append(i)
    pick = rng.choice(len(drafts), size=min(contexts, len(drafts)), replace=False) if drafts else []
    queries = sorted({"; ".join(log.titles[j] for j in drafts[int(p)]) for p in pick})
    return {
        "titles": [log.titles[i] for i in train_items],
        "held_out": [log.titles[i] for i in sorted(held)],
        "catalog": [log.titles[i] for i in seen],
        "contexts": queries,
    }


def _neighbours_overlap(ref_all: np.ndarray, got_all: np.ndarray, rows: np.ndarray) -> float:
    """Top-10 overlap of ``rows``' neighbours among all items (self excluded), student vs teacher."""
    ref = ref_all[rows] @ ref_all.T
    got = got_all[rows] @ got_all.T
    ref[np.arange(len(rows)), rows] = -np.inf
    got[np.arange(len(rows)), rows] = -np.inf
    return _overlap(np.argsort(-got, axis=1)[:, :10], np.argsort(-ref, axis=1)[:, :10])


def heldout_parity(student: Any, data: dict[str, Any], teacher_vecs: np.ndarray) -> dict[str, float]:
    """How close ``student`` is on the held-out titles (PyTorch, fp32): cosine and neighbour overlap."""
    from models.encoder import TorchEncoder

    vecs = TorchEncoder(model=student.eval()).encode(data["catalog"])
    index = {t: k for k, t in enumerate(data["catalog"])}
    rows = np.array([index[t] for t in data["held_out"]])
    cos = np.sum(vecs[rows] * teacher_vecs[rows], axis=1)
    return {
        "heldout_cosine_mean": float(cos.mean()),
        "heldout_top10_overlap": _neighbours_overlap(teacher_vecs, vecs, rows),
    }


def make_student(args: argparse.Namespace, data: dict[str, Any], out: dict[str, Any]) -> Path:
    """Distil (or reuse) the student; record the layer study and the training run in ``out``."""
    import torch

    from models.encoder import load_base_model
    from models.student import (
        DistilConfig,
        StudentError,
        distil,
        prune_layers,
        read_student_meta,
        save_student,
        student_meta,
        teacher_targets,
    )

    torch.set_num_threads(args.train_threads)
    config = DistilConfig(epochs=args.epochs, seed=args.seed)  # lr: the default, chosen on held-out titles
    texts = data["titles"] + data["contexts"]
    layers = [int(x) for x in args.layers.split(",")]
    candidates = [[int(x) for x in c.split(",")] for c in (args.layer_study or "").split()]

    def folder(kept: list[int]) -> Path:
        return Path(args.students) / (args.name or "l" + "".join(map(str, kept)))

    student_dir = folder(layers)
    if not args.retrain and not candidates:
        try:
            meta = read_student_meta(student_dir)
            if meta["layers"] == layers and meta["distil"] == asdict(config) and meta.get("texts") == len(texts):
                print(f"reusing the student at {student_dir}", file=sys.stderr)
                out["distillation"] = meta
                return student_dir
        except StudentError:
            pass
    teacher = load_base_model()
    t0 = time.perf_counter()
    targets = teacher_targets(teacher, texts)
    catalog_vecs = teacher_targets(teacher, data["catalog"])
    target_seconds = time.perf_counter() - t0
    if candidates:
        study = []
        for cand in candidates:
            student = prune_layers(teacher, cand)
            before = heldout_parity(student, data, catalog_vecs)
            rep = distil(student, texts, targets, DistilConfig(epochs=args.study_epochs, seed=args.seed), progress=False)
            after = heldout_parity(student, data, catalog_vecs)
            row = {"layers": cand, "pruned": before, "distilled": after, "seconds": rep.seconds}
            study.append(row)
            print(f"layers {cand}: pruned {before}, after {args.study_epochs} epochs {after}", file=sys.stderr)
        best = max(study, key=lambda r: (r["distilled"]["heldout_top10_overlap"], r["distilled"]["heldout_cosine_mean"]))
        layers = best["layers"]
        out["layer_study"] = {"epochs": args.study_epochs, "candidates": study, "chosen": layers}
        student_dir = folder(layers)
    student = prune_layers(teacher, layers)
    report = distil(student, texts, targets, config)
    parity = heldout_parity(student, data, catalog_vecs)
    meta = student_meta(
        layers, config, report,
        texts=len(texts), titles=len(data["titles"]), contexts=len(data["contexts"]),
        held_out=len(data["held_out"]), train_until=args.train_until, teacher_target_seconds=target_seconds,
        train_threads=args.train_threads, **parity,
    )
    save_student(student, student_dir, meta)
    print(f"student saved at {student_dir}: {parity}", file=sys.stderr)
    out["distillation"] = meta
    return student_dir


def measure(args: argparse.Namespace, student_dir: Path, seen_titles: set[str]) -> dict[str, Any]:
    """Timing, sizes and retrieval parity of the four ONNX back ends, in one run."""
    from models.export import ensure_export, model_file
    from models.onnx_encoder import OnnxEncoder
    from models.student import export_student, student_version

    exports = Path(args.state_dir) / "exports"
    teacher_dir = ensure_export(exports, "base", None, "int8").parent
    s_dir = export_student(student_dir)
    paths = {
        "teacher_int8": model_file(teacher_dir, "int8"),
        "student_int8": model_file(s_dir, "int8"),
        "teacher_fp32": model_file(teacher_dir, "fp32"),
        "student_fp32": model_file(s_dir, "fp32"),
    }
    encs = {
        name: OnnxEncoder(p, "base" if name.startswith("teacher") else student_version(student_dir),
                          name.split("_")[1], threads=args.threads)
        for name, p in paths.items()
    }
    ids, texts = _catalog(Path(args.catalog))
    queries = _queries(texts, 256)
    fns: dict[str, Callable[[Sequence[str]], Any]] = {n: e.encode for n, e in encs.items()}
    print(f"timing batch 1 ({args.reps} reps) and batch 64 ({args.reps_64} reps) ...", file=sys.stderr)
    b1 = _time_interleaved(fns, [[q] for q in queries], args.reps)
    batches = [texts[i : i + 64] for i in range(0, len(texts) - 63, 64)][:16]
    b64 = _time_interleaved(fns, batches, args.reps_64, warmup=1)

    print("encoding the sample catalog for the parity figures ...", file=sys.stderr)
    items = {n: e.encode(texts) for n, e in encs.items()}
    qv = {n: e.encode(queries) for n, e in encs.items()}
    pairs = _next_item_pairs(Path(args.catalog), ids, args.pairs)
    ref = "teacher_int8"
    ref_items, ref_q = _top10(items[ref], items[ref], drop_self=True), _top10(qv[ref], items[ref])
    unseen = np.array([k for k, t in enumerate(texts) if t not in seen_titles])
    r_ref = _recall10(items[ref], pairs)
    rows = {}
    for n in encs:
        r = _recall10(items[n], pairs)
        rows[n] = {
            "query_p50_ms": b1[n],
            "batch64_ms": b64[n],
            "items_per_s": 64_000 / b64[n],
            "file_mb": paths[n].stat().st_size / 1e6,
            "cosine_to_teacher_int8": float(np.sum(items[n] * items[ref], axis=1).mean()),
            "top10_item_to_item": _overlap(_top10(items[n], items[n], drop_self=True), ref_items),
            "top10_item_to_item_unseen": _neighbours_overlap(items[ref], items[n], unseen) if len(unseen) else float("nan"),
            "top10_query_to_item": _overlap(_top10(qv[n], items[n]), ref_q),
            "next_item_recall10": r,
            "next_item_recall10_rel": (r - r_ref) / r_ref if r_ref else float("nan"),
        }
    for n in encs:
        rows[n]["query_speedup_vs_teacher_int8"] = b1[ref] / b1[n]
        rows[n]["items_speedup_vs_teacher_int8"] = b64[ref] / b64[n]
    return {
        "catalog": str(args.catalog), "catalog_items": len(texts), "unseen_items": int(len(unseen)),
        "queries": len(queries), "next_item_pairs": len(pairs), "threads": args.threads,
        "reps": {"batch1": args.reps, "batch64": args.reps_64}, "reference": ref, "backends": rows,
    }


def run_eval(args: argparse.Namespace, student_dir: Path) -> dict[str, Any]:
    """``freshrec eval``'s ``frozen`` on the validation window, teacher then student (same log)."""
    import torch

    from evaluation.cli import Run, execute_run
    from evaluation.data import load_log, parse_date

    torch.set_num_threads(2)
    log = load_log(Path(args.data), parse_date(args.eval_until))
    eval_from = parse_date(args.eval_from)
    base = Settings(state_dir=Path(args.state_dir))
    out: dict[str, Any] = {"eval_from": args.eval_from, "until": args.eval_until, "method": "frozen"}
    for label, settings in (("teacher", base), ("student", base.model_copy(update={"eval_encoder_dir": student_dir}))):
        t0 = time.perf_counter()
        result = execute_run(Run(settings.seed, ("frozen",)), log, settings, eval_from, "cpu").results["frozen"]
        out[label] = {**result.as_dict(), "seconds": time.perf_counter() - t0}
        print(f"eval {label}: {out[label]['all']['recall@10']:.4f} all, {out[label]['explore']['recall@10']:.4f} "
              f"explore ({out[label]['seconds']:.0f} s)", file=sys.stderr)
    t, s = out["teacher"], out["student"]
    out["relative_change"] = {sl: (s[sl]["recall@10"] - t[sl]["recall@10"]) / t[sl]["recall@10"] for sl in t if sl != "seconds"}
    out["adopt_by_rule"] = out["relative_change"]["explore"] >= -0.01
    return out


def print_report(fig: dict[str, Any]) -> None:
    m = fig["measure"]
    rows = m["backends"]
    cols = [
        ("query_p50_ms", "query p50 ms", ".2f"), ("query_speedup_vs_teacher_int8", "x", ".2f"),
        ("items_per_s", "items/s b64", ",.0f"), ("items_speedup_vs_teacher_int8", "x", ".2f"),
        ("file_mb", "MB", ".1f"), ("cosine_to_teacher_int8", "cos", ".4f"),
        ("top10_item_to_item", "i2i top10", ".3f"), ("top10_item_to_item_unseen", "i2i unseen", ".3f"),
        ("top10_query_to_item", "q2i top10", ".3f"), ("next_item_recall10", "next R@10", ".4f"),
        ("next_item_recall10_rel", "rel", "+.2%"),
    ]
    print(f"\nteacher vs student, ONNX on {m['threads']} thread(s), medians; parity against {m['reference']} over "
          f"{m['catalog_items']} items ({m['unseen_items']} unseen in distillation), {m['queries']} queries, "
          f"{m['next_item_pairs']} next-item pairs")
    print(f"{'back end':<14}" + "".join(f"{h:>13}" for _, h, _ in cols))
    for name, r in rows.items():
        print(f"{name:<14}" + "".join(f"{format(r[k], f):>13}" for k, _, f in cols))
    ev = fig.get("eval")
    if ev:
        print(f"\nfreshrec eval frozen, {ev['eval_from']} .. {ev['until']} (validation window), Recall@10")
        print(f"{'encoder':<14}" + "".join(f"{s:>12}" for s in ("all", "warm", "explore", "new")) + f"{'seconds':>10}")
        for label in ("teacher", "student"):
            e = ev[label]
            print(f"{label:<14}" + "".join(f"{e[s]['recall@10']:>12.4f}" for s in ("all", "warm", "explore", "new"))
                  + f"{e['seconds']:>10.0f}")
        rel = ev["relative_change"]
        print(f"{'relative':<14}" + "".join(f"{rel[s]:>+12.2%}" for s in ("all", "warm", "explore", "new")))
        print(f"rule (explore loss <= 1 %): {'adopt as default' if ev['adopt_by_rule'] else 'keep as an option'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compression", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="online_retail_ii folder (training texts, --eval)")
    p.add_argument("--train-until", default="2011-03-01", help="only events before this day give training texts")
    p.add_argument("--layers", default="0,2,4", help="teacher layers the student keeps (without --layer-study)")
    p.add_argument("--layer-study", help='candidate layer sets, e.g. "0,1,2 0,2,4 0,3,5"; the best is trained')
    p.add_argument("--study-epochs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--contexts", type=int, default=500, help="shopper-history pseudo-queries added to the titles")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--train-threads", type=int, default=2, help="torch threads while distilling")
    p.add_argument("--students", default="/tmp/compression/students", help="folder of student model folders")
    p.add_argument("--name", help="student folder name (default l<layers>, e.g. l024)")
    p.add_argument("--retrain", action="store_true", help="distil even if a matching student exists")
    p.add_argument("--state-dir", default="/tmp/compression/state", help="where the teacher's export is cached")
    p.add_argument("--catalog", default=str(SAMPLE_DIR), help="dataset folder for timing and parity (bundled sample)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads while timing")
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--reps-64", type=int, default=20)
    p.add_argument("--pairs", type=int, default=4000)
    p.add_argument("--eval", action="store_true", help="also run freshrec eval frozen, teacher and student")
    p.add_argument("--eval-from", default="2011-03-01")
    p.add_argument("--eval-until", default="2011-06-01")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    from evaluation.data import load_log, parse_date

    started = time.perf_counter()
    until = parse_date(args.train_until)
    log = load_log(Path(args.data), until)
    data = training_texts(log, until, args.contexts, Settings().stream_pair_context, args.seed)
    print(f"distillation texts: {len(data['titles'])} titles, {len(data['contexts'])} pseudo-queries; "
          f"{len(data['held_out'])} titles held out", file=sys.stderr)
    fig: dict[str, Any] = {"benchmark": "compression", "data": str(args.data), "train_until": args.train_until}
    stages = fig["stage_seconds"] = {"texts": time.perf_counter() - started}
    t0 = time.perf_counter()
    student_dir = make_student(args, data, fig)
    fig["student_dir"] = str(student_dir)
    stages["student"], t0 = time.perf_counter() - t0, time.perf_counter()
    fig["measure"] = measure(args, student_dir, set(data["titles"]))
    stages["measure"], t0 = time.perf_counter() - t0, time.perf_counter()
    if args.eval:
        fig["eval"] = run_eval(args, student_dir)
        stages["eval"] = time.perf_counter() - t0
    fig["seconds"] = time.perf_counter() - started
    print_report(fig)
    write_json(args.json, fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
