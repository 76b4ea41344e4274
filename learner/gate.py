"""The publish gate's judgement and publication: one sequence for the learner and ``freshrec eval``.

The learner process (``learner.loop``) and the evaluation's stream learner
(``evaluation.methods.Gate``) both judge a trained candidate against the active version
on the held-out examples and publish it through the registry when the rule
(``learner.publish.decide_publish``: a gain beyond the window's noise) allows; keeping
that sequence here means the evaluation measures the gate the learner runs. Adapters are
judged per window pair (:func:`judge_candidate`), rankers per held-back basket
(:func:`judge_ranker`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from freshrec.contracts import TrainPair
from models.encoder import BASE_VERSION, TextEncoder
from models.ranker import RankerModel
from models.ranker_registry import LoadedRanker, RankerRegistry
from models.registry import AdapterManifest, AdapterRegistry

from .evaluate import (
    ActiveEncoder,
    ItemMatrix,
    TargetPopularity,
    WindowBlend,
    basket_gains,
    metrics_from_ranks,
    rank_gains,
    window_ranks,
)
from .publish import PRIMARY_METRIC, SECONDARY_METRIC, PublishDecision, decide_publish


@dataclass(frozen=True)
class Judgement:
    """The gate's decision with the figures it was made on (candidate and active, one window).

    ``unit`` names what the window holds ("pairs" for adapters, "baskets" for rankers);
    the manifest records the count as ``eval_<unit>``.
    """

    decision: PublishDecision
    candidate: dict[str, float]
    active: dict[str, float]
    unit: str = "pairs"

    def manifest_metrics(self) -> dict[str, float]:
        """What a published version's manifest records of its evaluation."""
        out = {
            PRIMARY_METRIC: self.candidate[PRIMARY_METRIC],
            SECONDARY_METRIC: self.candidate[SECONDARY_METRIC],
            f"eval_{self.unit}": self.candidate["n"],
            f"active_{PRIMARY_METRIC}": self.active[PRIMARY_METRIC],
            f"active_{SECONDARY_METRIC}": self.active[SECONDARY_METRIC],
        }
        if (cmp := self.decision.comparison) is not None:
            out["gate_gain"] = cmp.mean_gain
            out["gate_std_err"] = cmp.std_err
        return out


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
    """Rank the window with each version and apply ``learner.publish.decide_publish`` pair by pair.

    Each version is judged as serving will use it: by the item side of serving's blend
    (``WindowBlend``: the trained targets' fresh popularity beside the version's own
    scaled similarity). Judged on cosine alone, an adapter trained to add what popularity
    does not explain looked worse than the base model while it ranked baskets better
    (docs/eval_online_retail_ii.md). The comparison pairs each window pair's
    ``settings.gate_metric`` under the candidate with the same pair's under the active
    version (pairs whose target either catalog lacks are left out).
    """
    cand_ranks = window_ranks(
        candidate_encoder, candidate_matrix, window, blend=WindowBlend.for_matrix(candidate_matrix, popularity, settings)
    )
    act_ranks = window_ranks(
        active.encoder, active_matrix, window, blend=WindowBlend.for_matrix(active_matrix, popularity, settings)
    )
    both = (cand_ranks >= 0) & (act_ranks >= 0)
    decision = decide_publish(
        rank_gains(cand_ranks[both], settings.gate_metric),
        rank_gains(act_ranks[both], settings.gate_metric),
        z=settings.gate_z,
        min_examples=settings.learner_min_eval_pairs,
        trained_since_publish=trained_since_publish,
        active_version=active.version,
        margin=settings.learner_publish_margin,
        metric=settings.gate_metric,
        unit="window pairs",
    )
    return Judgement(decision, metrics_from_ranks(cand_ranks), metrics_from_ranks(act_ranks))


def judge_ranker(
    candidate_scores: np.ndarray,
    active_scores: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[int],
    settings: Any,
    trained_since_publish: int,
    active_version: str,
    relevant: Sequence[int] | None = None,
) -> Judgement:
    """Judge a ranker candidate on held-back baskets: per basket, ``settings.gate_metric`` of its order.

    ``candidate_scores`` and ``active_scores`` score the same rows (the baskets'
    candidates, ``groups`` rows each, ``labels`` 1 where bought); the active scores are the
    active ranker's, or the blend's when none is active (``active_version`` then names
    it, e.g. "blend"), since that is what the candidate would replace in serving.
    ``relevant`` counts each basket's bought items, candidates or not (Recall@10 against
    the whole basket); by default only the bought candidates count.
    """
    gains = {
        (side, metric): basket_gains(scores, labels, groups, metric, relevant)
        for side, scores in (("candidate", candidate_scores), ("active", active_scores))
        for metric in {PRIMARY_METRIC, SECONDARY_METRIC, settings.gate_metric}
    }
    decision = decide_publish(
        gains["candidate", settings.gate_metric],
        gains["active", settings.gate_metric],
        z=settings.gate_z,
        min_examples=settings.ranker_min_gate_baskets,
        trained_since_publish=trained_since_publish,
        active_version=active_version,
        metric=settings.gate_metric,
        unit="baskets",
    )

    def figures(side: str) -> dict[str, float]:
        return {
            PRIMARY_METRIC: float(gains[side, PRIMARY_METRIC].mean()) if len(groups) else 0.0,
            SECONDARY_METRIC: float(gains[side, SECONDARY_METRIC].mean()) if len(groups) else 0.0,
            "n": float(len(groups)),
        }

    return Judgement(decision, figures("candidate"), figures("active"), unit="baskets")


def publish_ranker(
    registry: RankerRegistry,
    model: RankerModel,
    active_version: str | None,
    judgement: Judgement,
    examples_seen: int,
) -> LoadedRanker:
    """Write a passed ranker candidate as a new version and make it the active one (verified on the way).

    Rankers swap on their own (no index to rebuild), so publication activates; announcing
    it on the ``rankers`` topic is the caller's job. ``active_version`` is the parent
    (None when the blend was active).
    """
    if not judgement.decision.publish:
        raise ValueError(f"the gate held this ranker: {judgement.decision.reason}")
    manifest = registry.publish(model, active_version, judgement.manifest_metrics(), examples_seen)
    return registry.activate(manifest.version)


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
