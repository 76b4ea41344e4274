"""Whether a candidate adapter may replace the active one: a pure decision with a reason.

The rule (issue 5): publish only if the candidate is not worse than the active adapter
by more than ``margin`` in Recall@10, both measured on the same held-out window. The
learner ranks that window by the item side of serving's blend (fresh popularity of the
trained targets plus each version's scaled similarity: ``learner.evaluate.WindowBlend``),
so a version is judged as serving will use it.
Two more reasons hold one back, because a figure on too few pairs, or a candidate that
has not changed since the last publication, says nothing new. Every decision carries a
sentence for the log, so an operator can see why nothing was published.
"""

from __future__ import annotations

from dataclasses import dataclass

PRIMARY_METRIC = "recall@10"
SECONDARY_METRIC = "ndcg@10"


@dataclass(frozen=True, slots=True)
class PublishDecision:
    publish: bool
    reason: str


def decide_publish(
    candidate: dict[str, float],
    active: dict[str, float],
    margin: float,
    evaluated_pairs: int,
    min_pairs: int,
    trained_since_publish: int,
    active_version: str,
) -> PublishDecision:
    """Compare ``candidate`` with ``active`` (metric dicts from the same window).

    Holds back when fewer than ``min_pairs`` window pairs could be evaluated, when no
    pair was trained since the active version was published (``trained_since_publish``
    is 0), or when the candidate's Recall@10 is below the active one's minus ``margin``.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    cand_r, act_r = candidate.get(PRIMARY_METRIC), active.get(PRIMARY_METRIC)
    if cand_r is None or act_r is None:
        missing = "candidate" if cand_r is None else "active"
        return PublishDecision(False, f"hold: the {missing} figures have no {PRIMARY_METRIC}")
    figures = (
        f"{PRIMARY_METRIC} {cand_r:.4f} vs {act_r:.4f}, "
        f"{SECONDARY_METRIC} {candidate.get(SECONDARY_METRIC, float('nan')):.4f} vs "
        f"{active.get(SECONDARY_METRIC, float('nan')):.4f} (candidate vs {active_version}, {evaluated_pairs} pairs)"
    )
    if evaluated_pairs < min_pairs:
        return PublishDecision(
            False, f"hold: only {evaluated_pairs} window pairs have a target in the catalog, need {min_pairs}"
        )
    if trained_since_publish <= 0:
        return PublishDecision(False, f"hold: nothing trained since {active_version} was published; {figures}")
    if cand_r < act_r - margin:
        return PublishDecision(
            False, f"hold: candidate is worse by {act_r - cand_r:.4f}, more than the margin {margin:.4f}; {figures}"
        )
    return PublishDecision(True, f"publish: {figures}, margin {margin:.4f}")
