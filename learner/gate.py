"""The publish gate's judgement and publication: one sequence for the learner and ``freshrec eval``.

The learner process (``learner.loop``) and the evaluation's stream learner
(``evaluation.methods.Gate``) both judge a trained candidate against the active version
on the held-out window and publish it through the registry when the rule allows; keeping
that sequence here means the evaluation measures the gate the learner runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from freshrec.contracts import TrainPair
from models.encoder import BASE_VERSION, TextEncoder
from models.registry import AdapterManifest, AdapterRegistry

from .evaluate import ActiveEncoder, ItemMatrix, TargetPopularity, WindowBlend, window_metrics
from .publish import PublishDecision, decide_publish


@dataclass(frozen=True)
class Judgement:
    """The gate's decision with the figures it was made on (candidate and active, one window)."""

    decision: PublishDecision
    candidate: dict[str, float]
    active: dict[str, float]

    def manifest_metrics(self) -> dict[str, float]:
        """What a published version's manifest records of its evaluation."""
        return {
            "recall@10": self.candidate["recall@10"],
            "ndcg@10": self.candidate["ndcg@10"],
            "eval_pairs": self.candidate["n"],
            "active_recall@10": self.active["recall@10"],
            "active_ndcg@10": self.active["ndcg@10"],
        }


def judge_candidate(
    candidate_encoder: TextEncoder,
    candidate_matrix: ItemMatrix,
    active: ActiveEncoder,
    active_matrix: ItemMatrix,
    window: Sequence[TrainPair],
    popularity: TargetPopularity,
    settings: Any,
    trained_since_publish: int,
) -> Judgement:
    """Rank the window with each version and apply ``learner.publish.decide_publish``.

    Each version is judged as serving will use it: by the item side of serving's blend
    (``WindowBlend``: the trained targets' fresh popularity beside the version's own
    scaled similarity). Judged on cosine alone, an adapter trained to add what popularity
    does not explain looked worse than the base model while it ranked baskets better
    (docs/eval_online_retail_ii.md).
    """
    cand = window_metrics(
        candidate_encoder, candidate_matrix, window, blend=WindowBlend.for_matrix(candidate_matrix, popularity, settings)
    )
    act = window_metrics(active.encoder, active_matrix, window, blend=WindowBlend.for_matrix(active_matrix, popularity, settings))
    decision = decide_publish(
        cand,
        act,
        settings.learner_publish_margin,
        evaluated_pairs=int(cand["n"]),
        min_pairs=settings.learner_min_eval_pairs,
        trained_since_publish=trained_since_publish,
        active_version=active.version,
    )
    return Judgement(decision, cand, act)


def publish_candidate(
    registry: AdapterRegistry,
    peft_model: Any,
    pairs_trained: int,
    active_version: str,
    judgement: Judgement,
    candidate_matrix: ItemMatrix,
    device: str,
) -> tuple[AdapterManifest, ActiveEncoder]:
    """Write the candidate as a new version and load it back (which verifies it) as the new active one.

    The loaded encoder adopts ``candidate_matrix``: the same weights made it, so the
    catalog is not encoded again.
    """
    parent = None if active_version == BASE_VERSION else active_version
    manifest = registry.publish(peft_model, parent, judgement.manifest_metrics(), pairs_trained)
    new_active = ActiveEncoder.load(manifest.version, registry.root, device)
    new_active.adopt_matrix(candidate_matrix)
    return manifest, new_active
