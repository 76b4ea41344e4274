"""What the learner trains and judges is what serving uses: user-vector contexts,
popularity-shaped negatives, and the anchor to the base space."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from freshrec.contracts import TrainPair  # noqa: E402
from freshrec.settings import Settings  # noqa: E402
from learner.evaluate import ItemMatrix, context_matrix, window_metrics  # noqa: E402
from learner.trainer import LoraTrainer, _context_items, context_vectors  # noqa: E402
from ranking.pairs import PairDraft  # noqa: E402


def _pair(pid: str, items: Sequence[str] = (), texts: Sequence[str] = (), ctx: str = "", target: str = "t") -> TrainPair:
    return TrainPair(pair_id=pid, user_id=f"u{pid}", context_items=list(items), context_text=ctx or "; ".join(texts),
                     context_texts=list(texts), target_item=target, target_text=target.upper())


def test_the_flow_fills_context_texts_in_context_order() -> None:
    draft = PairDraft("e1", "u1", ("b", "a", "zz"), None, "c", 1.0, 5.0)
    pair = draft.complete({"a": "RED MUG", "b": "BLUE JAR"}, {"c": "TEA"})
    assert pair.context_texts == ["BLUE JAR", "RED MUG", "zz"]  # an id without a title stands for itself
    assert pair.context_text == "BLUE JAR; RED MUG; zz"
    query = PairDraft("e2", "u1", (), "lamp", "c", 1.0, 5.0).complete({}, {"c": "TEA"})
    assert query.context_texts == [] and query.context_text == "lamp"


def test_context_items_are_encoded_once_and_queries_as_text() -> None:
    pairs = [_pair("1", "ab", ["A", "B"]), _pair("2", "ba", ["B", "A"]), _pair("3", ctx="red lamp")]
    texts, groups = _context_items(pairs)
    assert texts == ["A", "B", "red lamp"]
    assert groups == [[0, 1], [1, 0], [2]]


def test_context_vectors_are_normalised_means() -> None:
    vecs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    out = context_vectors(vecs, [[0, 1], [2]])
    assert torch.allclose(out[0], torch.tensor([0.70710677, 0.70710677]))
    assert torch.allclose(out[1], torch.tensor([0.6, 0.8]))


class _QueryOnlyEncoder:
    """Encodes only what must be encoded as text; records what it was asked."""

    version = "test"

    def __init__(self) -> None:
        self.asked: list[str] = []

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        self.asked.extend(texts)
        return np.tile(np.array([[0.0, 1.0]], dtype=np.float32), (len(texts), 1))


def _matrix() -> ItemMatrix:
    ids = ["a", "b", "t"]
    vecs = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    return ItemMatrix("v", "fp", ids, vecs, {i: n for n, i in enumerate(ids)})


def test_window_contexts_come_from_the_versions_own_item_vectors() -> None:
    enc = _QueryOnlyEncoder()
    pairs = [_pair("1", ["a", "b", "gone"], ["A", "B", "GONE"]), _pair("2", ctx="a query"), _pair("3", ["gone"], ["GONE"])]
    out = context_matrix(enc, _matrix(), pairs)
    mean = np.array([1.6, 0.8]) / np.linalg.norm([1.6, 0.8])  # a and b; the item not in the catalog is left out
    assert np.allclose(out[0], mean, atol=1e-6)
    assert enc.asked == ["a query", "GONE"]  # the query, and the context with no item in the catalog
    # Ranked by the user vector, the target t of a query context (encoded [0, 1]) is first.
    m = window_metrics(enc, _matrix(), [pairs[1]], k=1)
    assert m["recall@1"] == 1.0


@pytest.fixture(scope="module")
def settings() -> Settings:
    torch.set_num_threads(2)
    return Settings(learner_lr=3e-3, lora_rank=4, learner_catalog_negatives=4, learner_negative_pool=16)


def _batch(n: int, offset: int = 0) -> list[TrainPair]:
    return [_pair(f"{offset + k}", [f"i{k}"], [f"ITEM {k}"], target=f"target {(offset + k) % 5}") for k in range(n)]


def test_recent_negatives_follow_recent_targets_and_fall_back_to_the_catalog(settings: Settings) -> None:
    trainer = LoraTrainer(settings, "cpu")
    trainer.set_catalog([f"CATALOG {k}" for k in range(50)])
    first = _batch(3)
    early = trainer.draw_negatives(first)
    assert all(t.startswith("CATALOG") for t in early)  # the pool holds no targets yet
    trainer.recent_targets.extend(["HOT"] * 10 + ["WARM"] * 3 + ["TARGET 0"])
    drawn = trainer.draw_negatives(first)
    assert drawn == trainer.draw_negatives(first)  # reproducible within a step
    assert len(drawn) == 4 and set(drawn) <= {"HOT", "WARM"}  # never a target of the batch
    catalog = LoraTrainer(settings.model_copy(update={"learner_negatives": "catalog"}), "cpu")
    catalog.set_catalog([f"CATALOG {k}" for k in range(50)])
    catalog.recent_targets.extend(["HOT"] * 20)
    assert all(t.startswith("CATALOG") for t in catalog.draw_negatives(first))


def _base_agreement(trainer: LoraTrainer, texts: list[str]) -> float:
    moved = trainer.encoder().encode(texts)
    with trainer.peft_model.disable_adapter():
        base = trainer.encoder().encode(texts)
    return float((moved * base).sum(axis=1).mean())


def test_the_anchor_keeps_the_space_near_the_base(settings: Settings) -> None:
    texts = [f"ITEM {k}" for k in range(6)] + [f"TARGET {k}" for k in range(5)]
    agreement = {}
    for weight in (0.0, 20.0):
        trainer = LoraTrainer(settings.model_copy(update={"learner_anchor_weight": weight, "learner_lr": 1e-2}), "cpu")
        for step in range(4):
            trainer.train_step(_batch(6, 6 * step), negatives=[])
        agreement[weight] = _base_agreement(trainer, texts)
    assert agreement[0.0] < 0.999  # training moved the space
    assert agreement[20.0] > agreement[0.0]


def test_recent_targets_survive_a_checkpoint(settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    trainer = LoraTrainer(settings, "cpu")
    trainer.train_step(_batch(4))
    assert list(trainer.recent_targets) == ["TARGET 0", "TARGET 1", "TARGET 2", "TARGET 3"]
    trainer.save_state(tmp_path / "t.pt")
    other = LoraTrainer(settings, "cpu")
    other.load_state(tmp_path / "t.pt")
    assert other.recent_targets == trainer.recent_targets


def test_target_popularity_decays_in_event_time_and_survives_json() -> None:
    import json

    from learner.checkpoint import LearnerState
    from learner.evaluate import TargetPopularity

    day = 86_400.0
    pop = TargetPopularity(7 * day)
    pop.add("a", 0.0)
    pop.add("b", 7 * day)
    pop.add("a", 3 * day)  # arrives late for nothing: order does not matter
    a = 0.5 + 2 ** (-4 / 7)  # two purchases of a, decayed to day 7; one of b on day 7
    assert pop.normalised(["a", "b", "never"]) == pytest.approx([1.0, 1.0 / a, 0.0])
    state = LearnerState(topic="t", target_popularity=pop.entries)
    back = LearnerState.from_json(state.to_json())
    assert back.target_popularity == json.loads(json.dumps(pop.entries))
    assert TargetPopularity(7 * day, back.target_popularity).normalised(["a", "b"]) == pytest.approx(pop.normalised(["a", "b"]))


def test_the_gate_ranks_by_the_blends_item_side() -> None:
    from learner.evaluate import WindowBlend
    from ranking.scoring import IDENTITY_SCALE, LogBlendWeights, SimilarityScale

    enc = _QueryOnlyEncoder()
    pairs = [_pair("1", ["a"], ["A"], target="b")]  # context a; b is nearer to a than t is
    plain = window_metrics(enc, _matrix(), pairs, k=1)
    assert plain["recall@1"] == 0.0  # by cosine alone, a itself ranks first
    popular_b = WindowBlend(np.array([0.0, 1.0, 0.0]), LogBlendWeights(), IDENTITY_SCALE)
    assert window_metrics(enc, _matrix(), pairs, k=1, blend=popular_b)["recall@1"] == 1.0  # b sells, a does not
    flat = WindowBlend(np.ones(3), LogBlendWeights(), SimilarityScale(0.0, 1.0))
    assert window_metrics(enc, _matrix(), pairs, k=1, blend=flat)["recall@1"] == 0.0  # equal popularity: cosine decides
