"""The user-state rules as pure functions: history order, baskets, late events, cancel,
duplicates, decay, popularity, and the wire format."""

from __future__ import annotations

import random

import pytest

from freshrec.contracts import Event
from ranking.user_state import (
    DAY_S,
    FREQ_EPSILON,
    Interaction,
    Popularity,
    StateRules,
    UserState,
    apply_event,
    decayed_add,
    popularity_weight,
    replay_events,
)

RULES = StateRules(history_size=5, repeat_half_life_s=10 * DAY_S, dedupe_ids=8, max_freq_items=50)
T0 = 1_300_000_000.0


def ev(eid: str, item: str | None, kind: str = "purchase", ts: float = T0, user: str = "u1", query: str | None = None) -> Event:
    return Event(event_id=eid, user_id=user, item_id=item, kind=kind, ts=ts, query=query)


def test_history_is_most_recent_first_and_bounded() -> None:
    s = UserState("u1")
    for i in range(8):
        assert apply_event(s, ev(f"e{i}", f"i{i}", "click", T0 + i), RULES)
    assert [h.item_id for h in s.history] == ["i7", "i6", "i5", "i4", "i3"]
    assert s.events == 8 and s.last_ts == T0 + 7 and s.last_event_id == "e7"


def test_basket_lines_keep_arrival_order_and_are_not_each_others_context() -> None:
    s = UserState("u1")
    apply_event(s, ev("e0", "old", "purchase", T0 - 100), RULES)
    for i, item in enumerate(["a", "b", "c"]):
        apply_event(s, ev(f"b{i}", item, "purchase", T0), RULES)
    assert [h.item_id for h in s.history] == ["c", "b", "a", "old"]
    # Context of any basket line: only what came strictly before the basket.
    assert s.recent_items(before_ts=T0) == ["old"]


def test_late_event_is_inserted_at_its_event_time() -> None:
    s = UserState("u1")
    apply_event(s, ev("e1", "a", "click", T0 + 10), RULES)
    apply_event(s, ev("e2", "b", "click", T0 + 30), RULES)
    apply_event(s, ev("e3", "late", "click", T0 + 20), RULES)
    assert [h.item_id for h in s.history] == ["b", "late", "a"]
    assert s.last_ts == T0 + 30 and s.last_event_id == "e3"


def test_late_event_older_than_a_full_history_is_dropped_from_history_but_counted() -> None:
    s = UserState("u1")
    for i in range(5):
        apply_event(s, ev(f"e{i}", f"i{i}", "click", T0 + 100 + i), RULES)
    apply_event(s, ev("late", "x", "purchase", T0), RULES)
    assert "x" not in [h.item_id for h in s.history]
    assert s.freq["x"] == pytest.approx(1.0)
    assert s.events == 6


def test_freq_does_not_depend_on_arrival_order() -> None:
    events = [ev(f"e{i}", random.Random(i).choice("abc"), "purchase", T0 + 3600 * i * 7) for i in range(12)]
    forward = replay_events(events, RULES)["u1"]
    shuffled = events[:]
    random.Random(3).shuffle(shuffled)
    backward = replay_events(shuffled, RULES)["u1"]
    assert forward.freq_ts == backward.freq_ts
    assert forward.freq.keys() == backward.freq.keys()
    for k in forward.freq:
        assert forward.freq[k] == pytest.approx(backward.freq[k], rel=1e-9)


def test_freq_decays_with_the_half_life() -> None:
    s = UserState("u1")
    apply_event(s, ev("e1", "a", "purchase", T0), RULES)
    apply_event(s, ev("e2", "b", "purchase", T0 + 10 * DAY_S), RULES)
    assert s.freq["a"] == pytest.approx(0.5)
    assert s.freq["b"] == pytest.approx(1.0) and s.freq_ts == T0 + 10 * DAY_S


