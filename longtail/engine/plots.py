"""The pictures of a run folder: training curves, the confusion matrix, accuracy against class
frequency (engine/report.py) and the method's own per-epoch curves, as PNG files.

``plot_run(run_dir, results, class_counts)`` writes them all from ``history.jsonl`` rows (one per
epoch: ``loss``, ``lr``, ``test`` / ``val`` evaluations where ``train.eval_every`` asked for
them) and the final results. Figures are drawn with matplotlib's Agg canvas (no display, no
global pyplot state); each file is written atomically.
"""

from __future__ import annotations

import io as _io
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from longtail.core import io
from longtail.core.metrics import shot_groups
from longtail.core.run_folder import RunFolder
from longtail.engine.report import plot_per_class

CURVES_PLOT = "training_curves.png"
CONFUSION_PLOT = "confusion_matrix.png"
METHOD_PLOT = "method_curves.png"

# history keys every run writes (training_curves.png); any other numeric key is the method's
STANDARD_KEYS = frozenset({"epoch", "lr", "loss", "images_per_s", "seconds"})
EVAL_SPLITS = ("test", "val")
SPLIT_COLOUR = {"test": "tab:blue", "val": "tab:orange"}
GROUP_COLOUR = {"many": "tab:green", "medium": "tab:purple", "few": "tab:red"}
CONFUSION_CLASSES = 30  # above: classes binned into CONFUSION_GROUPS groups of consecutive rank
CONFUSION_GROUPS = 20
ANNOTATE_BELOW = 13  # cells get their percentage written in them up to this many rows


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (independent of pyplot and its backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_png(fig, path: Path) -> Path:
    """Write the figure to ``path`` atomically."""
    data = png_bytes(fig)
    io.atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))
    return Path(path)


def integer_epochs(ax) -> None:
    """Whole-epoch ticks, also for a one-epoch run (min_n_ticks=1: no 0.5 ... 1.5 fallback)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _marker(n: int) -> Optional[str]:
    return "o" if n <= 30 else None


# ---------------------------------------------------------------------------------------------
# training curves


def eval_points(
    history: Sequence[Dict[str, Any]],
    results: Optional[Dict[str, Dict[str, Any]]] = None,
) -> Dict[str, List[Tuple[int, Dict[str, Any]]]]:
    """Per split: (epoch, evaluation) from the history rows; the final results are added at the
    last epoch when the last row does not hold that split's evaluation already."""
    out: Dict[str, List[Tuple[int, Dict[str, Any]]]] = {}
    for row in history:
        for split in EVAL_SPLITS:
            if isinstance(row.get(split), dict):
                out.setdefault(split, []).append((int(row["epoch"]), row[split]))
    last = int(history[-1]["epoch"]) if history else 0
    for split, m in (results or {}).items():
        if split in EVAL_SPLITS and isinstance(m, dict) and last:
            points = out.setdefault(split, [])
            if not points or points[-1][0] != last:
                points.append((last, m))
    return out


def _series(points: Sequence[Tuple[int, Dict[str, Any]]], key: str):
    pts = [(e, m.get(key)) for e, m in points if m.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(
    path: Path,
    history: Sequence[Dict[str, Any]],
    results: Optional[Dict[str, Dict[str, Any]]] = None,
    title: str = "",
) -> Optional[Path]:
    """training_curves.png (:func:`curves_figure`); None (nothing written) without history."""
    fig = curves_figure(history, results, title)
    return None if fig is None else save_png(fig, path)


def curves_figure(
    history: Sequence[Dict[str, Any]],
    results: Optional[Dict[str, Dict[str, Any]]] = None,
    title: str = "",
):
    """Loss and learning rate per epoch; where evaluations exist, top-1 and balanced accuracy of
    test / val and the test split's many / medium / few accuracy. None without history rows."""
    rows = [r for r in history if "epoch" in r]
    if not rows:
        return None
    epochs = [int(r["epoch"]) for r in rows]
    evals = eval_points(rows, results)
    panels = 4 if evals else 2
    fig = new_figure(10.0, 7.0 if panels == 4 else 3.6)
    axes = [fig.add_subplot(2 if panels == 4 else 1, 2, i + 1) for i in range(panels)]
    mk = _marker(len(epochs))

    ax = axes[0]
    ax.plot(epochs, [r.get("loss") for r in rows], marker=mk, color="tab:blue", label="train loss")
    ax.set_title("training loss (mean over the epoch)")
    ax.set_ylabel("loss")
    ax = axes[1]
    ax.plot(epochs, [r.get("lr") for r in rows], marker=mk, color="tab:green", label="lr")
    ax.set_title("learning rate (last step of the epoch)")
    ax.set_ylabel("lr")
    ax.set_ylim(0, 1.1 * max([float(r.get("lr") or 0.0) for r in rows] + [1e-12]))
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    if evals:
        ax = axes[2]
        for split, points in evals.items():
            colour = SPLIT_COLOUR.get(split)
            x, y = _series(points, "top1")
            ax.plot(x, y, marker="o", color=colour, label=f"{split} top-1")
            x, y = _series(points, "mean_class_acc")
            if x:
                ax.plot(
                    x,
                    y,
                    marker="s",
                    ms=9,
                    mfc="none",
                    ls="--",
                    color=colour,
                    label=f"{split} balanced",
                )
        ax.set_title("accuracy at the evaluations")
        ax.set_ylabel("accuracy (%)")
        ax = axes[3]
        split = "test" if "test" in evals else next(iter(evals))
        for group, colour in GROUP_COLOUR.items():
            x, y = _series(evals[split], group)
            if x:
                ax.plot(x, y, marker="o", color=colour, label=group)
        ax.set_title(f"{split}: many / medium / few-shot accuracy")
        ax.set_ylabel("mean class accuracy (%)")
        for ax in axes[2:]:
            ax.set_ylim(-2, 102)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_xlim(0.5, max(epochs) + 0.5)
        integer_epochs(ax)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title or "training curves")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# confusion matrix


