"""Query-encoding cost of the encoder back ends, and what int8 costs in retrieval.

    python -m bench.encoder [--json bench/out/encoder.json] [--threads 1] [--reps 200]

Back ends, measured interleaved in one run (so machine noise hits all alike), each as a
whole ``encode(texts)`` call including tokenisation:

- ``torch_fp32``: :class:`models.encoder.TorchEncoder` (the training back end), with
  ``torch.set_num_threads(threads)``;
- ``onnx_fp32``, ``onnx_int8``: :func:`models.onnx_encoder.encoder_for` (the serving back
  end; int8 = block-wise MatMulNBits, see models/export.py), ``threads`` intra-op threads;
- ``onnx_int8_dynamic``: ``quantize_dynamic`` per-channel, for comparison.

Batch 1 is a search query (short text); batch 64 is 64 catalog item texts. Reported:
medians in ms, and speed-ups over torch_fp32 (target: int8 >= 3x at batch 1).

Retrieval cost of int8 over the sample catalog (fp32 ONNX as the reference; it matches
PyTorch to cosine >= 0.9999): cosine of item vectors; top-10 overlap of item-to-item
and query-to-item search; and next-item Recall@10 on the sample's events (query = mean of
the shopper's last 5 items, target = the next new item), fp32 against int8 (target: a
relative loss of at most 0.5 %).
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from freshrec.contracts import CatalogItem
from freshrec.dataset import SAMPLE_DIR
from freshrec.settings import Settings


def _catalog(data_dir: Path) -> tuple[list[str], list[str]]:
    with open(data_dir / "items.csv", newline="") as fh:
        rows = [CatalogItem(**{k: v or "" for k, v in r.items()}) for r in csv.DictReader(fh) if r.get("title")]
    return [r.item_id for r in rows], [r.text() for r in rows]


def _queries(texts: Sequence[str], n: int, seed: int = 7) -> list[str]:
    """Search-like queries: the first two or three words of random item titles, lower case."""
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.choice(len(texts), size=min(n, len(texts)), replace=False):
        words = texts[int(i)].split(" | ")[0].lower().split()
        out.append(" ".join(words[: 2 + int(i) % 2]))
    return out


def _time_interleaved(
    backends: dict[str, Callable[[Sequence[str]], Any]], inputs: list[Sequence[str]], reps: int, warmup: int = 5
) -> dict[str, float]:
    """Median ms per call of each back end; calls rotate over back ends and inputs."""
    times: dict[str, list[float]] = collections.defaultdict(list)
    for r in range(warmup + reps):
        texts = inputs[r % len(inputs)]
        for name, fn in backends.items():
            t0 = time.perf_counter()
            fn(texts)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt * 1000)
    return {name: float(statistics.median(v)) for name, v in times.items()}


def _top10(queries: np.ndarray, items: np.ndarray, drop_self: bool = False) -> np.ndarray:
    scores = queries @ items.T
    if drop_self:
        np.fill_diagonal(scores, -np.inf)
    return np.argsort(-scores, axis=1)[:, :10]


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a.tolist(), b.tolist())]))


def _next_item_pairs(data_dir: Path, ids: list[str], limit: int, seed: int = 7) -> list[tuple[list[int], int, set[int]]]:
    pos = {i: k for k, i in enumerate(ids)}
    path = data_dir / "events.csv.gz"
    opener = gzip.open if path.exists() else open
    path = path if path.exists() else data_dir / "events.csv"
    by_user: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
    with opener(path, "rt", newline="") as fh:  # type: ignore[operator]
        for row in csv.DictReader(fh):
            if row["item_id"] in pos:
                by_user[row["user_id"]].append((float(row["ts"]), pos[row["item_id"]]))
    pairs = []
    for events in by_user.values():
        events.sort()
        history: list[int] = []
        for _, item in events:
            if history and item not in history:
                pairs.append((history[-5:], item, set(history)))
            if item not in history:
                history.append(item)
    rng = np.random.default_rng(seed)
    keep = rng.choice(len(pairs), size=min(limit, len(pairs)), replace=False)
    return [pairs[int(k)] for k in keep]


def _recall10(vectors: np.ndarray, pairs: list[tuple[list[int], int, set[int]]]) -> float:
    q = np.stack([vectors[h].mean(axis=0) for h, _, _ in pairs])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores = q @ vectors.T
    for row, (_, _, seen) in enumerate(pairs):
        scores[row, list(seen)] = -np.inf  # recommend new items only
    top = np.argpartition(-scores, 10, axis=1)[:, :10]
    return float(np.mean([target in row for (_, target, _), row in zip(pairs, top.tolist())]))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from models.encoder import TorchEncoder
    from models.export import ensure_export, model_file, quantize_int8
    from models.onnx_encoder import OnnxEncoder, encoder_for

    torch.set_num_threads(args.threads)
    data_dir = Path(args.data)
    ids, texts = _catalog(data_dir)
    queries = _queries(texts, 256)
    settings = Settings(state_dir=Path(args.state_dir))
    print(f"exporting (or loading the cached export) under {settings.state_dir / 'exports'} ...", file=sys.stderr)
    fp32 = encoder_for(settings, "base", None, "fp32", threads=args.threads)
    int8 = encoder_for(settings, "base", None, "int8", threads=args.threads)
    vdir = ensure_export(settings.state_dir / "exports", "base", None, "fp32").parent
    dyn_path = vdir.parent / "bench-int8-dynamic.onnx"
    if not dyn_path.exists():
        quantize_int8(model_file(vdir, "fp32"), dyn_path, method="dynamic")
    dynamic = OnnxEncoder(dyn_path, "base", "int8", threads=args.threads)
    torch_enc = TorchEncoder()

    backends: dict[str, Callable[[Sequence[str]], Any]] = {
        "torch_fp32": torch_enc.encode,
        "onnx_fp32": fp32.encode,
        "onnx_int8": int8.encode,
        "onnx_int8_dynamic": dynamic.encode,
    }
    print(f"timing batch 1 ({args.reps} reps) and batch 64 ({args.reps_64} reps) ...", file=sys.stderr)
    b1 = _time_interleaved(backends, [[q] for q in queries], args.reps)
    batches = [texts[i : i + 64] for i in range(0, len(texts) - 63, 64)][:16]
    b64 = _time_interleaved(backends, batches, args.reps_64, warmup=1)

    print("encoding the catalog with fp32 and int8 for the retrieval comparison ...", file=sys.stderr)
    e32, e8 = fp32.encode(texts), int8.encode(texts)
    edyn = dynamic.encode(texts)
    q32, q8, qdyn = fp32.encode(queries), int8.encode(queries), dynamic.encode(queries)
    ref_items, ref_queries = _top10(e32, e32, drop_self=True), _top10(q32, e32)
    pairs = _next_item_pairs(data_dir, ids, args.pairs)
    r32 = _recall10(e32, pairs)

    def quality(e: np.ndarray, q: np.ndarray) -> dict[str, float]:
        r = _recall10(e, pairs)
        return {
            "cosine_mean": float(np.sum(e * e32, axis=1).mean()),
            "cosine_min": float(np.sum(e * e32, axis=1).min()),
            "top10_overlap_item_to_item": _overlap(_top10(e, e, drop_self=True), ref_items),
            "top10_overlap_query_to_item": _overlap(_top10(q, e), ref_queries),
            "next_item_recall10": r,
            "next_item_recall10_relative_change": (r - r32) / r32 if r32 else float("nan"),
        }

    return {
        "threads": args.threads,
        "reps": {"batch1": args.reps, "batch64": args.reps_64},
        "catalog_items": len(texts),
        "latency_ms": {name: {"batch1": b1[name], "batch64": b64[name]} for name in backends},
        "speedup_vs_torch_fp32": {
            name: {"batch1": b1["torch_fp32"] / b1[name], "batch64": b64["torch_fp32"] / b64[name]} for name in backends
        },
        "retrieval": {
            "reference": "onnx_fp32",
            "next_item_pairs": len(pairs),
            "fp32_next_item_recall10": r32,
            "onnx_int8": quality(e8, q8),
            "onnx_int8_dynamic": quality(edyn, qdyn),
        },
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
    }


def print_report(fig: dict[str, Any]) -> None:
    lat, up = fig["latency_ms"], fig["speedup_vs_torch_fp32"]
    print(f"\nQuery encoding, {fig['threads']} thread(s), medians (ms) and speed-up over torch_fp32")
    print(f"{'back end':<20}{'batch 1':>10}{'x':>8}{'batch 64':>12}{'x':>8}")
    for name in lat:
        print(f"{name:<20}{lat[name]['batch1']:>10.2f}{up[name]['batch1']:>8.2f}{lat[name]['batch64']:>12.1f}{up[name]['batch64']:>8.2f}")
    ret = fig["retrieval"]
    print(f"\nint8 against fp32 over {fig['catalog_items']} catalog items ({ret['next_item_pairs']} next-item pairs)")
    print(f"{'':<36}{'int8':>12}{'int8 dynamic':>14}")
    for key in (
        "cosine_mean",
        "cosine_min",
        "top10_overlap_item_to_item",
        "top10_overlap_query_to_item",
        "next_item_recall10",
        "next_item_recall10_relative_change",
    ):
        print(f"{key:<36}{ret['onnx_int8'][key]:>12.4f}{ret['onnx_int8_dynamic'][key]:>14.4f}")
    print(f"{'(fp32 next_item_recall10)':<36}{ret['fp32_next_item_recall10']:>12.4f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.encoder", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads and ONNX Runtime intra-op threads")
    p.add_argument("--reps", type=int, default=200, help="timed batch-1 calls per back end")
    p.add_argument("--reps-64", type=int, default=20, help="timed batch-64 calls per back end")
    p.add_argument("--pairs", type=int, default=4000, help="next-item pairs for Recall@10")
    p.add_argument("--data", default=str(SAMPLE_DIR), help="dataset folder with items.csv and events.csv[.gz]")
    p.add_argument("--state-dir", help="where exports are cached (default: a temporary folder)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="freshrec-bench-encoder-") as tmp:
        args.state_dir = args.state_dir or tmp
        fig = run(args)
    print_report(fig)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(fig, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
