"""Train-pair rules: kinds, baskets, query context, late events, titles."""

from __future__ import annotations

from freshrec.contracts import Event
from ranking.pairs import PairDraft, PairRules, pair_for
from ranking.user_state import StateRules, UserState, apply_event

T0 = 1_300_000_000.0
RULES = PairRules(context_size=3, min_history=1, query_window_s=600)


def ev(eid: str, item: str | None, kind: str, ts: float, query: str | None = None) -> Event:
    return Event(event_id=eid, user_id="u1", item_id=item, kind=kind, ts=ts, query=query)


def run(events: list[Event]) -> list[PairDraft | None]:
    s = UserState("u1")
    out = []
    for e in events:
        apply_event(s, e, StateRules())
        out.append(pair_for(s, e, RULES))
    return out


def test_first_event_has_no_context_and_views_make_no_pairs() -> None:
    assert run([ev("e1", "a", "click", T0), ev("e2", "b", "view", T0 + 1)]) == [None, None]


def test_context_is_recent_distinct_items_most_recent_first_without_target() -> None:
    pairs = run([ev(f"e{i}", it, "click", T0 + i) for i, it in enumerate("abcab")] + [ev("p", "d", "purchase", T0 + 9)])
    last = pairs[-1]
    assert last is not None
    assert last.context_items == ("b", "a", "c") and last.target_item == "d" and last.weight == 1.0
    # Repeat of an item in context: the target itself is left out.
    assert pairs[3] is not None and pairs[3].context_items == ("c", "b")


def test_basket_lines_are_not_each_others_context() -> None:
    pairs = run([ev("e0", "old", "click", T0)] + [ev(f"b{i}", it, "purchase", T0 + 60) for i, it in enumerate("xyz")])
    assert [p.context_items for p in pairs[1:] if p] == [("old",), ("old",), ("old",)]


def test_basket_without_history_makes_no_pairs() -> None:
    assert run([ev(f"b{i}", it, "purchase", T0) for i, it in enumerate("xyz")]) == [None, None, None]


def test_recent_search_is_the_context() -> None:
    pairs = run([ev("e0", "old", "click", T0), ev("s", None, "search", T0 + 10, "red mug"), ev("c", "m", "click", T0 + 20)])
    assert pairs[2] is not None and pairs[2].query == "red mug" and pairs[2].context_items == ()
    assert pairs[2].complete({}, {}).context_text == "red mug"


def test_stale_or_superseded_search_is_not_the_context() -> None:
    stale = run([ev("e0", "old", "click", T0), ev("s", None, "search", T0 + 10, "q"), ev("c", "m", "click", T0 + 10_000)])
    assert stale[2] is not None and stale[2].query is None
    superseded = run([ev("s", None, "search", T0, "q"), ev("c1", "a", "click", T0 + 5), ev("c2", "b", "click", T0 + 9)])
    assert superseded[1] is not None and superseded[1].query == "q"
    assert superseded[2] is not None and superseded[2].query is None and superseded[2].context_items == ("a",)


def test_late_event_gets_the_context_of_its_own_time() -> None:
    pairs = run([ev("e1", "a", "click", T0), ev("e2", "b", "click", T0 + 100), ev("late", "c", "cart", T0 + 50)])
    assert pairs[2] is not None and pairs[2].context_items == ("a",) and pairs[2].weight == 0.75


def test_complete_uses_titles_and_falls_back_to_ids() -> None:
    draft = PairDraft("e9", "u1", ("a", "b"), None, "t", 0.5, T0)
    pair = draft.complete({"a": "Mug", "t": "Teapot"}, {"t": "Teapot | Kitchen"})
    assert pair.context_text == "Mug; b" and pair.target_text == "Teapot | Kitchen"
    assert pair.pair_id == "e9" and pair.context_items == ["a", "b"]