def test_cancel_undoes_a_purchase() -> None:
    s = UserState("u1")
    apply_event(s, ev("e1", "a", "purchase", T0), RULES)
    apply_event(s, ev("e2", "a", "purchase", T0), RULES)
    apply_event(s, ev("e3", "a", "cancel", T0), RULES)
    assert s.freq["a"] == pytest.approx(1.0)
    apply_event(s, ev("e4", "a", "cancel", T0), RULES)
    assert "a" not in s.freq
    # The cancel is still an interaction of the history, with its own kind.
    assert [h.kind for h in s.history[:2]] == ["cancel", "cancel"]
    # A cancel of something never bought changes no count and never goes negative.
    apply_event(s, ev("e5", "zzz", "cancel", T0), RULES)
    assert "zzz" not in s.freq and all(v >= FREQ_EPSILON for v in s.freq.values())


def test_cancel_is_excluded_from_context_items() -> None:
    s = UserState("u1")
    apply_event(s, ev("e1", "a", "purchase", T0), RULES)
    apply_event(s, ev("e2", "b", "cancel", T0 + 1), RULES)
    assert s.recent_items() == ["a"]


def test_duplicate_event_id_is_ignored() -> None:
    s = UserState("u1")
    assert apply_event(s, ev("e1", "a", "purchase", T0), RULES)
    assert not apply_event(s, ev("e1", "a", "purchase", T0), RULES)
    assert s.events == 1 and len(s.history) == 1 and s.freq["a"] == pytest.approx(1.0)
    assert len(s.recent_ids) == 1


def test_dedupe_window_is_bounded() -> None:
    s = UserState("u1")
    for i in range(20):
        apply_event(s, ev(f"e{i}", "a", "view", T0 + i), RULES)
    assert s.recent_ids == [f"e{i}" for i in range(12, 20)]


def test_search_keeps_latest_query_not_history() -> None:
    s = UserState("u1")
    apply_event(s, ev("e1", None, "search", T0, query="red mug"), RULES)
    apply_event(s, ev("e2", None, "search", T0 - 5, query="older"), RULES)
    assert s.query == "red mug" and s.query_ts == T0 and s.history == []
    assert s.events == 2


def test_event_of_another_user_is_refused() -> None:
    with pytest.raises(ValueError, match="not 'u1'"):
        apply_event(UserState("u1"), ev("e1", "a", user="u2"), RULES)


def test_max_freq_items_drops_the_weakest() -> None:
    rules = StateRules(history_size=5, repeat_half_life_s=DAY_S, dedupe_ids=0, max_freq_items=3)
    s = UserState("u1")
    for i, item in enumerate("abcd"):
        apply_event(s, ev(f"e{i}", item, "purchase", T0 + i * 3600), rules)
    assert set(s.freq) == {"b", "c", "d"}


def test_wire_format_round_trips() -> None:
    s = UserState("u1")
    apply_event(s, ev("e1", "a", "purchase", T0), RULES)
    apply_event(s, ev("e0", "b", "purchase", T0 - DAY_S), RULES)
    apply_event(s, ev("e2", None, "search", T0 + 1, query="lamp"), RULES)
    back = UserState.from_bytes(s.to_bytes())
    assert back == s
    assert back.history == [Interaction("a", "purchase", T0), Interaction("b", "purchase", T0 - DAY_S)]
    assert back.baskets == [T0, T0 - DAY_S] and back.basket_bits == {"a": 1, "b": 2}


def test_a_version_1_state_is_refused_not_misread() -> None:
    raw = UserState("u1").to_dict() | {"v": 1}
    with pytest.raises(ValueError, match="v1 is not readable"):
        UserState.from_dict(raw)


# -- baskets: the repeat signal ------------------------------------------------------------

BASKET_RULES = StateRules(history_size=5, repeat_half_life_s=10 * DAY_S, dedupe_ids=0, max_freq_items=50, baskets_kept=4)


def _buy(s: UserState, baskets: list[tuple[float, str]], rules: StateRules = BASKET_RULES) -> None:
    for n, (ts, item) in enumerate(baskets):
        apply_event(s, ev(f"p{n}-{ts}-{item}", item, "purchase", ts), rules)


