"""The ranker model: both families learn, are deterministic, round-trip, continue from a parent, and refuse mismatches."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from models.ranker import (
    LightGBMRanker,
    MLPRanker,
    RankerFailed,
    RankerMismatch,
    RankerParams,
    fit_ranker,
    ranker_from_bytes,
)

NAMES = tuple(f"f{k}" for k in range(17))
SCHEMA = "test-schema-1"
PARAMS = {
    "lightgbm": RankerParams(family="lightgbm", trees=20, new_trees=5, max_trees=30, min_child_samples=5),
    "mlp": RankerParams(family="mlp", hidden=(16, 8), first_epochs=5, epochs=5, mlp_lr=1e-2, groups_per_batch=8, device="cpu"),
}


def _examples(n_groups: int, size: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Baskets whose bought items have a high f0 + f1 (plus noise): learnable, not trivially."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_groups * size, len(NAMES))).astype(np.float32)
    y = np.zeros(len(x), dtype=np.int64)
    for g in range(n_groups):
        rows = slice(g * size, (g + 1) * size)
        utility = x[rows, 0] + x[rows, 1] + 0.5 * rng.standard_normal(size)
        y[rows][np.argsort(-utility)[:2]] = 1
    return x, y, [size] * n_groups


def _recall_at_10(scores: np.ndarray, y: np.ndarray, groups: list[int]) -> float:
    hits, at = [], 0
    for size in groups:
        s, lab = scores[at:at + size], y[at:at + size]
        hits.append(lab[np.argsort(-s, kind="stable")[:10]].sum() / lab.sum())
        at += size
    return float(np.mean(hits))


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[np.ndarray, np.ndarray, list[int]]]:
    return {"train": _examples(60), "test": _examples(30, seed=1)}


@pytest.mark.parametrize("family", ["lightgbm", "mlp"])
def test_each_family_learns_the_signal(family: str, data: dict) -> None:
    model = fit_ranker(*data["train"], seed=7, feature_names=NAMES, feature_schema=SCHEMA, params=PARAMS[family])
    x, y, groups = data["test"]
    scores = model.score(x, schema=SCHEMA)
    assert scores.dtype == np.float64 and scores.shape == (len(x),)
    # Random order finds 10/40 of a basket; the signal puts nearly all of it in the top 10.
    assert _recall_at_10(scores, y, groups) > 0.8
    assert model.feature_names == NAMES and model.feature_schema == SCHEMA and model.family == family


@pytest.mark.parametrize("family", ["lightgbm", "mlp"])
def test_same_seed_same_bytes_and_bytes_round_trip(family: str, data: dict) -> None:
    a = fit_ranker(*data["train"], seed=3, feature_names=NAMES, feature_schema=SCHEMA, params=PARAMS[family])
    b = fit_ranker(*data["train"], seed=3, feature_names=NAMES, feature_schema=SCHEMA, params=PARAMS[family])
    assert a.to_bytes() == b.to_bytes()
    loaded = ranker_from_bytes(family, a.to_bytes(), NAMES, SCHEMA)
    x = data["test"][0]
    np.testing.assert_array_equal(loaded.score(x, schema=SCHEMA), a.score(x, schema=SCHEMA))
    if family == "mlp":
        other = fit_ranker(*data["train"], seed=4, feature_names=NAMES, feature_schema=SCHEMA, params=PARAMS[family])
        assert other.to_bytes() != a.to_bytes()  # the seed matters (initial weights, batch order)


def test_lightgbm_continue_adds_trees_then_refits_past_the_cap(data: dict) -> None:
    params = replace(PARAMS["lightgbm"], mode="continue")
    first = fit_ranker(*data["train"], seed=7, feature_names=NAMES, feature_schema=SCHEMA, params=params)
    assert isinstance(first, LightGBMRanker) and first.size == 20
    x_new, y_new, g_new = _examples(40, seed=5)
    second = fit_ranker(x_new, y_new, g_new, seed=7, feature_names=NAMES, feature_schema=SCHEMA, params=params, parent=first)
    assert second.size == 25
    # The first 20 trees are the parent's: the continued model string starts with them.
    assert first.booster.dump_model()["tree_info"][:20] == second.booster.dump_model()["tree_info"][:20]
    third = fit_ranker(x_new, y_new, g_new, seed=7, feature_names=NAMES, feature_schema=SCHEMA, params=params, parent=second)
    assert third.size == 30
    fourth = fit_ranker(x_new, y_new, g_new, seed=7, feature_names=NAMES, feature_schema=SCHEMA, params=params, parent=third)
    assert fourth.size == 20  # 35 would pass max_trees: refitted on this window
    refit = fit_ranker(x_new, y_new, g_new, seed=7, feature_names=NAMES, feature_schema=SCHEMA,
                       params=PARAMS["lightgbm"], parent=third)
    assert refit.size == 20 and refit.to_bytes() == fourth.to_bytes()


def test_mlp_continues_from_the_parents_weights(data: dict) -> None:
    parent = fit_ranker(*data["train"], seed=7, feature_names=NAMES, feature_schema=SCHEMA, params=PARAMS["mlp"])
    assert isinstance(parent, MLPRanker)
    frozen = fit_ranker(*data["train"], seed=9, feature_names=NAMES, feature_schema=SCHEMA,
                        params=replace(PARAMS["mlp"], mlp_lr=0.0), parent=parent)
    assert frozen.to_bytes() == parent.to_bytes()  # lr 0: nothing moves from the parent's weights
    moved = fit_ranker(*data["train"], seed=9, feature_names=NAMES, feature_schema=SCHEMA, params=PARAMS["mlp"], parent=parent)
    assert isinstance(moved, MLPRanker)
    np.testing.assert_array_equal(moved.arrays["mean"], parent.arrays["mean"])  # standardisation kept
    assert not np.array_equal(moved.arrays["w0"], parent.arrays["w0"])


@pytest.mark.parametrize("family", ["lightgbm", "mlp"])
def test_mismatched_features_are_refused(family: str, data: dict) -> None:
    model = fit_ranker(*data["train"], seed=7, feature_names=NAMES, feature_schema=SCHEMA, params=PARAMS[family])
    x = data["test"][0]
    with pytest.raises(RankerMismatch, match="17 feature columns"):
        model.score(x[:, :16], schema=SCHEMA)
    with pytest.raises(RankerMismatch, match="schema"):
        model.score(x, schema="f1-other")
    with pytest.raises(RankerMismatch):
        ranker_from_bytes(family, model.to_bytes(), NAMES[:-1] + ("renamed",), SCHEMA)
    with pytest.raises(RankerMismatch, match="cannot continue"):
        fit_ranker(*data["train"], seed=7, feature_names=NAMES, feature_schema="f1-other", params=PARAMS[family], parent=model)
    assert model.score(x[:0], schema=SCHEMA).shape == (0,)


def test_garbage_bytes_and_bad_examples_raise(data: dict) -> None:
    for family in ("lightgbm", "mlp"):
        with pytest.raises(ValueError):
            ranker_from_bytes(family, b"not a model", NAMES, SCHEMA)
    with pytest.raises(ValueError, match="unknown ranker family"):
        ranker_from_bytes("xgboost", b"", NAMES, SCHEMA)
    x, y, g = data["train"]
    with pytest.raises(ValueError, match="groups"):
        fit_ranker(x, y, g[:-1], seed=7, feature_names=NAMES, feature_schema=SCHEMA, params=PARAMS["mlp"])
    with pytest.raises(ValueError, match="nothing to learn"):
        fit_ranker(x, np.zeros_like(y), g, seed=7, feature_names=NAMES, feature_schema=SCHEMA, params=PARAMS["mlp"])


def test_non_finite_scores_raise(data: dict) -> None:
    model = fit_ranker(*data["train"], seed=7, feature_names=NAMES, feature_schema=SCHEMA, params=PARAMS["mlp"])
    assert isinstance(model, MLPRanker)
    arrays = dict(model.arrays, b2=np.array(np.nan, dtype=np.float32))  # the output bias
    with pytest.raises(RankerFailed, match="non-finite"):
        MLPRanker(arrays, NAMES, SCHEMA).score(data["test"][0], schema=SCHEMA)


def test_scoring_an_mlp_needs_no_torch(data: dict) -> None:
    model = fit_ranker(*data["train"], seed=7, feature_names=NAMES, feature_schema=SCHEMA, params=PARAMS["mlp"])
    code = (
        "import sys, numpy as np\n"
        "from models.ranker import ranker_from_bytes\n"
        f"m = ranker_from_bytes('mlp', sys.stdin.buffer.read(), {NAMES!r}, {SCHEMA!r})\n"
        f"m.score(np.zeros((3, {len(NAMES)}), np.float32), schema={SCHEMA!r})\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], input=model.to_bytes(), capture_output=True, check=True)
    assert out.stdout.strip() == b"False"


@pytest.mark.parametrize("family", ["mlp", "lightgbm"])
def test_default_sizes_score_300_candidates(family: str) -> None:
    """300 rows x 17 features at the default sizes (200 trees of 15 leaves; 64-32 hidden units)
    score to 300 finite values. How fast is a benchmark's question, not a test's:
    ``bench.ranker_cost`` prints the p50 per tree count beside the blend (docs/ranker_cost.md)."""
    x, y, g = _examples(50, size=300, seed=2)
    params = RankerParams(family=family, min_child_samples=20, first_epochs=1)  # type: ignore[arg-type]
    model = fit_ranker(x, y, g, seed=7, feature_names=NAMES, feature_schema=SCHEMA, params=params)
    assert model.size == (200 if family == "lightgbm" else 96)
    scores = model.score(x[:300], schema=SCHEMA)
    assert scores.shape == (300,) and np.isfinite(scores).all()


def test_params_from_settings_map_the_family_choice() -> None:
    from freshrec.settings import Settings

    for choice, family, mode in [("lgbm", "lightgbm", "refit"), ("lgbm_continue", "lightgbm", "continue"), ("torch", "mlp", "refit")]:
        params = RankerParams.from_settings(Settings(ranker_family=choice, ranker_mlp_hidden="8, 4", ranker_trees=50))
        assert (params.family, params.mode, params.hidden, params.trees) == (family, mode, (8, 4), 50)
