"""Does online LoRA learning help? Frozen encoder vs a learned adapter on later pairs.

Builds train pairs from a dataset exactly as the users flow does (``ranking.pairs``:
context = the shopper's recent distinct items strictly before the event, as titles;
target = the purchased item), trains the learner's :class:`LoraTrainer` on the pairs
just before a split time, one micro-batch at a time in time order (as ``freshrec
learn`` would see them), within a time budget, and reports Recall@10 / NDCG@10 of the
target among the whole catalog on pairs after the split:

- ``window``: the first W pairs after the split, the learner's own evaluation protocol
  (the most recent pairs it has not trained on);
- ``heldout``: a random sample of pairs from the following days (bigger, steadier).

A popularity floor (top items by purchases before the split) is measured in the same
run, so the figures can be read against something that needs no model.

    python bench/learn_quality.py --data ../shared/data/online_retail_ii --budget-s 300 --json bench/out/learn_quality.json
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import print_table, write_json  # noqa: E402
from freshrec.contracts import CatalogItem, Event, TrainPair  # noqa: E402
from freshrec.dataset import SAMPLE_DIR, locate, read_events  # noqa: E402
from freshrec.settings import Settings  # noqa: E402
from learner.cli import file_catalog  # noqa: E402
from learner.evaluate import TargetPopularity, WindowBlend, encode_items, window_metrics  # noqa: E402
from learner.intake import MicroBatcher  # noqa: E402
from learner.metrics import ndcg_from_ranks, recall_from_ranks  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "online_retail_ii"


def parse_day(text: str) -> float:
    import datetime as dt

    return dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc).timestamp()


def build_pairs(
    dataset: Path,
    items: dict[str, CatalogItem],
    split_ts: float,
    train_pairs: int,
    eval_days: float,
) -> tuple[list[TrainPair], list[TrainPair], collections.Counter[str]]:
    """(last ``train_pairs`` pairs before the split, pairs in the ``eval_days`` after it, purchase counts before it)."""
    from ranking.pairs import PairRules, pair_for
    from ranking.user_state import UserState, apply_event

    files = locate(dataset)
    rules = PairRules()
    states: dict[str, UserState] = {}
    before: collections.deque = collections.deque(maxlen=train_pairs)
    after: list = []
    popularity: collections.Counter[str] = collections.Counter()
    end_ts = split_ts + eval_days * 86400
    for raw in read_events(files.events, files.name):
        try:
            event = Event.model_validate(raw)
        except ValueError:
            continue
        if event.ts >= end_ts:
            break
        state = states.get(event.user_id)
        if state is None:
            state = states[event.user_id] = UserState(event.user_id)
        apply_event(state, event)
        draft = pair_for(state, event, rules)
        if event.ts < split_ts and event.kind == "purchase" and event.item_id:
            popularity[event.item_id] += 1
        if draft is None:
            continue
        (before if event.ts < split_ts else after).append(draft)
    titles = {i: it.title for i, it in items.items()}
    texts = {i: it.text() for i, it in items.items()}
    complete = [d.complete(titles, texts) for d in before]
    return [p for p in complete if p.target_text], [d.complete(titles, texts) for d in after], popularity


def popularity_metrics(popularity: collections.Counter[str], pairs: list[TrainPair], k: int = 10) -> dict[str, float]:
    ranked = [i for i, _ in popularity.most_common()]
    rank_of = {item: r for r, item in enumerate(ranked)}
    ranks = np.array([rank_of.get(p.target_item, len(ranked)) for p in pairs])
    return {f"recall@{k}": recall_from_ranks(ranks, k), f"ndcg@{k}": ndcg_from_ranks(ranks, k), "n": float(len(ranks))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA if DEFAULT_DATA.exists() else SAMPLE_DIR)
    ap.add_argument("--split", default="2011-08-15", help="first day held out (UTC); training uses pairs before it")
    ap.add_argument("--train-pairs", type=int, default=6000, help="the last N pairs before the split are trained on")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop training after this many seconds")
    ap.add_argument("--eval-days", type=float, default=14.0)
    ap.add_argument("--window", type=int, default=256, help="the learner's window: first W pairs after the split")
    ap.add_argument("--heldout", type=int, default=2000, help="random pairs from the eval days")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="default: settings.learner_lr")
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--targets", default=None, help="LoRA target modules, e.g. query,value or query,key,value,dense")
    ap.add_argument("--negatives", type=int, default=None, help="random catalog negatives per batch")
    ap.add_argument("--pool", type=int, default=None, help="mixing pool (default: settings.learner_mix_pool)")
    ap.add_argument("--shuffle", action="store_true", help="shuffle the training pairs (not what a live learner sees)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = {"device": "cpu", "seed": args.seed}
    if args.lr is not None:
        overrides["learner_lr"] = args.lr
    if args.temperature is not None:
        overrides["learner_temperature"] = args.temperature
    if args.rank is not None:
        overrides["lora_rank"] = args.rank
    if args.targets is not None:
        overrides["learner_lora_targets"] = args.targets
    if args.negatives is not None:
        overrides["learner_catalog_negatives"] = args.negatives
    settings = Settings(**overrides)

    t0 = time.monotonic()
    items = dict(file_catalog(args.data)())
    split_ts = parse_day(args.split)
    train, after, popularity = build_pairs(args.data, items, split_ts, args.train_pairs, args.eval_days)
    after = [p for p in after if p.target_item in items]
    if len(after) < args.window:
        print(f"only {len(after)} pairs after {args.split}; choose an earlier split", file=sys.stderr)
        return 2
    window = after[: args.window]
    rng = random.Random(args.seed)
    heldout = rng.sample(after, min(args.heldout, len(after)))
    print(f"{len(items)} items; {len(train)} train pairs before {args.split}; {len(after)} pairs in the "
          f"{args.eval_days:g} days after (window {len(window)}, heldout {len(heldout)}); "
          f"built in {time.monotonic() - t0:.0f} s", flush=True)
    if args.shuffle:
        rng.shuffle(train)

    from models.encoder import TorchEncoder
    from learner.trainer import LoraTrainer

    t1 = time.monotonic()
    frozen = TorchEncoder(device="cpu")
    frozen_items = encode_items(frozen, items)
    frozen_w = window_metrics(frozen, frozen_items, window)
    frozen_h = window_metrics(frozen, frozen_items, heldout)
    print(f"frozen: window recall@10 {frozen_w['recall@10']:.4f}, heldout {frozen_h['recall@10']:.4f} "
          f"({time.monotonic() - t1:.0f} s)", flush=True)

    trainer = LoraTrainer(settings, "cpu")
    # The learner's own batcher (mixing pool included), fed in time order.
    pool = args.pool if args.pool is not None else settings.learner_mix_pool
    batcher = MicroBatcher(args.batch, 1e12, pool=max(pool, args.batch))
    losses: list[float] = []
    start = time.monotonic()
    trained = 0
    feed = iter(train)
    trainer.set_catalog([items[i].text() for i in sorted(items)])
    target_pop = TargetPopularity.days(settings.popularity_half_life_days)
    while time.monotonic() - start < args.budget_s:
        while not batcher.due():
            pair = next(feed, None)
            if pair is None:
                break
            batcher.add(pair)
        if not len(batcher):
            break
        # At the end of the stream the live learner's T-second flush trains what is pooled.
        batch = batcher.take()
        losses.append(trainer.train_step(batch))
        for pair in batch:
            target_pop.add(pair.target_item, pair.ts)
        trained += len(batch)
        if len(losses) % 25 == 0:
            print(f"  step {len(losses)}: {trained} pairs, loss(last 25) {np.mean(losses[-25:]):.4f}, "
                  f"{trained / (time.monotonic() - start):.1f} pairs/s", flush=True)
    train_s = time.monotonic() - start
    enc = trainer.encoder()
    adapter_items = encode_items(enc, items)
    adapter_w = window_metrics(enc, adapter_items, window)
    adapter_h = window_metrics(enc, adapter_items, heldout)
    pop_w = popularity_metrics(popularity, window)
    pop_h = popularity_metrics(popularity, heldout)
    # What the learner's publish gate ranks by: the blend's item side, with the popularity
    # of the trained pairs' targets (as the learner counts it) and each version's own scale.

    def gate(encoder, matrix, pairs):  # type: ignore[no-untyped-def]
        return window_metrics(encoder, matrix, pairs, blend=WindowBlend.for_matrix(matrix, target_pop, settings))

    gate_w = (gate(frozen, frozen_items, window), gate(enc, adapter_items, window))
    gate_h = (gate(frozen, frozen_items, heldout), gate(enc, adapter_items, heldout))

    first = float(np.mean(losses[:25])) if losses else float("nan")
    last = float(np.mean(losses[-25:])) if losses else float("nan")
    rows: list[tuple[str, Any]] = [
        ("pairs trained", trained),
        ("steps", len(losses)),
        ("train seconds", train_s),
        ("pairs/s (CPU)", trained / train_s if train_s else float("nan")),
        ("loss first 25 steps", first),
        ("loss last 25 steps", last),
    ]
    for name, fig, g in (("window", (frozen_w, adapter_w, pop_w), gate_w), ("heldout", (frozen_h, adapter_h, pop_h), gate_h)):
        f, a, p = fig
        rows += [
            (f"{name} gate recall@10 frozen", g[0]["recall@10"]),
            (f"{name} gate recall@10 adapter", g[1]["recall@10"]),
            (f"{name} n", int(f["n"])),
            (f"{name} recall@10 frozen", f["recall@10"]),
            (f"{name} recall@10 adapter", a["recall@10"]),
            (f"{name} recall@10 popularity", p["recall@10"]),
            (f"{name} ndcg@10 frozen", f["ndcg@10"]),
            (f"{name} ndcg@10 adapter", a["ndcg@10"]),
            (f"{name} ndcg@10 popularity", p["ndcg@10"]),
        ]
    print_table(f"learning quality on {args.data.name} (split {args.split})", rows)
    write_json(
        args.json,
        {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "settings": {k: getattr(settings, k) for k in (
                "learner_lr", "learner_temperature", "lora_rank", "learner_lora_targets", "learner_lora_dropout",
                "learner_catalog_negatives", "learner_negatives", "learner_anchor_weight")},
            "pool": pool,
            "pairs_trained": trained,
            "steps": len(losses),
            "train_seconds": train_s,
            "pairs_per_second": trained / train_s if train_s else None,
            "loss_first25": first,
            "loss_last25": last,
            "window": {"frozen": frozen_w, "adapter": adapter_w, "popularity": pop_w,
                       "gate_frozen": gate_w[0], "gate_adapter": gate_w[1]},
            "heldout": {"frozen": frozen_h, "adapter": adapter_h, "popularity": pop_h,
                        "gate_frozen": gate_h[0], "gate_adapter": gate_h[1]},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
