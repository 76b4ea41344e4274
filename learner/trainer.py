"""LoRA fine-tuning of the text encoder on train pairs, one micro-batch per step.

The encoder is a siamese bi-encoder: the same transformer embeds a shopper's context
and an item's text, and retrieval ranks items by the dot product of the two
L2-normalised vectors. Training pulls each context towards the item that followed it
and away from the other targets in the batch (in-batch InfoNCE): the negatives are
free, since their embeddings are computed for their own pairs anyway.

Three choices make what is trained what serving uses (measured on online_retail_ii,
docs/eval_online_retail_ii.md "What the learner trains"):

- **The context is a user vector.** Serving never encodes a shopper's history as one
  text: it averages the item vectors of their history (``ranking.scoring.user_vector``).
  So a pair's context vector is the normalised mean of its context items' vectors
  (``TrainPair.context_texts``); only a search query is encoded as a text.
- **Extra negatives follow popularity** (``learner_negatives="recent"``): they are drawn
  from the targets of recent pairs, so an item is a negative about as often as it is
  bought. Serving blends fresh popularity in as a term of its own; uniform catalog
  negatives taught the adapter popularity again (rare items pushed away), while
  popularity-shaped ones leave it what popularity does not explain.
- **An anchor to the base space** (``learner_anchor_weight``): each encoded text is
  pulled back towards its base-model vector. Without it a few hundred steps squeezed
  the whole catalog into a narrow cone (mean item-to-user cosine 0.42 -> 0.89, spread
  0.12 -> 0.04), which silently re-weights the blend's similarity term, tuned on the
  base space; and a learner that runs forever must not forget what the base knew.

Only the LoRA matrices train (about 0.3% of the weights at rank 8 on query/value), so
an adapter is small to publish and the base model stays shared by every version.

The same code runs on CUDA when present and on the CPU otherwise (invariant 5).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from freshrec.contracts import TrainPair
from freshrec.settings import Settings
from models.encoder import TorchEncoder, load_base_model, load_tokenizer

CANDIDATE_VERSION = "candidate"


def contrastive_loss(
    context_vecs: torch.Tensor,
    target_vecs: torch.Tensor,
    weights: torch.Tensor,
    same_target: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Weighted InfoNCE of B contexts against M >= B candidates (row i's positive is column i).

    Columns 0..B-1 are the batch's own targets (in-batch negatives for the other rows);
    any further columns are extra negatives (random catalog items). ``same_target``
    (B, M) bool marks candidates that are positives for the row too (see
    :func:`same_target_mask`): those are masked out, since a batch with two purchases of
    one item must not teach that the item is a negative for itself. ``weights`` (B,)
    scale each pair's term (event kind: a purchase says more than a view).
    """
    logits = context_vecs @ target_vecs.T / temperature
    rows = torch.arange(len(logits), device=logits.device)
    not_positive = torch.ones_like(same_target)
    not_positive[rows, rows] = False
    logits = logits.masked_fill(same_target & not_positive, float("-inf"))
    per_pair = torch.nn.functional.cross_entropy(logits, rows, reduction="none")
    return (per_pair * weights).sum() / weights.sum().clamp(min=1e-12)


def same_target_mask(pairs: Sequence[TrainPair]) -> torch.Tensor:
    """(B, B) True where pair j's target may well be a positive for pair i's context.

    That is: the same target item (or identical target text), the same context text,
    or the same shopper. A shopper's other purchases are what we want the model to
    learn as related; used as negatives, they would teach it to push apart items
    bought together (which made a trained adapter worse than the frozen encoder on
    online_retail_ii before this mask and the batcher's mixing pool).
    """
    n = len(pairs)
    items = [p.target_item for p in pairs]
    texts = [p.target_text for p in pairs]
    contexts = [p.context_text for p in pairs]
    users = [p.user_id for p in pairs]

    def shared(i: int, j: int) -> bool:
        return items[i] == items[j] or texts[i] == texts[j] or contexts[i] == contexts[j] or users[i] == users[j]

    return torch.tensor([[shared(i, j) for j in range(n)] for i in range(n)], dtype=torch.bool)


def _context_items(pairs: Sequence[TrainPair]) -> tuple[list[str], list[list[int]]]:
    """The distinct texts to encode for the batch's contexts, and each pair's rows among them.

    A pair with ``context_texts`` averages those items (a user vector); one without
    (a search query, or a pair from an older producer) is its ``context_text`` alone.
    Shared items are encoded once: a shopper's pairs of one basket share their context.
    """
    index: dict[str, int] = {}
    groups = [[index.setdefault(t, len(index)) for t in (p.context_texts or [p.context_text])] for p in pairs]
    return list(index), groups


