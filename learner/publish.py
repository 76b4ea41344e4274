"""Whether a candidate version may replace the active one: a pure decision with a reason.

The rule (issue 14, item 3): publish only a *real* improvement. Both versions are
measured on the same held-out examples (window pairs for an adapter, held-back baskets
for a ranker), and the candidate's per-example metric is paired with the active one's.
The candidate is published only if the mean of the differences is above zero and above
``z`` standard errors of that mean. A tie is held: each adapter publication triggers a
full index rebuild, and the old rule (publish unless worse than a margin, judged on 8
to 256 pairs) published every tie. Pairing the examples removes what both versions get
right or wrong alike, so the test sees the difference, not the window's difficulty.

``margin`` keeps its old meaning as an allowance: a candidate may be worse by up to
``margin`` (default 0). Tests of the plumbing set it to 1.0, which passes any candidate
that is not worse on every example.

Two more reasons hold one back, because a figure on too few examples, or a candidate
that has not changed since the last publication, says nothing new. Every decision
carries a sentence for the log, so an operator can see why nothing was published.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PRIMARY_METRIC = "recall@10"
SECONDARY_METRIC = "ndcg@10"


@dataclass(frozen=True, slots=True)
class PairedComparison:
    """Candidate minus active, per example: how many, the mean difference and its standard error."""

    n: int
    candidate_mean: float
    active_mean: float
    mean_gain: float
    std_err: float

    def t(self) -> float:
        """Mean gain in standard errors (inf for a gain without spread, 0 for none)."""
        if self.std_err > 0:
            return self.mean_gain / self.std_err
        return math.copysign(math.inf, self.mean_gain) if self.mean_gain else 0.0


def paired_comparison(candidate: Sequence[float] | np.ndarray, active: Sequence[float] | np.ndarray) -> PairedComparison:
    """Compare two versions' metric on the same examples (same order); ValueError if the lengths differ."""
    c = np.asarray(candidate, dtype=np.float64)
    a = np.asarray(active, dtype=np.float64)
    if c.shape != a.shape or c.ndim != 1:
        raise ValueError(f"paired metrics need one value per example for both, got {c.shape} and {a.shape}")
    n = len(c)
    if n == 0:
        return PairedComparison(0, 0.0, 0.0, 0.0, 0.0)
    diff = c - a
    std_err = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return PairedComparison(n, float(c.mean()), float(a.mean()), float(diff.mean()), std_err)


@dataclass(frozen=True, slots=True)
class PublishDecision:
    publish: bool
    reason: str
    comparison: PairedComparison | None = None


def decide_publish(
    candidate: Sequence[float] | np.ndarray,
    active: Sequence[float] | np.ndarray,
    *,
    z: float,
    min_examples: int,
    trained_since_publish: int,
    active_version: str,
    margin: float = 0.0,
    metric: str = PRIMARY_METRIC,
    unit: str = "window pairs",
) -> PublishDecision:
    """Judge ``candidate`` against ``active``: per-example values of ``metric`` on the same examples.

    Holds back when fewer than ``min_examples`` examples could be evaluated, when nothing
    was trained since the active version was published (``trained_since_publish`` is 0),
    or unless ``mean gain + margin`` is above both 0 and ``z`` standard errors of the gain.
    ``unit`` names the examples in the reason ("window pairs", "baskets").
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if z < 0:
        raise ValueError(f"z must be >= 0, got {z}")
    cmp = paired_comparison(candidate, active)
    figures = (
        f"{metric} {cmp.candidate_mean:.4f} vs {cmp.active_mean:.4f} (candidate vs {active_version}, {cmp.n} {unit}), "
        f"gain {cmp.mean_gain:+.4f} +- {cmp.std_err:.4f} s.e."
    )
    if cmp.n < min_examples:
        return PublishDecision(False, f"hold: only {cmp.n} {unit} could be evaluated, need {min_examples}", cmp)
    if trained_since_publish <= 0:
        return PublishDecision(False, f"hold: nothing trained since {active_version} was published; {figures}", cmp)
    allowed = cmp.mean_gain + margin
    if allowed <= 0:
        if margin:
            why = f"worse by more than the margin {margin:.4f}"
        else:
            why = "worse" if cmp.mean_gain < 0 else "no gain (a tie)"
        return PublishDecision(False, f"hold: {why}; {figures}", cmp)
    if allowed <= z * cmp.std_err:
        return PublishDecision(False, f"hold: the gain is within {z:g} s.e. of none (the window's noise); {figures}", cmp)
    allowance = f", margin {margin:.4f}" if margin else ""
    return PublishDecision(True, f"publish: gain above {z:g} s.e.{allowance}; {figures}", cmp)
