"""The system replay (streams state + serving blend) on a tiny log with hand-made vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.blend import log_blend
from evaluation.data import build_log
from evaluation.methods import SystemMethod, SystemReplay, encode_catalog
from evaluation.protocol import evaluate, top_k
from freshrec.settings import Settings
from ranking.scoring import BlendWeights, LogBlendWeights

DAY = 86400.0


def test_log_blend_hand_computed() -> None:
    w = LogBlendWeights(repeat=1.0, similarity=2.0, popularity=0.5, new=0.3, repeat_floor=0.01, popularity_floor=0.1)
    s = log_blend(np.array([2.0, 0.0]), np.array([-0.2, 0.5]), np.array([0.4, 1.0]), np.array([0.0, 1.0]), w)
    assert s[0] == pytest.approx(math.log(1.01) + 0.5 * math.log(0.5))
    assert s[1] == pytest.approx(math.log(0.01) + 2.0 * 0.5 + 0.5 * math.log(1.1) + 0.3)


def _log():  # type: ignore[no-untyped-def]
    rows = [
        ("u", "a", 0.0, "purchase"), ("u", "b", 0.0, "purchase"), ("u", "a", DAY, "purchase"),
        ("v", "c", 2 * DAY, "purchase"), ("v", "c", 2 * DAY, "purchase"), ("u", "b", 3 * DAY, "cancel"),
        ("u", "c", 10 * DAY, "purchase"), ("w", "d", 10 * DAY, "purchase"),
    ]
    events = [{"event_id": f"t:{k}", "user_id": u, "item_id": i, "ts": t, "kind": kd} for k, (u, i, t, kd) in enumerate(rows)]
    return build_log("t", events, [{"item_id": i, "title": f"t{i}"} for i in "abcd"])


def test_system_method_uses_stream_state_and_serving_blend() -> None:
    log = _log()
    vecs = np.eye(4, dtype=np.float32)
    settings = Settings(popularity_half_life_days=14.0)
    replay = SystemReplay(log, settings)
    m = SystemMethod("frozen", replay, vecs, BlendWeights(repeat=1.0, similarity=0.0, popularity=0.1), 200)
    res = evaluate(log, 10 * DAY, [m])
    u = replay.states[log.user_ids.index("u")]
    # the cancel took b's single purchase back out of u's frequency, as the stream does
    assert "b" not in u.freq and "a" in u.freq
    assert replay.first_seen[log.item_ids.index("c")] == 2 * DAY
    # u's basket {c}: a (repeat) first, then c (popular) -> hit at rank 2
    assert res["frozen"].as_dict()["all"]["recall@10"] == pytest.approx(0.5)  # w's basket {d}: never seen -> 0


def test_scores_before_basket_ingested() -> None:
    log = _log()
    replay = SystemReplay(log, Settings())
    m = SystemMethod("frozen", replay, np.eye(4, dtype=np.float32), BlendWeights(), 200)
    k = int(np.searchsorted(log.ts, 10 * DAY))
    evaluate(log.window(10 * DAY), 10 * DAY, [m])
    s = m.scores(log.user_ids.index("u"), 10 * DAY)
    seen = np.zeros(log.n_items, dtype=bool)
    seen[log.item[:k]] = True
    assert top_k(s, seen, 1) == [log.item_ids.index("a")]


def test_encode_catalog_keeps_item_order() -> None:
    titles = ["ccc", "a", "bb"]
    out = encode_catalog(lambda texts: np.array([[len(t), 0.0] for t in texts]), titles)
    assert out[:, 0].tolist() == [3.0, 1.0, 2.0]


def test_leaving_window_keeps_the_newest_pairs_back_as_the_learner_does() -> None:
    from evaluation.methods import leaving_window
    from freshrec.contracts import TrainPair
    from learner.intake import HoldoutWindow

    pairs = [TrainPair(pair_id=f"p{i}", user_id="u", context_text="c", target_item=f"i{i}", target_text="t") for i in range(5)]
    window = HoldoutWindow(3)
    assert [p.pair_id for p in leaving_window(window, pairs)] == ["p0", "p1"]
    assert [p.pair_id for p in window.pairs()] == ["p2", "p3", "p4"]
    short = HoldoutWindow(3)
    assert leaving_window(short, pairs[:2]) == []
    assert short.pairs() == pairs[:2]
