"""The ``new`` slice on a hand-made log: warm shoppers, items first seen in the 30 days before."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.data import EventLog, build_log
from evaluation.protocol import NEW_ITEM_DAYS, SLICES, evaluate

DAY = 86400.0


class FixedScores:
    """Scores b > a > d > c > e... whatever the shopper: the ranking is known by hand."""

    name = "fixed"

    def __init__(self, n_items: int) -> None:
        self.s = np.zeros(n_items)
        self.s[[4, 1, 0, 3, 2]] = [5.0, 4.0, 3.0, 2.0, 1.0]  # e, b, a, d, c

    def observe(self, log: EventLog, start: int, stop: int) -> None:
        pass

    def advance(self, now: float) -> None:
        pass

    def scores(self, user: int, now: float) -> np.ndarray:
        return self.s


def _log(rows: list[tuple[str, str, float, str]]) -> EventLog:
    events = [{"event_id": f"t:{k}", "user_id": u, "item_id": i, "ts": d * DAY, "kind": kind}
              for k, (u, i, d, kind) in enumerate(rows)]
    return build_log("t", events, [{"item_id": i, "title": i} for i in "abcde"])


def test_new_slice_hand_computed() -> None:
    # first seen: a day 0, b day 20, d day 30 (a view counts), c day 50, e day 60 (in the basket itself).
    log = _log([
        ("u", "a", 0, "purchase"), ("v", "b", 20, "view"), ("v", "d", 30, "view"), ("w", "c", 50, "purchase"),
        # day 60 (scored): u's basket {a, b, c, d, e}; new = first seen in [day 30, day 60) = {c (10 d), d (30 d)};
        # a (60 d) and b (40 d) are old, e was never seen before the basket. x is cold: no `new` for x.
        ("u", "a", 60, "purchase"), ("u", "b", 60, "purchase"), ("u", "c", 60, "purchase"),
        ("u", "d", 60, "purchase"), ("u", "e", 60, "purchase"), ("x", "c", 60, "purchase"),
        # day 61: u buys {a}: no new item, skipped. day 85: u buys {c}: c is 35 days old by then, skipped.
        ("u", "a", 61, "purchase"), ("u", "c", 85, "purchase"),
    ])
    assert NEW_ITEM_DAYS == 30.0 and "new" in SLICES
    res = evaluate(log, 60 * DAY, [FixedScores(log.n_items)])["fixed"].as_dict()
    # day 60 ranking over the seen items {a, b, c, d} (e unseen, masked): b, a, d, c -> new items at ranks 3, 4
    assert res["new"]["baskets"] == 1
    assert res["new"]["recall@10"] == 1.0
    assert res["new"]["ndcg@10"] == pytest.approx((1 / np.log2(4) + 1 / np.log2(5)) / (1 + 1 / np.log2(3)))
    # the same ranking scores `all` against the whole basket (e counts, unranked): 4 of 5
    assert res["all"]["baskets"] == 4 and res["warm"]["baskets"] == 3


def test_new_items_of_a_cold_shopper_are_not_scored() -> None:
    log = _log([("v", "b", 50, "view"), ("x", "b", 60, "purchase")])
    res = evaluate(log, 60 * DAY, [FixedScores(log.n_items)])["fixed"].as_dict()
    assert res["all"]["baskets"] == 1 and res["new"]["baskets"] == 0
