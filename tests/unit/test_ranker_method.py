"""evaluation.ranker_method: the prequential ranker learns what the blend cannot, and seeds fix it.

The synthetic shop: items come in pairs (a_k, b_k) that many shoppers buy together, so
the co-purchase rows know them as partners. Then every shopper alternates baskets
{a_k} and {b_k} with a random k: after buying a_k alone, the next basket is its partner.
The blend ranks a shopper's own items first (a never-bought item pays log(0.005)), so it
misses b_k; a ranker that learns the "co-purchase partner of the last basket" column
(``log_cooc_last``) finds it.
"""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.data import build_log
from evaluation.methods import SystemMethod, SystemReplay
from evaluation.protocol import evaluate
from evaluation.ranker_method import FAMILIES, RankerMethod, build_ranker_methods, example_stream
from freshrec.settings import Settings
from ranking.features import FEATURE_SCHEMA
from ranking.scoring import weights_from_settings
from ranking.user_state import DAY_S

T0 = 1_290_000_000.0
PAIRS = 30
EVAL_FROM = T0 + 22 * DAY_S


def shop_log(seed: int = 5):  # type: ignore[no-untyped-def]
    """Partners bought together by "seed" shoppers, then 24 shoppers alternating {a_k} and {b_k} daily."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    n = 0

    def buy(user: str, items: list[str], ts: float) -> None:
        nonlocal n
        for item in items:
            rows.append({"event_id": f"e{n}", "user_id": user, "kind": "purchase", "ts": ts, "item_id": item})
            n += 1

    ts = T0
    for k in range(PAIRS):
        for r in range(6):
            ts += 60.0
            buy(f"s{k}_{r}", [f"a{k}", f"b{k}"], ts)
    last: dict[int, int] = {}
    for day in range(1, 40):
        for u in range(24):
            ts = T0 + day * DAY_S + u * 60.0
            if u in last:
                buy(f"u{u}", [f"b{last.pop(u)}"], ts)
            else:
                last[u] = int(rng.integers(PAIRS))
                buy(f"u{u}", [f"a{last[u]}"], ts)
    return build_log("pairs", rows, [])


def settings() -> Settings:
    return Settings(
        ranker_update_baskets=150, ranker_update_days=7.0, ranker_window_baskets=1000, ranker_gate_baskets=60,
        ranker_min_gate_baskets=30, ranker_eval_history_days=21.0, ranker_trees=60, ranker_more_trees=20,
        ranker_ann_candidates=5,
    )


def frozen_method(log, s: Settings) -> SystemMethod:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(log.n_items, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return SystemMethod("frozen", SystemReplay(log, s), vectors, weights_from_settings(s), s.recommend_candidates)


def run(seed: int, family: str = "lgbm", s: Settings | None = None):  # type: ignore[no-untyped-def]
    log = shop_log()
    s = s or settings()
    frozen = frozen_method(log, s)
    (ranker,) = build_ranker_methods(log, s, EVAL_FROM, frozen, [seed], [family])
    results = evaluate(log, EVAL_FROM, [frozen, ranker])
    return results, ranker


def test_the_ranker_learns_the_partner_the_blend_misses() -> None:
    results, ranker = run(7)
    blend, learned = results["frozen"].slices["warm"], results["ranker"].slices["warm"]
    assert ranker.log.adopted >= 1 and ranker.ranked > 0
    assert blend.baskets == learned.baskets > 300
    # Half the baskets are partner baskets: a ranker that finds them gets near 0.5 more.
    assert learned.as_dict()["recall@10"] > blend.as_dict()["recall@10"] + 0.25


def test_same_seed_same_scores_and_gate_decisions() -> None:
    _, one = run(11)
    _, two = run(11)
    assert one.log.decisions and [d.split("fit")[0] for d in one.log.decisions] == [d.split("fit")[0] for d in two.log.decisions]
    x = np.concatenate([ex.features for ex in list(one.stream.examples)[-50:]])
    assert np.array_equal(one.active.score(x, schema=FEATURE_SCHEMA), two.active.score(x, schema=FEATURE_SCHEMA))


def test_unknown_family_is_refused() -> None:
    assert "lgbm" in FAMILIES
    with pytest.raises(ValueError, match="unknown ranker family"):
        run(1, "xgboost")


def test_a_ranker_on_a_longer_shared_stream_trains_only_on_its_own_history() -> None:
    """bench.ranker_tuning shares one stream built with the longest history: a shorter variant must not see more."""
    short = settings().model_copy(update={"ranker_eval_history_days": 6.0, "ranker_window_baskets": 300})
    _, alone = run(7, s=short)
    log = shop_log()
    frozen = frozen_method(log, short)
    stream = example_stream(log, settings(), frozen, EVAL_FROM)  # 21 days of history, window 1000
    shared = RankerMethod("ranker", stream, frozen, short, 7, train_from=EVAL_FROM - 6.0 * DAY_S)
    evaluate(log, EVAL_FROM, [frozen, shared])
    assert alone.log.decisions and [d.split("fit")[0] for d in alone.log.decisions] == [
        d.split("fit")[0] for d in shared.log.decisions
    ]
    assert stream.next_seq > alone.stream.next_seq, "the shared stream recorded examples the short variant may not train on"
