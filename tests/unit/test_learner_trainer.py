"""The LoRA trainer on CPU: the loss, a few steps that learn, and checkpoint round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from freshrec.contracts import TrainPair  # noqa: E402
from freshrec.settings import Settings  # noqa: E402
from learner.trainer import LoraTrainer, contrastive_loss, pair_id_digest, same_target_mask  # noqa: E402

CONTEXTS = [
    "christmas tree star, tinsel garland",
    "coffee jar, kitchen spoon",
    "garden hose, plant pot",
    "birthday cake candles, party hats",
    "teapot, sugar bowl",
    "dog bed, cat bowl",
]
TARGETS = [
    "RED HEART LANTERN",
    "BLUE CERAMIC MUG",
    "GREEN GARDEN GNOME",
    "PINK PARTY BUNTING",
    "WHITE TEA SET",
    "BLACK CAT DOORSTOP",
]


def _pairs(weight: float = 1.0) -> list[TrainPair]:
    # Targets are deliberately mismatched with the contexts, so the frozen encoder's loss
    # is high and a few steps must bring it down.
    return [
        TrainPair(pair_id=f"p{i}", user_id=f"u{i}", context_text=c, target_item=f"i{i}", target_text=TARGETS[(i + 2) % 6],
                  weight=weight)
        for i, c in enumerate(CONTEXTS)
    ]


@pytest.fixture(scope="module")
def trainer() -> LoraTrainer:
    torch.set_num_threads(2)
    return LoraTrainer(Settings(learner_lr=3e-3, lora_rank=4, learner_catalog_negatives=8), "cpu")


def _eval_loss(trainer: LoraTrainer, pairs: list[TrainPair]) -> float:
    enc = trainer.encoder()
    with torch.no_grad():
        c = enc.forward([p.context_text for p in pairs])
        t = enc.forward([p.target_text for p in pairs])
        w = torch.ones(len(pairs))
        return float(contrastive_loss(c, t, w, same_target_mask(pairs), trainer.temperature))


def test_contrastive_loss_masks_duplicate_targets() -> None:
    c = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    t = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 0.1]]), dim=1)
    w = torch.ones(3)
    no_mask = torch.zeros(3, 3, dtype=torch.bool)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 2] = mask[2, 0] = True  # pairs 0 and 2 share a target item
    assert float(contrastive_loss(c, t, w, mask, 0.05)) < float(contrastive_loss(c, t, w, no_mask, 0.05))
    # a zero weight removes a pair's term
    lone = contrastive_loss(c, t, torch.tensor([1.0, 0.0, 0.0]), no_mask, 0.05)
    row0 = torch.nn.functional.cross_entropy((c @ t.T / 0.05)[:1], torch.tensor([0]))
    assert float(lone) == pytest.approx(float(row0), rel=1e-5)


def test_same_target_mask_by_item_text_context_or_shopper() -> None:
    def pair(pid: str, user: str, ctx: str, item: str, text: str, ts: float = 0.0) -> TrainPair:
        return TrainPair(pair_id=pid, user_id=user, context_text=ctx, target_item=item, target_text=text, ts=ts)

    pairs = [
        pair("a", "u1", "x", "i1", "MUG"),
        pair("b", "u2", "y", "i1", "MUG"),  # same item
        pair("c", "u3", "z", "i2", "MUG"),  # same text
        pair("d", "u4", "w", "i3", "JAR"),
        pair("e", "u5", "w", "i4", "BOX"),  # same context as d
        pair("f", "u6", "v1", "i5", "CUP", ts=10.0),
        pair("g", "u6", "v2", "i6", "PEN", ts=10.0),  # same basket as f
        pair("h", "u6", "v3", "i7", "INK", ts=11.0),  # same shopper, later basket
        pair("k", "u7", "v4", "i8", "HAT", ts=10.0),  # another shopper at the same time
    ]
    m = same_target_mask(pairs)
    assert m[0, 1] and m[0, 2] and not m[0, 3] and m[3, 3]
    assert m[3, 4] and not m[2, 4]
    assert m[5, 6] and m[5, 7] and not m[5, 8]


def test_contrastive_loss_with_extra_negatives() -> None:
    c = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    t = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    neg = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [-1.0, 0.0]]), dim=1)
    w = torch.ones(2)
    base = contrastive_loss(c, t, w, torch.zeros(2, 2, dtype=torch.bool), 0.1)
    extra = contrastive_loss(c, torch.cat([t, neg]), w, torch.zeros(2, 4, dtype=torch.bool), 0.1)
    assert float(extra) > float(base)  # a near-duplicate negative makes row 0 harder
    masked = torch.zeros(2, 4, dtype=torch.bool)
    masked[0, 2] = True  # ... unless it is masked as a positive of row 0
    row0_only = torch.tensor([1.0, 0.0])
    a = contrastive_loss(c, torch.cat([t, neg]), row0_only, masked, 0.1)
    b = contrastive_loss(c, torch.cat([t, neg[1:]]), row0_only, torch.zeros(2, 3, dtype=torch.bool), 0.1)
    assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_pair_id_digest_is_order_independent_and_incremental() -> None:
    assert pair_id_digest(["a", "b", "c"]) == pair_id_digest(["c", "a", "b"])
    assert pair_id_digest(["c"], pair_id_digest(["a", "b"])) == pair_id_digest(["a", "b", "c"])
    assert pair_id_digest(["a"]) != pair_id_digest(["b"])


def test_a_few_steps_lower_the_loss(trainer: LoraTrainer) -> None:
    pairs = _pairs()
    before = _eval_loss(trainer, pairs)
    steps_before = trainer.step
    for _ in range(4):
        loss = trainer.train_step(pairs)
        assert loss == loss and loss >= 0.0  # finite
    after = _eval_loss(trainer, pairs)
    assert after < before * 0.8, (before, after)
    assert trainer.step == steps_before + 4
    assert trainer.pairs_trained >= 24


def test_zero_weight_batch_counts_but_does_not_move_weights(trainer: LoraTrainer) -> None:
    before = {k: v.clone() for k, v in trainer.peft_model.named_parameters() if v.requires_grad}
    assert trainer.train_step(_pairs(weight=0.0)) == 0.0
    after = dict(trainer.peft_model.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_catalog_negatives_are_reproducible_and_exclude_targets(trainer: LoraTrainer) -> None:
    texts = [f"ITEM {i}" for i in range(200)]
    a = trainer.sample_negatives(texts, exclude=["ITEM 3", "ITEM 4"])
    assert a == trainer.sample_negatives(texts, exclude=["ITEM 3", "ITEM 4"])
    assert len(a) == trainer.settings.learner_catalog_negatives and not {"ITEM 3", "ITEM 4"} & set(a)
    loss = trainer.train_step(_pairs(), a)
    assert loss == loss and loss > 0
    trainer.set_catalog(texts)  # now train_step draws them itself
    assert trainer.train_step(_pairs()) > 0
    trainer.set_catalog([])
    assert trainer.sample_negatives(texts) != a  # the step moved on: a new draw


def test_pair_without_target_text_is_refused(trainer: LoraTrainer) -> None:
    bad = TrainPair(pair_id="x", user_id="u", context_text="c", target_item="i", target_text="")
    with pytest.raises(ValueError, match="no target_text"):
        trainer.train_step([bad, bad])


def test_encoder_gives_unit_vectors(trainer: LoraTrainer) -> None:
    vecs = trainer.encoder().encode(["a mug", "a lantern"])
    assert vecs.shape == (2, 384)
    assert abs(float((vecs**2).sum(axis=1).max()) - 1.0) < 1e-4


def test_save_and_load_state_round_trip(trainer: LoraTrainer, tmp_path: Path) -> None:
    path = tmp_path / "trainer.pt"
    trainer.save_state(path)
    expected = trainer.encoder().encode(["a mug"])
    step, trained, digest = trainer.step, trainer.pairs_trained, trainer.trained_digest
    trainer.train_step(_pairs())  # move away from the saved state
    assert trainer.step == step + 1
    trainer.load_state(path)
    assert (trainer.step, trainer.pairs_trained, trainer.trained_digest) == (step, trained, digest)
    assert abs(trainer.encoder().encode(["a mug"]) - expected).max() < 1e-6
    assert trainer.optimizer.state  # Adam moments came back too


def test_load_state_refuses_another_lora_shape(trainer: LoraTrainer, tmp_path: Path) -> None:
    path = tmp_path / "trainer.pt"
    trainer.save_state(path)
    other = LoraTrainer.__new__(LoraTrainer)
    other.settings = Settings(lora_rank=16)
    with pytest.raises(ValueError, match="rank 4"):
        LoraTrainer.load_state(other, path)