def test_basket_scores_count_baskets_weighted_by_how_many_came_since() -> None:
    s = UserState("u1")
    # basket 1: a, b, and a second line of a; basket 2 (a day later): a, c
    _buy(s, [(T0, "a"), (T0, "b"), (T0, "a"), (T0 + DAY_S, "a"), (T0 + DAY_S, "c")])
    assert s.baskets == [T0 + DAY_S, T0]
    assert s.basket_scores(0.5) == {"a": pytest.approx(1.5), "b": pytest.approx(0.5), "c": pytest.approx(1.0)}
    # The time between baskets does not matter, only their order.
    far = UserState("u1")
    _buy(far, [(T0, "a"), (T0, "b"), (T0 + 300 * DAY_S, "a"), (T0 + 300 * DAY_S, "c")])
    assert far.basket_scores(0.5) == s.basket_scores(0.5)


def test_baskets_do_not_depend_on_arrival_order_or_duplicate_lines() -> None:
    rng = random.Random(5)
    lines = [(T0 + DAY_S * rng.randrange(6), rng.choice("abcdefg")) for _ in range(40)]
    in_order = UserState("u1")
    _buy(in_order, sorted(lines))
    for seed in range(5):
        shuffled = lines + lines[:7]  # some lines twice
        random.Random(seed).shuffle(shuffled)
        other = UserState("u1")
        _buy(other, shuffled)
        assert other.baskets == in_order.baskets
        assert other.basket_bits == in_order.basket_bits


def test_only_the_newest_baskets_are_kept() -> None:
    s = UserState("u1")
    _buy(s, [(T0, "old"), (T0 + 1, "a"), (T0 + 2, "b"), (T0 + 3, "c"), (T0 + 4, "d")])
    assert s.baskets == [T0 + 4, T0 + 3, T0 + 2, T0 + 1]  # baskets_kept = 4
    assert "old" not in s.basket_bits  # its only basket fell out
    _buy(s, [(T0 - 10, "older")])  # older than every kept basket: not kept
    assert "older" not in s.basket_bits and len(s.baskets) == 4
    _buy(s, [(T0 + 1.5, "late")])  # a late basket between kept ones is placed by its time
    assert s.baskets == [T0 + 4, T0 + 3, T0 + 2, T0 + 1.5]
    assert s.basket_bits == {"d": 1, "c": 2, "b": 4, "late": 8}


def test_a_cancel_leaves_the_basket_as_it_was() -> None:
    s = UserState("u1")
    _buy(s, [(T0, "a")])
    apply_event(s, ev("c1", "a", "cancel", T0 + 60), BASKET_RULES)
    assert "a" not in s.freq  # the purchase is undone for the cancel rule and popularity
    assert s.basket_bits == {"a": 1}  # but the item was in the shopper's basket


def test_basket_items_are_capped_weakest_first() -> None:
    rules = StateRules(history_size=5, repeat_half_life_s=DAY_S, dedupe_ids=0, max_freq_items=3, baskets_kept=8)
    s = UserState("u1")
    _buy(s, [(T0, "a"), (T0 + 1, "a"), (T0 + 1, "b"), (T0 + 2, "c"), (T0 + 3, "d")], rules)
    # a is in two baskets; b, c, d in one each: b is the least recent of those
    assert set(s.basket_bits) == {"a", "c", "d"}


def test_baskets_kept_is_bounded_by_the_bits_of_an_int() -> None:
    with pytest.raises(ValueError, match="baskets_kept"):
        StateRules(baskets_kept=64)


def test_unknown_format_version_is_refused_with_advice() -> None:
    raw = UserState("u1").to_dict() | {"v": 99}
    with pytest.raises(ValueError, match="fresh redis_prefix"):
        UserState.from_dict(raw)


def test_decayed_add_is_order_free() -> None:
    h = 5.0
    a = decayed_add(*decayed_add(0.0, 0.0, 1.0, 10.0, h), 1.0, 3.0, h)
    b = decayed_add(*decayed_add(0.0, 0.0, 1.0, 3.0, h), 1.0, 10.0, h)
    assert a[1] == b[1] == 10.0 and a[0] == pytest.approx(b[0])