def frequency_order(class_counts: Sequence[int]) -> List[int]:
    """Class ids from the most to the least frequent in training (ties: by id)."""
    return sorted(range(len(class_counts)), key=lambda c: (-int(class_counts[c]), c))


def binned_confusion(
    confusion: np.ndarray, class_counts: Sequence[int], groups: Optional[int] = None
) -> Tuple[np.ndarray, List[List[int]]]:
    """The row-normalised confusion matrix with classes in frequency order, and the classes of
    each row / column.

    With ``groups`` (classes binned: consecutive frequency ranks, equal numbers of classes but
    the last), cell (g, h) is the share of group g's test images predicted as a class of group
    h; the diagonal then counts confusions inside a group as hits. Rows without test images are
    NaN."""
    order = frequency_order(class_counts)
    c = len(order)
    size = 1 if not groups or c <= groups else math.ceil(c / groups)
    members = [order[i : i + size] for i in range(0, c, size)]
    m = np.asarray(confusion, dtype=np.float64)[np.ix_(order, order)]
    if size > 1:
        edges = np.arange(0, c, size)
        m = np.add.reduceat(np.add.reduceat(m, edges, axis=0), edges, axis=1)
    totals = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normed = np.where(totals > 0, m / np.where(totals > 0, totals, 1), np.nan)
    return normed, members


def _group_label(members: Sequence[int], class_counts: Sequence[int], rank0: int) -> str:
    lo, hi = min(class_counts[c] for c in members), max(class_counts[c] for c in members)
    ranks = f"{rank0 + 1}-{rank0 + len(members)}"
    return f"{ranks} (n {hi})" if lo == hi else f"{ranks} (n {hi}-{lo})"


def _boundaries(class_counts: Sequence[int], size: int) -> List[float]:
    """Cell positions where the many / medium / few groups change along the frequency order
    (fractional inside a bin of ``size`` classes that straddles a change)."""
    group = {c: g for g, cs in shot_groups(class_counts).items() for c in cs}
    order = frequency_order(class_counts)
    return [r / size - 0.5 for r in range(1, len(order)) if group[order[r - 1]] != group[order[r]]]


def plot_confusion(
    path: Path,
    confusion: Any,
    class_counts: Sequence[int],
    class_names: Optional[Sequence[str]] = None,
    title: str = "",
) -> Optional[Path]:
    """confusion_matrix.png (:func:`confusion_figure`); None (nothing written) without a
    matrix."""
    fig = confusion_figure(confusion, class_counts, class_names, title)
    return None if fig is None else save_png(fig, path)


def confusion_figure(
    confusion: Any,
    class_counts: Sequence[int],
    class_names: Optional[Sequence[str]] = None,
    title: str = "",
):
    """The test confusion matrix (rows: true class, columns: predicted), row-normalised, classes
    from the most to the least frequent in training; above CONFUSION_CLASSES classes, binned into
    CONFUSION_GROUPS groups of consecutive frequency rank. None without a matrix (beyond 1,000
    classes metrics keep none)."""
    if confusion is None or len(confusion) == 0:
        return None
    c = len(class_counts)
    groups = CONFUSION_GROUPS if c > CONFUSION_CLASSES else None
    m, members = binned_confusion(np.asarray(confusion), class_counts, groups)
    k = len(members)
    binned = k < c
    side = min(9.0, max(5.0, 0.3 * k + 3.0))
    fig = new_figure(side + 1.6, side)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(m * 100.0), cmap="Blues", vmin=0, vmax=100)
    cbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label(
        "% of the true group's test images" if binned else "% of the true class's test images"
    )
    if binned:
        labels, rank = [], 0
        for cs in members:
            labels.append(_group_label(cs, class_counts, rank))
            rank += len(cs)
        ax.set_xlabel(f"predicted: class group (frequency ranks, {len(members[0])} classes each)")
        ax.set_ylabel("true: class group (frequency ranks; n = training images)")
    else:
        names = [str(class_names[cl]) if class_names else str(cl) for cl in range(c)]
        labels = [f"{names[cs[0]]} ({class_counts[cs[0]]})" for cs in members]
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class (training images)")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticklabels(labels, fontsize=7)
    if k < ANNOTATE_BELOW:
        for i in range(k):
            for j in range(k):
                if not np.isnan(m[i, j]) and m[i, j] >= 0.005:
                    ax.text(
                        j,
                        i,
                        f"{100 * m[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if m[i, j] > 0.6 else "black",
                    )
    for b in _boundaries(class_counts, len(members[0])):
        ax.axhline(b, color="tab:red", lw=0.8, ls="--")
        ax.axvline(b, color="tab:red", lw=0.8, ls="--")
    what = f"{c} classes in {k} groups" if binned else f"{c} classes"
    ax.set_title(
        (title + "\n" if title else "")
        + f"test confusion, row-normalised ({what}, most frequent first;"
        + "\ndashed: many | medium | few boundaries)",
        fontsize=9,
    )
    if binned:
        fig.text(
            0.01,
            0.005,
            "cell (g, h): share of group g's test images predicted as a class of group h "
            "(the diagonal includes confusions inside a group; per-class accuracy: "
            "per_class_accuracy.png)",
            fontsize=7,
            color="dimgrey",
        )
    fig.tight_layout(rect=(0, 0.02, 1, 1) if binned else None)
    return fig


