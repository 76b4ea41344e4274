"""The Recall@10-over-time figure (one line per method, one point per week)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .data import format_ts
from .protocol import WEEK_S, MethodResult


def plot_timeline(
    results: Mapping[str, MethodResult], eval_from: float, path: Path, title: str,
    labels: Mapping[str, str] | None = None,
) -> None:
    """Write a PNG of weekly Recall@10 on the ``all`` slice by method (Agg: no display needed).

    ``labels`` renames lines in the legend (e.g. a seeded method's "mean of 3 seeds", whose
    timeline is :meth:`evaluation.metrics.Timeline.merged` over its runs).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    for name, res in results.items():
        means = res.timeline.means()
        if not means:
            continue
        weeks = sorted(means)
        ax.plot(weeks, [means[w] for w in weeks], marker="o", markersize=3, label=(labels or {}).get(name, name))
    ticks = sorted({w for res in results.values() for w in res.timeline.means()})
    ax.set_xticks(ticks[::2])
    ax.set_xticklabels([format_ts(eval_from + w * WEEK_S) for w in ticks[::2]], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("Recall@10 (all baskets, weekly mean)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