def test_popularity_merge_equals_one_counter() -> None:
    h = 2 * DAY_S
    whole = Popularity(h)
    parts = [Popularity(h), Popularity(h)]
    rng = random.Random(0)
    for i in range(200):
        item, ts = rng.choice("abcde"), T0 + rng.random() * 10 * DAY_S
        whole.add(item, 1.0, ts)
        parts[i % 2].add(item, 1.0, ts)
    merged = Popularity.merge([p.entries for p in parts], h, newest_ts=max(p.newest_ts for p in parts))
    assert merged.newest_ts == whole.newest_ts
    expect = whole.scores()
    got = merged.scores()
    for item in expect:
        assert got[item] == pytest.approx(expect[item], rel=1e-6, abs=1e-6)


def test_popularity_is_linear_and_floored_only_when_read() -> None:
    p = Popularity(DAY_S)
    p.add("a", -1.0, T0)
    assert p.scores()["a"] == 0.0 and p.newest_ts == T0
    p.add("a", 1.0, T0)
    p.add("a", 1.0, T0 + DAY_S)
    assert p.scores()["a"] == pytest.approx(1.0)
    p.observe(T0 + 2 * DAY_S)
    assert p.scores()["a"] == pytest.approx(0.5)


def test_popularity_weight_counts_a_cancel_only_if_it_undoes_the_users_purchase() -> None:
    s = UserState("u1")
    assert popularity_weight(s, ev("c0", "a", "cancel")) == 0.0
    apply_event(s, ev("p1", "a", "purchase"), RULES)
    assert popularity_weight(s, ev("p2", "a", "purchase")) == 1.0
    assert popularity_weight(s, ev("c1", "a", "cancel")) == -1.0
    assert popularity_weight(s, ev("v1", "a", "view")) == 0.0


def test_first_seen_is_the_earliest_event_whatever_the_order() -> None:
    p = Popularity(DAY_S)
    assert p.see("a", T0 + 10)
    assert not p.see("a", T0 + 20)  # later sighting: unchanged, nothing to write
    assert p.see("a", T0 + 5)  # a late event lowers it
    p.add("b", 1.0, T0 + 7)  # a purchase is a sighting too
    assert p.first_seen == {"a": T0 + 5, "b": T0 + 7}


def test_first_seen_merge_of_partitions_equals_one_counter() -> None:
    whole = Popularity(DAY_S)
    parts = [Popularity(DAY_S), Popularity(DAY_S), Popularity(DAY_S)]
    rng = random.Random(1)
    for i in range(300):
        item, ts = rng.choice("abcdefg"), T0 + rng.random() * 10 * DAY_S
        whole.see(item, ts)
        parts[i % 3].see(item, ts)
    merged = Popularity.merge([p.entries for p in parts], DAY_S, first_seen_parts=[p.first_seen for p in parts])
    assert merged.first_seen == whole.first_seen


def test_popularity_scores_are_bit_identical_to_the_decay_formula() -> None:
    """scores() inlines max(value, 0) * decay_factor(max(now - as_of, 0), h) for speed; every
    path (stream, evaluation, serving) relies on it giving exactly those floats."""
    import math
    import random

    from ranking.user_state import Popularity, decay_factor

    rng = random.Random(5)
    p = Popularity(7 * 86_400.0)
    for i in range(5_000):
        p.entries[f"i{i}"] = (rng.choice([-0.0, 0.0, -1.0, rng.uniform(-2, 60)]), 1.3e9 + rng.uniform(0, 9e6))
    for now in (1.3e9 + 4e6, 1.3e9 + 9.5e6):  # some entries in the future of `now`, some in its past
        got = p.scores(now)
        want = {i: max(v, 0.0) * decay_factor(max(now - t, 0.0), p.half_life_s) for i, (v, t) in p.entries.items()}
        assert list(got) == list(want)
        assert all(got[i] == want[i] and math.copysign(1.0, got[i]) == math.copysign(1.0, want[i]) for i in want)
