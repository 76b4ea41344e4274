"""serving.reasons: why each recommended item is there, from the ranker's sources or the blend's terms."""

from __future__ import annotations

import doctest

import numpy as np

import serving.reasons as reasons_module
from ranking.features import ANN, COPURCHASE, NEIGHBOURS, NEW, OWN, POPULAR, ShopperView
from ranking.scoring import IDENTITY_SCALE
from ranking.user_state import Interaction, UserState
from serving.reasons import (
    BOUGHT_BEFORE,
    BOUGHT_TOGETHER,
    LOOKED_AT,
    NEW_ARRIVAL,
    POPULAR_NOW,
    SHOPPERS_LIKE_YOU,
    SIMILAR,
    blend_reasons,
    copurchase_anchors,
    explain_blend,
    explain_ranked,
    ranked_flags,
    ranker_reasons,
    sources_from_view,
)


def test_docstring_examples_run() -> None:
    assert doctest.testmod(reasons_module).failed == 0


def test_each_source_flag_has_its_reason_in_a_fixed_order() -> None:
    every = OWN | COPURCHASE | NEIGHBOURS | ANN | POPULAR | NEW
    assert ranker_reasons(every, bought=True) == [
        BOUGHT_BEFORE, BOUGHT_TOGETHER, SHOPPERS_LIKE_YOU, SIMILAR, POPULAR_NOW, NEW_ARRIVAL,
    ]
    assert ranker_reasons(OWN) == [LOOKED_AT]
    assert ranker_reasons(0) == []


def test_copurchase_names_the_item_when_known_and_stays_generic_otherwise() -> None:
    assert ranker_reasons(COPURCHASE, anchor="RED MUG") == ["bought together with RED MUG"]
    assert ranker_reasons(COPURCHASE, anchor=None) == [BOUGHT_TOGETHER]
    long = "X" * 200
    (text,) = ranker_reasons(COPURCHASE, anchor=long)
    assert len(text) < 90 and text.endswith("…")


def test_anchor_is_the_row_that_holds_the_item_most_strongly() -> None:
    rows = {
        "mug": {"mug": 10.0, "saucer": 2.0, "spoon": 1.0},
        "plate": {"plate": 2.0, "saucer": 2.0},  # smaller denominator: higher confidence for saucer
    }
    got = copurchase_anchors(["saucer", "spoon", "fork", "mug"], rows, shrink=1.0)
    assert got == {"saucer": "plate", "spoon": "mug"}  # an item is never its own anchor; fork is in no row


def test_anchor_lookup_equals_the_rule_over_whole_confidence_rows() -> None:
    """The anchors looked up for the answer's items only equal the rule applied to every
    row's whole confidence dict (ties on confidence go to the first anchor in id order)."""
    from ranking.collab import confidence

    rng = np.random.default_rng(11)
    names = [f"i{k}" for k in range(40)]
    for _ in range(30):
        rows = {}
        for anchor in rng.choice(names, size=int(rng.integers(0, 12)), replace=False).tolist():
            others = rng.choice(names, size=int(rng.integers(0, 20)), replace=False).tolist()
            rows[anchor] = {o: float(rng.choice([1.0, 2.0, rng.uniform(0.0, 5.0)])) for o in others}
        items = rng.choice(names, size=10, replace=False).tolist()
        want: dict[str, tuple[float, str]] = {}
        for anchor in sorted(rows):
            for other, c in confidence(rows[anchor], anchor, 10.0).items():
                if other in items and other != anchor and c > want.get(other, (0.0, ""))[0]:
                    want[other] = (c, anchor)
        assert copurchase_anchors(items, rows, 10.0) == {i: a for i, (_, a) in want.items()}


def test_blend_reasons_name_the_terms_that_lifted_the_item() -> None:
    assert blend_reasons(repeat=0.4, similarity=0.9, popular=True, new=True) == [
        BOUGHT_BEFORE, SIMILAR, POPULAR_NOW, NEW_ARRIVAL,
    ]
    assert blend_reasons(repeat=0.0, similarity=0.2, popular=True, new=False) == [POPULAR_NOW]
    # weak signals only: still one reason, the one that exists
    assert blend_reasons(repeat=0.0, similarity=0.2, popular=False, new=False) == [SIMILAR]
    assert blend_reasons(repeat=0.0, similarity=None, popular=False, new=False) == [POPULAR_NOW]


