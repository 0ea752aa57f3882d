"""Human-readable results: the many/medium/few table and the accuracy-vs-frequency plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np

from longtail.engine.evaluate import fmt_pct


def results_table(results: Dict[str, Dict[str, Any]]) -> str:
    """A fixed-width table, one row per split: top-1 / many / medium / few / ECE (percent)."""
    header = f"{'split':<8} {'all':>7} {'many':>7} {'medium':>7} {'few':>7} {'ECE':>6} {'n':>7}"
    lines = [header, "-" * len(header)]
    for split, m in results.items():
        lines.append(
            f"{split:<8} {fmt_pct(m['top1']):>7} {fmt_pct(m['many']):>7} "
            f"{fmt_pct(m['medium']):>7} {fmt_pct(m['few']):>7} {fmt_pct(m['ece']):>6} "
            f"{m['num_samples']:>7}"
        )
    return "\n".join(lines)


def group_sizes_line(groups: Dict[str, Sequence[int]]) -> str:
    return (
        "classes: "
        + ", ".join(f"{k} {len(v)}" for k, v in groups.items())
        + "  (many > 100, medium 20-100, few < 20 training images)"
    )


BIN_ABOVE = 200  # classes beyond which the plot bins them by training count
BINS = 16


def count_bins(points):
    """(count, accuracy) points -> per log-spaced count bin: centre, mean, 25th, 75th percentile
    of the accuracies (empty bins dropped)."""
    n = np.array([p[0] for p in points], dtype=float).clip(min=1)
    a = np.array([p[1] for p in points], dtype=float)
    edges = np.geomspace(n.min(), n.max() * 1.0001, BINS + 1)
    which = np.clip(np.searchsorted(edges, n, side="right") - 1, 0, BINS - 1)
    out = [[], [], [], []]
    for b in range(BINS):
        sel = a[which == b]
        if len(sel):
            out[0].append(float(np.sqrt(edges[b] * edges[b + 1])))
            out[1].append(float(sel.mean()))
            out[2].append(float(np.percentile(sel, 25)))
            out[3].append(float(np.percentile(sel, 75)))
    return tuple(out)


def plot_per_class(
    path: Path, class_counts: Sequence[int], results: Dict[str, Dict[str, Any]], title: str = ""
) -> None:
    """PNG: per-class accuracy (y) against class training count (x, log scale), one series per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    binned = len(class_counts) > BIN_ABOVE  # thousands of classes: a scatter is a blur
    for marker, (split, m) in zip("os^", results.items()):
        pts = [(n, a) for n, a in zip(class_counts, m["per_class"]) if a is not None]
        label = f"{split} (top-1 {fmt_pct(m['top1'])})"
        if pts and binned:
            centre, mean, low, high = count_bins(pts)
            ax.plot(centre, mean, marker=marker, label=label + ", mean per bin")
            ax.fill_between(centre, low, high, alpha=0.2)
        elif pts:
            ax.scatter(*zip(*pts), marker=marker, alpha=0.75, label=label)
    for x in (20, 100):
        ax.axvline(x, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_ylim(-2, 102)
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("class accuracy (%)")
    ax.set_title(title or "per-class accuracy against class frequency")
    if binned:
        ax.text(
            0.01,
            0.01,
            f"{len(class_counts)} classes in {BINS} log-spaced count bins; "
            "band: 25-75th percentile",
            transform=ax.transAxes,
            fontsize=7,
        )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