def context_vectors(item_vecs: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per group, the L2-normalised mean of its rows of ``item_vecs``: serving's user vector, uniformly weighted."""
    means = torch.stack([item_vecs[list(g)].mean(dim=0) for g in groups])
    return torch.nn.functional.normalize(means, p=2, dim=1)


def pair_id_digest(pair_ids: Sequence[str], start: str = "0" * 16) -> str:
    """An order-independent 64-bit fingerprint of a set of pair ids (hex).

    Sum of per-id hashes mod 2^64, so the digest of the pairs trained before and after
    a restart can be compared with the digest of the training log without storing
    every id in each checkpoint.
    """
    acc = int(start, 16)
    for pid in pair_ids:
        acc = (acc + int.from_bytes(hashlib.blake2b(pid.encode(), digest_size=8).digest(), "big")) % (1 << 64)
    return f"{acc:016x}"


class LoraTrainer:
    """A peft LoRA model on the bundled encoder, with its optimiser and step counter.

    Example::

        trainer = LoraTrainer(settings, settings.resolved_device())
        trainer.set_catalog(item_texts)         # random catalog negatives come from here
        loss = trainer.train_step(pairs)        # one AdamW step on one micro-batch
        vecs = trainer.encoder().encode(texts)  # the candidate's embeddings
        trainer.save_state(path)                # LoRA + optimiser + step + trained-pairs summary
    """

    def __init__(self, settings: Settings, device: str | None = None) -> None:
        from peft import LoraConfig, get_peft_model

        self.settings = settings
        self.device = device or settings.resolved_device()
        torch.manual_seed(settings.seed)
        targets = [t.strip() for t in settings.learner_lora_targets.split(",") if t.strip()]
        config = LoraConfig(
            r=settings.lora_rank,
            lora_alpha=2 * settings.lora_rank,
            lora_dropout=settings.learner_lora_dropout,
            target_modules=targets,
            bias="none",
        )
        self.peft_model = get_peft_model(load_base_model(self.device), config)
        self.tokenizer = load_tokenizer()
        self._encoder = TorchEncoder(self.peft_model, self.tokenizer, self.device, CANDIDATE_VERSION)
        self.params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.learner_lr, weight_decay=0.0)
        self.temperature = settings.learner_temperature
        self.step = 0
        self.pairs_trained = 0
        self.trained_digest = pair_id_digest([])
        self.catalog_texts: list[str] = []
        # Targets of recent pairs, repeats included: popularity-shaped negatives.
        self.recent_targets: deque[str] = deque(maxlen=settings.learner_negative_pool)

    def set_catalog(self, texts: Sequence[str]) -> None:
        """Item texts that :meth:`train_step` draws its random catalog negatives from."""
        self.catalog_texts = texts if isinstance(texts, list) else list(texts)

    def train_step(self, pairs: Sequence[TrainPair], negatives: Sequence[str] | None = None) -> float:
        """One AdamW step on one micro-batch; returns the loss before the step.

        ``negatives`` are extra item texts every context is contrasted with; by default
        ``settings.learner_catalog_negatives`` of them, drawn from recent targets
        (:meth:`draw_negatives`). In-batch negatives alone are a few dozen items, while
        retrieval ranks the whole catalog; without an anchor to the rest of it, a few
        steps at a high learning rate pull the trained items into a corner that
        outranks everything. Measured on online_retail_ii (lr 1e-3, 24 steps of 32):
        held-out Recall@10 0.023 frozen, 0.001 without extra negatives, 0.030 with 64
        (``bench/learn_quality.py``). A negative equal to a pair's target text is masked
        for that pair.

        Pairs need a ``target_text`` (the caller fills it from the catalog). A batch
        whose weights are all zero, or with fewer than two pairs, has no contrast to
        learn from: it counts as trained and changes no weight (returns 0.0).
        """
        pairs = list(pairs)
        if any(not p.target_text for p in pairs):
            missing = next(p.pair_id for p in pairs if not p.target_text)
            raise ValueError(f"pair {missing!r} has no target_text; fill it from the catalog before training")
        negatives = list(self.draw_negatives(pairs) if negatives is None else negatives)
        self.recent_targets.extend(p.target_text for p in pairs)
        weights = torch.tensor([max(p.weight, 0.0) for p in pairs], dtype=torch.float32, device=self.device)
        loss_value = 0.0
        if len(pairs) >= 2 and float(weights.sum()) > 0:
            item_texts, groups = _context_items(pairs)
            target_texts = [p.target_text for p in pairs] + negatives
            anchor_w = self.settings.learner_anchor_weight
            if anchor_w > 0:
                self.peft_model.eval()
                with torch.no_grad(), self.peft_model.disable_adapter():
                    base = self._encoder.forward(item_texts + target_texts)
            self.peft_model.train()
            item_vecs = self._encoder.forward(item_texts)
            contexts = context_vectors(item_vecs, groups)
            targets = self._encoder.forward(target_texts)
            mask = same_target_mask(pairs)
            if negatives:
                extra = torch.tensor([[n == p.target_text for n in negatives] for p in pairs], dtype=torch.bool)
                mask = torch.cat([mask, extra], dim=1)
            loss = contrastive_loss(contexts, targets, weights, mask.to(self.device), self.temperature)
            if anchor_w > 0:
                moved = torch.cat([item_vecs, targets])
                loss = loss + anchor_w * (1.0 - (moved * base).sum(dim=1)).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            loss_value = float(loss.detach())
            self.peft_model.eval()
        self.step += 1
        self.pairs_trained += len(pairs)
        self.trained_digest = pair_id_digest([p.pair_id for p in pairs], self.trained_digest)
        return loss_value

    def draw_negatives(self, pairs: Sequence[TrainPair]) -> list[str]:
        """The extra negatives of one step, reproducible per step; never a target of the batch.

        ``learner_negatives="recent"``: drawn from the targets of the last
        ``learner_negative_pool`` pairs (so in proportion to how often each was a
        target), falling back to the catalog until that pool holds enough texts;
        ``"catalog"``: uniform over :meth:`set_catalog`'s texts.
        """
        skip = [p.target_text for p in pairs]
        k = self.settings.learner_catalog_negatives
        if self.settings.learner_negatives == "recent" and k > 0:
            banned = set(skip)
            pool = [t for t in self.recent_targets if t not in banned]
            if len(pool) >= k:
                return random.Random(f"{self.settings.seed}:{self.step}").sample(pool, k)
        return self.sample_negatives(self.catalog_texts, skip)

    def sample_negatives(self, texts: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
        """``settings.learner_catalog_negatives`` texts drawn from ``texts``, reproducibly per step."""
        k = self.settings.learner_catalog_negatives
        if k <= 0 or not texts:
            return []
        rng = random.Random(f"{self.settings.seed}:{self.step}")
        skip = set(exclude)
        picked = rng.sample(list(texts), min(len(texts), k + len(skip)))
        return [t for t in picked if t not in skip][:k]

    def encoder(self) -> TorchEncoder:
        """A TorchEncoder over the current (unmerged) weights, in eval mode.

        It shares the weights with the trainer: encode with it between steps, and do not
        keep it across a ``train_step`` expecting the old weights.
        """
        self.peft_model.eval()
        return self._encoder

    # -- checkpoints -----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        from peft import get_peft_model_state_dict

        return {
            "lora": {k: v.detach().cpu() for k, v in get_peft_model_state_dict(self.peft_model).items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "pairs_trained": self.pairs_trained,
            "trained_digest": self.trained_digest,
            "rng": torch.get_rng_state(),
            "recent_targets": list(self.recent_targets),
            "lora_rank": self.settings.lora_rank,
            "lora_targets": self.settings.learner_lora_targets,
        }

    def save_state(self, path: Path | str) -> None:
        """Write LoRA weights, optimiser, step and trained-pairs summary to one file, atomically."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state(), tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def load_state(self, path: Path | str) -> None:
        """Restore what :meth:`save_state` wrote; a clear error if the LoRA shape differs."""
        from peft import set_peft_model_state_dict

        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if state["lora_rank"] != self.settings.lora_rank or state["lora_targets"] != self.settings.learner_lora_targets:
            raise ValueError(
                f"checkpoint {path} has LoRA rank {state['lora_rank']} on {state['lora_targets']!r}, but the settings "
                f"say rank {self.settings.lora_rank} on {self.settings.learner_lora_targets!r}; use a fresh state_dir "
                "or the checkpoint's settings"
            )
        lora = {k: v.to(self.device) for k, v in state["lora"].items()}
        result = set_peft_model_state_dict(self.peft_model, lora)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"checkpoint {path} holds LoRA weights this model lacks: {unexpected[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.pairs_trained = int(state["pairs_trained"])
        self.trained_digest = str(state["trained_digest"])
        torch.set_rng_state(state["rng"])
        self.recent_targets.clear()
        self.recent_targets.extend(state.get("recent_targets", ()))
