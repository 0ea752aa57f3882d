"""Human-readable results: the results table (top-1, top-5, balanced, many / medium / few, ECE)
and the accuracy-vs-frequency plot (the run's other plots: engine/plots.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np

from longtail.engine.evaluate import fmt_pct

TOP5_ABOVE = 10  # top-5 accuracy is reported for more classes than this (else top-5 is ~100 %)


def shows_top5(num_classes: int) -> bool:
    """Whether top-5 accuracy is worth a column: more than TOP5_ABOVE classes."""
    return num_classes > TOP5_ABOVE


def results_table(results: Dict[str, Dict[str, Any]]) -> str:
    """A fixed-width table, one row per split (percent): top-1, top-5 (with more than 10
    classes), balanced accuracy (the mean of the per-class accuracies), many / medium / few,
    ECE and the number of images."""
    top5 = any(shows_top5(len(m.get("per_class") or ())) for m in results.values())
    cols = [("all", "top1", 7)] + ([("top-5", "top5", 7)] if top5 else [])
    cols += [("balanced", "mean_class_acc", 8), ("many", "many", 7), ("medium", "medium", 7)]
    cols += [("few", "few", 7), ("ECE", "ece", 6)]
    header = f"{'split':<8} " + " ".join(f"{t:>{w}}" for t, _, w in cols) + f" {'n':>7}"
    lines = [header, "-" * len(header)]
    for split, m in results.items():
        cells = " ".join(f"{fmt_pct(m.get(k)):>{w}}" for _, k, w in cols)
        lines.append(f"{split:<8} {cells} {m.get('num_samples', ''):>7}")
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
    out: list[list[float]] = [[], [], [], []]
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