# ---------------------------------------------------------------------------------------------
# method curves


def method_keys(history: Sequence[Dict[str, Any]]) -> List[str]:
    """The numeric history keys a method or hook added (first-seen order)."""
    keys: Dict[str, None] = {}
    for row in history:
        for k, v in row.items():
            if k in STANDARD_KEYS or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            keys.setdefault(k, None)
    return list(keys)


STAT_SUFFIXES = ("mean", "min", "max")


def method_panels(keys: Sequence[str]) -> Dict[str, List[str]]:
    """Panels of the method figure: ``x_mean`` / ``x_min`` / ``x_max`` share one (``x``), every
    other key has its own."""
    panels: Dict[str, List[str]] = {}
    for k in keys:
        stem, _, suffix = k.rpartition("_")
        if (
            stem
            and suffix in STAT_SUFFIXES
            and any(
                o != k and o.rpartition("_")[0] == stem and o.rpartition("_")[2] in STAT_SUFFIXES
                for o in keys
            )
        ):
            panels.setdefault(stem, []).append(k)
        else:
            panels.setdefault(k, []).append(k)
    return panels


def plot_method_curves(
    path: Path, history: Sequence[Dict[str, Any]], title: str = ""
) -> Optional[Path]:
    """method_curves.png (:func:`method_figure`); None (nothing written) without method keys."""
    fig = method_figure(history, title)
    return None if fig is None else save_png(fig, path)


def method_figure(history: Sequence[Dict[str, Any]], title: str = ""):
    """Every numeric per-epoch value a method or hook adds to history.jsonl (KD loss, memory
    sizes, margin ramps, a learned learning rate ...), one panel each (mean / min / max of one
    quantity together). None when there is none."""
    keys = method_keys(history)
    if not keys:
        return None
    panels = method_panels(keys)
    n = len(panels)
    cols = min(3, n)
    rows_n = math.ceil(n / cols)
    fig = new_figure(4.2 * cols, 3.2 * rows_n + 0.5)
    for i, (name, members) in enumerate(panels.items()):
        ax = fig.add_subplot(rows_n, cols, i + 1)
        for k in members:
            pts = [
                (int(r["epoch"]), r[k])
                for r in history
                if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
            ]
            ax.plot(*zip(*pts), marker=_marker(len(pts)), label=k)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name if len(members) == 1 else f"{name} (per epoch)")
        integer_epochs(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title or "method curves (values the method records per epoch)")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# all of a run's plots


def plot_run(
    run_dir: Path,
    results: Dict[str, Dict[str, Any]],
    class_counts: Sequence[int],
    history: Optional[Sequence[Dict[str, Any]]] = None,
    class_names: Optional[Sequence[str]] = None,
    title: str = "",
) -> Dict[str, Path]:
    """Every plot of a finished run into ``run_dir``: training curves, the test confusion matrix,
    accuracy against class frequency and the method's curves (those with something to show).
    ``history``: the history rows (default: read from the folder's history.jsonl). Returns the
    written files by kind."""
    folder = RunFolder(run_dir)
    rows = list(folder.read_history() if history is None else history)
    out: Dict[str, Path] = {}
    test = results.get("test") or {}
    for kind, written in (
        ("curves", plot_curves(folder.artifact(CURVES_PLOT), rows, results, title)),
        (
            "confusion",
            plot_confusion(
                folder.artifact(CONFUSION_PLOT),
                test.get("confusion"),
                class_counts,
                class_names,
                title,
            ),
        ),
        ("method", plot_method_curves(folder.artifact(METHOD_PLOT), rows, title)),
    ):
        if written is not None:
            out[kind] = written
    plot_per_class(folder.plot_path, class_counts, results, title=title)
    out["per_class"] = folder.plot_path
    return out