def test_sources_rebuilt_from_the_view_when_the_answer_lacks_them() -> None:
    flags = sources_from_view(
        ["own", "co", "nb", "pop", "fresh", "other"],
        own=["own"], copurchase={"own": {"own": 3.0, "co": 1.0}}, neighbour_items=["nb"],
        popular_top=["pop"], new_items=["fresh"],
    )
    assert flags == [OWN, COPURCHASE, NEIGHBOURS, POPULAR, NEW, ANN]


def _state() -> UserState:
    return UserState(
        "u1",
        history=[Interaction("mug", "purchase", 100.0), Interaction("lamp", "click", 90.0)],
        last_ts=100.0,
        baskets=[100.0],
        basket_bits={"mug": 1},
    )


def test_explain_ranked_uses_the_answers_flags_and_names_the_anchor_by_title() -> None:
    state = _state()
    view = ShopperView(state, copurchase={"mug": {"mug": 5.0, "saucer": 3.0}})
    got = explain_ranked(
        ["mug", "saucer", "lamp"], state, view, sources=[OWN | POPULAR, COPURCHASE, OWN],
        popular_top=[], new_items=[], titles={"mug": "RED MUG"},
    )
    assert got == [[BOUGHT_BEFORE, POPULAR_NOW], ["bought together with RED MUG"], [LOOKED_AT]]


def test_explain_ranked_without_flags_rebuilds_them_from_the_view() -> None:
    state = _state()
    neighbour = UserState("u2", basket_bits={"teapot": 1}, baskets=[50.0])
    view = ShopperView(state, copurchase={"mug": {"mug": 5.0, "saucer": 3.0}}, neighbours=[(0.9, neighbour)])
    got = explain_ranked(
        ["saucer", "teapot", "vase"], state, view, sources=None, popular_top=["vase"], new_items=[], titles={},
    )
    assert got == [["bought together with mug"], [SHOPPERS_LIKE_YOU], [POPULAR_NOW]]
    # no view at all (the ranker path failed before gathering): generic but still an answer
    assert explain_ranked(["mug"], state, None, sources=None, popular_top=[], new_items=[], titles={}) == [[BOUGHT_BEFORE]]


def test_explain_blend_rebuilds_similarity_from_the_pairs_vectors() -> None:
    state = _state()
    e = np.eye(3, dtype=np.float32)
    vectors = {"mug": e[0], "lamp": e[0], "near": e[0], "far": e[2]}
    got = explain_blend(
        ["mug", "near", "far", "fresh"], state, vectors=vectors, half_life_s=86_400.0, scale=IDENTITY_SCALE,
        basket_decay=0.9, popular_top=["far"], new_items=["fresh"],
    )
    assert got == [[BOUGHT_BEFORE, SIMILAR], [SIMILAR], [POPULAR_NOW], [NEW_ARRIVAL]]


def test_flags_of_the_ranked_items_come_from_the_scored_candidates() -> None:
    from ranking.features import Candidates

    scored = Candidates(["a", "b", "c"], np.array([OWN, COPURCHASE | POPULAR, ANN], dtype=np.uint8))
    assert ranked_flags(["c", "b"], scored) == [ANN, COPURCHASE | POPULAR]
    assert ranked_flags(["c"], None) is None


def test_neighbours_given_as_summaries_still_explain() -> None:
    # serving may hand neighbours over as ranking.collab.NeighbourSummary (purchases, no basket_bits)
    from types import SimpleNamespace

    state = _state()
    summary = SimpleNamespace(user_id="u2", purchases=(("teapot", 50.0),))
    view = ShopperView(state, neighbours=[(0.9, summary)])  # type: ignore[list-item]
    got = explain_ranked(["teapot"], state, view, sources=None, popular_top=[], new_items=[], titles={})
    assert got == [[SHOPPERS_LIKE_YOU]]
