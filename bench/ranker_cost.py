"""What the ranker and its features add to /recommend, on one core, with and without it in the same run.

    python -m bench.ranker_cost --json docs/bench/ranker_cost.json [--events 300000] [--requests 400]

Issue 14 item 4: the ranker and its features may add at most 1 ms p50 to /recommend for
~300 candidates on one CPU core. This benchmark (``bench.serving`` drives a separate
server process over loopback, where a 1 ms difference drowns in the load generator's
noise on 2 cores) measures in one process pinned to one core:

- **/recommend end to end** through the ASGI app (starlette's in-process client) over a
  real Redis of the benchmark's own: the same shoppers, interleaved in blocks, with the
  ranker slot holding the ranker and holding nothing (the blend, today's path); the
  difference of the two p50s is the ranker's cost, including its extra Redis round trip
  (co-purchase rows and neighbours' states), the nearest-shopper search, the candidates,
  the features and the scores;
- **the ranker path alone** (``serving.ranked``: gather, candidates, features, score) and
  its parts, against ``ranking.scoring.recommend`` (the blend) on the same inputs.

State: the first ``--events`` events of online_retail_ii replayed through the contract's
per-event rule (``evaluation.collab_replay.CollabReplay``) and written to Redis in the
users flow's and the contract's layouts (``serving.collab_data``); the item index holds
the whole catalog with 384-dimensional vectors (the encoder's width; a toy encoder: the
encoder is not on /recommend's path). Rankers: LightGBM lambdarank at the settings'
``ranker_trees`` (the default family) and the MLP, trained on features of real requests;
LightGBM's scoring cost alone at 25/50/100/200 trees on the same rows.

Where a ranked request's time goes (cProfile), what was made faster and what remains:
docs/ranker_cost.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import DEFAULT_DATA, load_events, private_stack
from bench.report import print_table, write_json


def _pin_one_core() -> int:
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[-1]
    os.sched_setaffinity(0, {cpu})
    return cpu


def _p50_us(times: list[float]) -> float:
    return round(statistics.median(times) * 1e6, 1)


def _p90_us(times: list[float]) -> float:
    return round(float(np.percentile(times, 90)) * 1e6, 1)


def _write_state(settings: Any, replay: Any, client: Any) -> None:
    """The replay's user states, served popularity and collaborative state, in serving's Redis layouts."""
    from ranking.collab import shopper_vector
    from serving.collab_data import write_for_tests
    from stores.user_store import write_partition_batch, write_user_states

    write_user_states(client, settings, replay.states.values())
    served = replay.served
    write_partition_batch(
        client, settings, settings.topics.events, 0, 1, {}, served.entries, served.newest_ts, served.first_seen
    )
    collab = replay.collab
    vectors = {u: v for u, s in replay.states.items() if (v := shopper_vector(s, replay.collab_rules)) is not None}
    write_for_tests(
        client, settings,
        rows=collab.copurchase.rows,
        stats={i: (b, collab.stats.buyers.get(i, 0)) for i, b in collab.stats.baskets.items()},
        pop_short=collab.pop_short.entries,
        pop_long=collab.pop_long.entries,
        first_seen=collab.pop_long.first_seen,
        newest_ts=max(served.newest_ts, collab.pop_long.newest_ts),
        vectors=vectors,
    )


def _train(x_groups: list[np.ndarray], sim_col: int, family: str, settings: Any, trees: int | None = None) -> Any:
    """A ranker of ``family`` on request features, labelled by a noisy function of them (cost, not quality)."""
    from models.ranker import RankerParams, fit_ranker
    from ranking.features import COLUMN, FEATURE_NAMES, FEATURE_SCHEMA

    rng = np.random.default_rng(0)
    xs, ys, groups = [], [], []
    for x in x_groups:
        signal = x[:, COLUMN["log_repeat"]] + 0.5 * x[:, COLUMN["log_pop_short"]] + x[:, sim_col] + rng.normal(0, 1, len(x))
        y = np.zeros(len(x), dtype=np.float32)
        y[np.argsort(-signal)[:3]] = 1.0
        xs.append(x)
        ys.append(y)
        groups.append(len(x))
    params = RankerParams.from_settings(settings)
    if trees is not None:
        params = dataclasses.replace(params, trees=trees)
    if family == "mlp":
        params = RankerParams(family="mlp", hidden=params.hidden, device="cpu")
    return fit_ranker(np.concatenate(xs), np.concatenate(ys), groups, 0, FEATURE_NAMES, FEATURE_SCHEMA, params)


def run(data_dir: Path, n_events: int, n_requests: int, block: int = 25) -> dict[str, Any]:
    from starlette.testclient import TestClient

    from evaluation.collab_replay import CollabReplay
    from freshrec.contracts import CatalogItem, Event
    from freshrec.dataset import locate, read_items
    from models.ranker_registry import RankerRegistry
    from ranking import scoring
    from ranking.features import COLUMN, FEATURE_SCHEMA, candidates, feature_matrix, shopper_signals, similarity_column
    from serving.app import create_app
    from serving.ranked import gather_shopper, rank, shop_at
    from serving.runtime import ServingRuntime
    from serving.testing import CatalogTwin, hash_tools
    from stores.user_store import connect

    cpu = _pin_one_core()
    out: dict[str, Any] = {"cpu": cpu, "events": n_events}
    with private_stack(partitions=1) as base:
        # result cache off: the same shoppers are asked again and again; this measures the work of an answer
        settings = base.model_copy(update={"popularity_refresh_s": 3600.0, "ranker_poll_s": 3600.0, "result_cache_size": 0})
        t0 = time.perf_counter()
        replay = CollabReplay(settings)
        group: list[Event] = []
        for raw in load_events(data_dir, n_events):
            e = Event.model_construct(**{k: v for k, v in raw.items() if v is not None and k in Event.model_fields})
            if group and e.ts != group[0].ts:
                replay.apply_events(group)
                group = []
            group.append(e)
        replay.apply_events(group)
        client = connect(settings)
        _write_state(settings, replay, client)
        out["replay_s"] = round(time.perf_counter() - t0, 1)

        files = locate(data_dir)
        items = {r["item_id"]: CatalogItem(item_id=r["item_id"], title=r.get("title") or r["item_id"])
                 for r in read_items(files.items)} if files.items else {}
        for item in replay.collab.pop_long.first_seen:
            items.setdefault(item, CatalogItem(item_id=item, title=item))
        runtime = ServingRuntime(settings, tools=hash_tools(CatalogTwin(items), dim=384), follow_topics=False)
        with TestClient(create_app(runtime)) as http:
            assert runtime.wait_ready(300), "serving did not become ready"
            runtime.popularity.refresh()
            runtime.shop.refresh()
            deadline = time.monotonic() + 60
            while not runtime.shoppers.loaded.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
            pair = runtime.active.pair
            assert pair is not None and runtime.shop.view is not None
            buyers = [u for u, s in replay.states.items() if s.baskets]
            users = random.Random(7).sample(buyers, min(n_requests, len(buyers)))
            out.update(items_indexed=len(pair.index), shoppers_indexed=len(runtime.shoppers), users=len(users))

            rules = runtime.feature_rules
            states = {u: replay.states[u] for u in users}

            def gather(state: Any, now: float) -> Any:
                return gather_shopper(state, now, rules, runtime.collab_rules, settings.collab_neighbours,
                                      runtime.shoppers.search, runtime.read_shopper_inputs)

            # features of real requests, to train rankers on
            x_groups = []
            for u in users[:200]:
                shop = shop_at(runtime.shop.view, states[u])
                view = gather(states[u], shop.now_ts)
                sig = shopper_signals(view, shop.now_ts, rules, shop)
                cands = candidates(sig, shop, rules)
                sim = similarity_column(states[u], cands.items, pair.index.reconstruct_many(cands.items), rules, pair.similarity)
                x_groups.append(feature_matrix(sig, shop, cands.items, sim, rules))
            registry = RankerRegistry(settings.state_dir / "rankers")
            rankers = {}
            for family in ("lightgbm", "mlp"):
                model = _train(x_groups, COLUMN["sim"], family, settings)
                rankers[family] = registry.publish(model, None, {}).version

            def timed(fn: Callable[[], Any], n: int) -> list[float]:
                times = []
                for _ in range(n):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                return times

            for family, version in rankers.items():
                loaded = runtime.ranker.activate(version)
                fig: dict[str, Any] = {"version": version, "size": loaded.manifest.size}
                # end to end, interleaved blocks: ranker, blend, ranker, ...
                with_r: list[float] = []
                without: list[float] = []
                cands_n: list[int] = []
                for warm in users[:20]:
                    http.get("/recommend", params={"user_id": warm, "k": 10})
                for start in range(0, len(users), block):
                    chunk = users[start:start + block]
                    for slot_ranker, sink in ((loaded, with_r), (None, without)):
                        runtime.ranker.install(slot_ranker, "bench")
                        for u in chunk:
                            t = time.perf_counter()
                            r = http.get("/recommend", params={"user_id": u, "k": 10})
                            sink.append(time.perf_counter() - t)
                            body = r.json()
                            assert r.status_code == 200, r.text
                            assert body["ranker_version"] == (version if slot_ranker else None), body
                runtime.ranker.install(loaded, "bench")
                fig.update(
                    recommend_p50_us_with_ranker=_p50_us(with_r), recommend_p50_us_blend=_p50_us(without),
                    recommend_p90_us_with_ranker=_p90_us(with_r), recommend_p90_us_blend=_p90_us(without),
                )
                fig["added_p50_ms"] = round((fig["recommend_p50_us_with_ranker"] - fig["recommend_p50_us_blend"]) / 1000, 3)

                # the ranker path alone and its parts, against the blend on the same inputs
                parts: dict[str, list[float]] = {k: [] for k in ("gather", "signals_candidates", "features", "score", "path", "blend")}
                for u in users:
                    state = states[u]
                    shop = shop_at(runtime.shop.view, state)
                    t = time.perf_counter()
                    view = gather(state, shop.now_ts)
                    parts["gather"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    sig = shopper_signals(view, shop.now_ts, rules, shop)
                    cands = candidates(sig, shop, rules)
                    parts["signals_candidates"].append(time.perf_counter() - t)
                    cands_n.append(len(cands))
                    t = time.perf_counter()
                    vecs = pair.index.reconstruct_many(cands.items)
                    sim = similarity_column(state, cands.items, vecs, rules, pair.similarity)
                    x = feature_matrix(sig, shop, cands.items, sim, rules)
                    parts["features"].append(time.perf_counter() - t)
                    parts["score"].extend(timed(lambda: loaded.model.score(x, schema=FEATURE_SCHEMA), 1))
                    t = time.perf_counter()
                    rank(loaded, gather(state, shop.now_ts), shop, pair.index, pair.similarity, rules, 10)
                    parts["path"].append(time.perf_counter() - t)
                    pop = runtime.popularity.view
                    t = time.perf_counter()
                    scoring.recommend(
                        state.history, state.basket_scores(settings.repeat_basket_decay), pair.space(), pop.scores,
                        pop.ranked, runtime.weights, 10, now_ts=state.last_ts,
                        half_life_s=settings.user_vector_half_life_days * 86_400.0,
                        candidates=settings.recommend_candidates, new_items=pop.new_items, similarity_scale=pair.similarity,
                    )
                    parts["blend"].append(time.perf_counter() - t)
                fig.update({f"{k}_p50_us": _p50_us(v) for k, v in parts.items()})
                fig["candidates_p50"] = int(statistics.median(cands_n))
                fig["candidates_max"] = max(cands_n)
                out[family] = fig

            # the model alone: LightGBM's scoring cost per tree count, on the same request rows
            x_score = x_groups[: min(len(x_groups), 100)]
            per_trees: dict[str, float] = {}
            for trees in (25, 50, 100, 200):
                model = _train(x_groups, COLUMN["sim"], "lightgbm", settings, trees)
                times = [t for x in x_score for t in timed(lambda x=x: model.score(x, schema=FEATURE_SCHEMA), 3)]
                per_trees[str(trees)] = _p50_us(times)
            out["lightgbm_score_p50_us_by_trees"] = per_trees
            out["score_rows_p50"] = int(statistics.median(len(x) for x in x_score))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    figures = run(args.data, args.events, args.requests)
    for family in ("lightgbm", "mlp"):
        f = figures[family]
        print_table(f"/recommend with the {family} ranker ({f['size']}) vs the blend, one core", [(k, v) for k, v in f.items()])
    print_table("LightGBM scoring p50 (us) by trees", list(figures["lightgbm_score_p50_us_by_trees"].items()))
    print_table("state", [(k, v) for k, v in figures.items() if not isinstance(v, dict)])
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
