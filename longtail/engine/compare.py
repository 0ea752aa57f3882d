"""Finished runs side by side (``longtail compare RUN_DIR...``): a Markdown table and one
self-contained HTML file (plots embedded as base64 PNG, no external assets).

Per run (name, seed): top-1, top-5 (more than 10 classes), balanced accuracy (the mean of the
per-class accuracies), many / medium / few, ECE, training time and images/s; the config keys
whose values differ between the runs (the saved ``config.yaml`` trees, flattened to dotted keys);
per-class accuracy against frequency rank overlaid, and the training curves overlaid. The HTML
renderer (:class:`Table`, :func:`html_report`) also renders the bench suites' reports.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from longtail.core.errors import LongtailError
from longtail.core.io import atomic_write_text
from longtail.core.metrics import shot_groups
from longtail.core.run_folder import RunFolder
from longtail.engine.plots import (
    eval_points,
    frequency_order,
    integer_epochs,
    new_figure,
    png_bytes,
)
from longtail.engine.report import shows_top5

MARKDOWN_FILE = "compare.md"
HTML_FILE = "compare.html"
OVERLAY_POINTS = 25  # above this many classes, per-class curves show means over rank bins
DASH = "–"


# ---------------------------------------------------------------------------------------------
# formatting


def pct(x: Any) -> str:
    return DASH if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def duration(seconds: Any) -> str:
    """``42s``, ``3m05s``, ``2h07m``; ``–`` when unknown."""
    if seconds is None:
        return DASH
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def value_text(v: Any) -> str:
    """A config value as YAML would show it (strings bare, the rest as JSON)."""
    if isinstance(v, str):
        return v
    return json.dumps(v, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# the renderer: tables, figures, one HTML page


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


_CODE = re.compile(r"`([^`]+)`")


def inline_html(text: str) -> str:
    """The Markdown of a table cell or paragraph as HTML: escaped, `code` spans, \\* escapes."""
    text = str(text)
    if len(text) > 2 and text[0] == text[-1] == "_" and "_" not in text[1:-1]:
        return f"<em>{inline_html(text[1:-1])}</em>"
    out = html.escape(text.replace("\\*", "*").replace("\\|", "|"), quote=False)
    return _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", out)


@dataclass
class Table:
    """A table rendered as Markdown or HTML. ``align``: "l" / "r" per column; ``row_data``:
    ``data-*`` attributes per HTML row (e.g. the run and seed it names)."""

    headers: Sequence[str]
    rows: Sequence[Sequence[str]]
    align: Sequence[str] = ()
    id: str = ""
    caption: str = ""
    row_data: Sequence[Dict[str, str]] = ()

    def _align(self, i: int) -> str:
        return self.align[i] if i < len(self.align) else "l"

    def markdown(self) -> str:
        lines = [
            "| " + " | ".join(_md_cell(h) for h in self.headers) + " |",
            "|"
            + "|".join("--:" if self._align(i) == "r" else "---" for i in range(len(self.headers)))
            + "|",
        ]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def html(self) -> str:
        def cls(i: int) -> str:
            return ' class="num"' if self._align(i) == "r" else ""

        ident = f' id="{html.escape(self.id)}"' if self.id else ""
        out = [f'<div class="scroll"><table{ident}>']
        if self.caption:
            out.append(f"<caption>{inline_html(self.caption)}</caption>")
        out.append(
            "<thead><tr>"
            + "".join(f"<th{cls(i)}>{inline_html(h)}</th>" for i, h in enumerate(self.headers))
            + "</tr></thead><tbody>"
        )
        for r, row in enumerate(self.rows):
            data = self.row_data[r] if r < len(self.row_data) else {}
            attrs = "".join(
                f' data-{k}="{html.escape(str(v), quote=True)}"' for k, v in data.items()
            )
            out.append(
                f"<tr{attrs}>"
                + "".join(f"<td{cls(i)}>{inline_html(c)}</td>" for i, c in enumerate(row))
                + "</tr>"
            )
        out.append("</tbody></table></div>")
        return "\n".join(out)


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: Sequence[str]


@dataclass
class Image:
    """A PNG embedded in the page (a data: URI)."""

    png: bytes
    caption: str = ""
    alt: str = ""


Block = Union[Heading, Paragraph, Bullets, Table, Image]

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.scroll { overflow-x: auto; margin: 0.8em 0; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; white-space: nowrap; }
th { background: #f2f4f7; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 0.3em 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
code { background: #f2f4f7; padding: 0 0.2em; border-radius: 3px; }
"""


def image_size(png: bytes) -> Tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def html_report(title: str, blocks: Sequence[Block]) -> str:
    """One self-contained HTML page: inline CSS, images as data: URIs, no script, no link."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{inline_html(title)}</h1>",
    ]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            out.append(f"<p>{inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            out.append(b.html())
        elif isinstance(b, Image):
            w, h = image_size(b.png)
            data = base64.b64encode(b.png).decode("ascii")
            alt = html.escape(b.alt or b.caption, quote=True)
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" width="{w}" height="{h}" '
                f'alt="{alt}">'
                + (f"<figcaption>{inline_html(b.caption)}</figcaption>" if b.caption else "")
                + "</figure>"
            )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def blocks_markdown(blocks: Sequence[Block]) -> str:
    """The text blocks as Markdown (images are left to the HTML)."""
    out: List[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Paragraph):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {i}" for i in b.items] + [""]
        elif isinstance(b, Table):
            out += ([f"**{b.caption}**", ""] if b.caption else []) + [b.markdown(), ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# runs


@dataclass
class RunRecord:
    """A finished run folder: its name in the report, metrics, config tree and history."""

    name: str
    path: Path
    metrics: Dict[str, Any]
    config: Dict[str, Any]
    history: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def class_counts(self) -> List[int]:
        return [int(n) for n in self.metrics.get("class_counts") or []]

    @property
    def num_classes(self) -> int:
        return len(self.metrics.get("class_counts") or self.metrics.get("per_class") or [])

    @property
    def label(self) -> str:
        return f"{self.name} (seed {self.seed})"


def _history(folder: RunFolder, config: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The run's history rows; a multi-stage run (no history of its own): its last stage's."""
    rows = folder.read_history()
    stages = config.get("stages") or []
    if not rows and stages and isinstance(stages[-1], dict) and stages[-1].get("name"):
        rows = RunFolder(folder.path / str(stages[-1]["name"])).read_history()
    return rows


def default_names(paths: Sequence[Path]) -> List[str]:
    """The folder names; where two are equal, enough parent folders to tell them apart."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def load_runs(
    paths: Sequence[Union[str, Path]], names: Optional[Sequence[str]] = None
) -> List[RunRecord]:
    """The finished runs in ``paths`` (LongtailError naming the first that is not one)."""
    if not paths:
        raise LongtailError("No run folder given. Usage: longtail compare RUN_DIR [RUN_DIR ...].")
    if names is not None and len(names) != len(paths):
        raise LongtailError(
            f"--names gives {len(names)} names for {len(paths)} run folders: give one name per "
            f"run folder, in the same order."
        )
    names = list(names) if names is not None else default_names([Path(p) for p in paths])
    runs = []
    for name, p in zip(names, paths):
        folder = RunFolder(p)
        config = folder.config_tree()  # LongtailError when it is no run folder
        metrics = folder.read_metrics()
        if metrics is None:
            raise LongtailError(
                f"{folder.path} has not finished (no readable {folder.METRICS}). Compare finished "
                f"runs; continue this one with `longtail train --resume {folder.path}`."
            )
        runs.append(RunRecord(str(name), folder.path, metrics, config, _history(folder, config)))
    return runs


# ---------------------------------------------------------------------------------------------
# the comparison


def metrics_table(runs: Sequence[RunRecord], table_id: str = "metrics") -> Table:
    """One row per run: name, seed, dataset, epochs, top-1, top-5 (when some run has more than
    10 classes), balanced, many / medium / few, ECE (test, %), val top-1 (when some run has a
    val split), training time and images/s."""
    top5 = any(shows_top5(r.num_classes) for r in runs)
    val = any(isinstance(r.metrics.get("val"), dict) for r in runs)
    headers = ["run", "seed", "dataset", "epochs", "top-1"] + (["top-5"] if top5 else [])
    headers += ["balanced", "many", "medium", "few", "ECE"] + (["val top-1"] if val else [])
    headers += ["train time", "img/s"]
    rows, data = [], []
    for r in runs:
        m = r.metrics
        ips = m.get("images_per_s")
        cells = [r.name, str(r.seed), str(m.get("dataset", DASH)), str(m.get("epochs", DASH))]
        cells.append(pct(m.get("top1")))
        if top5:
            cells.append(pct(m.get("top5")) if shows_top5(r.num_classes) else DASH)
        cells += [pct(m.get(k)) for k in ("mean_class_acc", "many", "medium", "few", "ece")]
        if val:
            cells.append(pct((m.get("val") or {}).get("top1")))
        cells += [duration(m.get("train_seconds")), DASH if ips is None else f"{ips:.0f}"]
        rows.append(cells)
        data.append({"run": r.name, "seed": str(r.seed)})
    return Table(headers, rows, ["l", "r", "l"] + ["r"] * (len(headers) - 3), table_id, "", data)


def flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """A config tree as dotted keys (``optim.lr``); lists of sections by index
    (``stages[1].optim.lr``), lists of values as one value."""
    if isinstance(tree, dict):
        out: Dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        if not tree and prefix:
            out[prefix] = {}
        return out
    if isinstance(tree, list) and any(isinstance(x, (dict, list)) for x in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: tree}


ABSENT = "(absent)"


def config_differences(trees: Sequence[Dict[str, Any]]) -> List[Tuple[str, List[str]]]:
    """The flattened keys whose values are not the same in every tree, in first-seen order,
    with each tree's value as text (``(absent)`` where a tree lacks the key)."""
    flat = [flatten(t) for t in trees]
    keys: Dict[str, None] = {}
    for f in flat:
        keys.update(dict.fromkeys(f))
    out = []
    for k in keys:
        values = [value_text(f[k]) if k in f else ABSENT for f in flat]
        if len(set(values)) > 1:
            out.append((k, values))
    return out


def differences_table(runs: Sequence[RunRecord], table_id: str = "config-diff") -> Table:
    diffs = config_differences([r.config for r in runs])
    return Table(
        ["config key", *(r.label for r in runs)],
        [[f"`{k}`", *values] for k, values in diffs],
        id=table_id,
    )


def _colours(n: int) -> List[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _rank_bins(values: Sequence[Optional[float]], size: int) -> Tuple[List[float], List[float]]:
    """Means of consecutive ``size`` values (None skipped) at their centre rank (1-based)."""
    xs, ys = [], []
    for start in range(0, len(values), size):
        chunk = [v for v in values[start : start + size] if v is not None]
        if chunk:
            xs.append(start + (min(size, len(values) - start) + 1) / 2)
            ys.append(sum(chunk) / len(chunk))
    return xs, ys


def _palette(runs: Sequence[RunRecord], colours: Optional[Dict[int, Any]]) -> List[Any]:
    """One colour per run: ``colours`` (by ``id(run)``) where given, else by position."""
    own = _colours(len(runs))
    return [(colours or {}).get(id(r), own[i]) for i, r in enumerate(runs)]


def _plain_log_ticks(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def per_class_overlay(
    runs: Sequence[RunRecord], title: str = "", colours: Optional[Dict[int, Any]] = None
) -> Optional[bytes]:
    """PNG: per-class test accuracy of each run against the class's training-frequency rank
    (most frequent first; the runs share ``class_counts``), the training count on a second axis,
    dashed lines at the many / medium / few boundaries. Above OVERLAY_POINTS classes each point
    is the mean over a bin of consecutive ranks. None when no run has per-class accuracies."""
    runs = [r for r in runs if r.metrics.get("per_class") and r.class_counts]
    if not runs:
        return None
    counts = runs[0].class_counts
    order = frequency_order(counts)
    c = len(order)
    size = 1 if c <= OVERLAY_POINTS * 1.6 else math.ceil(c / OVERLAY_POINTS)
    many = len(runs) > 5
    fig = new_figure(9.5, 5.0 + (0.22 * math.ceil(len(runs) / 2) if many else 0))
    ax = fig.add_subplot(1, 1, 1)
    for r, colour in zip(runs, _palette(runs, colours)):
        acc = [r.metrics["per_class"][k] for k in order]
        xs, ys = _rank_bins(acc, size)
        label = f"{r.label}: top-1 {pct(r.metrics.get('top1'))}, balanced {pct(r.metrics.get('mean_class_acc'))}"
        ax.plot(
            xs, ys, marker="o" if len(xs) <= 60 else None, ms=4, lw=1.4, color=colour, label=label
        )
    twin = ax.twinx()
    twin.step(
        range(1, c + 1), [counts[k] for k in order], where="mid", color="grey", lw=1, alpha=0.6
    )
    twin.set_yscale("log")
    _plain_log_ticks(twin)
    twin.set_ylabel("training images of the class (grey, log scale)", color="dimgrey")
    group = {k: g for g, cs in shot_groups(counts).items() for k in cs}
    for rank in range(1, c):
        if group[order[rank - 1]] != group[order[rank]]:
            ax.axvline(rank + 0.5, color="tab:red", lw=0.8, ls="--")
    ax.set_xlim(0.5, c + 0.5)
    ax.set_ylim(-2, 102)
    ax.set_xlabel(
        "class rank by training frequency (1 = most images)"
        + (f"; each point: mean over {size} consecutive classes" if size > 1 else "")
    )
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_title(
        (title or f"per-class accuracy, {runs[0].metrics.get('dataset', '')}")
        + " (dashed: many | medium | few)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    else:
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return png_bytes(fig)


def curves_overlay(
    runs: Sequence[RunRecord], colours: Optional[Dict[int, Any]] = None
) -> Optional[bytes]:
    """PNG: each run's training loss per epoch and test top-1 at its evaluations (the final
    one included). None when no run has history rows."""
    runs = [r for r in runs if r.history]
    if not runs:
        return None
    many = len(runs) > 5
    fig = new_figure(11.0, 4.2 + (0.22 * math.ceil(len(runs) / 2) if many else 0))
    loss_ax, acc_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for r, colour in zip(runs, _palette(runs, colours)):
        epochs = [int(h["epoch"]) for h in r.history]
        loss_ax.plot(
            epochs,
            [h.get("loss") for h in r.history],
            color=colour,
            label=r.label,
            marker="o" if len(epochs) <= 30 else None,
            ms=3,
        )
        points = eval_points(r.history, {"test": r.metrics}).get("test", [])
        pts = [(e, m["top1"]) for e, m in points if m.get("top1") is not None]
        if pts:
            acc_ax.plot(*zip(*pts), marker="o", ms=4, color=colour, label=r.label)
    loss_ax.set_title("training loss (mean over the epoch)", fontsize=10)
    loss_ax.set_ylabel("loss")
    acc_ax.set_title("test top-1 at the evaluations", fontsize=10)
    acc_ax.set_ylabel("top-1 (%)")
    acc_ax.set_ylim(-2, 102)
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        integer_epochs(ax)
    if many:
        fig.legend(*loss_ax.get_legend_handles_labels(), fontsize=7, loc="lower center", ncol=3)
        fig.tight_layout(rect=(0, 0.06 * math.ceil(len(runs) / 3), 1, 1))
    else:
        loss_ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
    return png_bytes(fig)


def _by_classes(runs: Sequence[RunRecord]) -> List[List[RunRecord]]:
    """The runs in groups sharing their training class counts (one dataset, one subset)."""
    groups: Dict[Tuple[int, ...], List[RunRecord]] = {}
    for r in runs:
        groups.setdefault(tuple(r.class_counts), []).append(r)
    return list(groups.values())


def compare_blocks(runs: Sequence[RunRecord], figures: bool = True) -> List[Block]:
    """The comparison's sections: metrics, config differences, per-class and training curves."""
    blocks: List[Block] = [
        Heading("Runs"),
        metrics_table(runs),
        Paragraph(
            "Accuracies in % on the test split: top-1; top-5 (runs with more than 10 classes); "
            "balanced: the mean of the per-class accuracies; many / medium / few: the mean "
            "class accuracy of the classes with > 100, 20-100, < 20 training images; ECE: "
            "expected calibration error (15 bins). Train time: the epochs' training time "
            "(evaluations excluded); img/s: training images per second."
        ),
        Heading("Config differences"),
    ]
    diffs = differences_table(runs)
    if diffs.rows:
        blocks += [
            Paragraph(
                f"The {len(diffs.rows)} keys of the saved `config.yaml` whose values differ "
                f"between the runs (every other key is equal in all of them):"
            ),
            diffs,
        ]
    else:
        blocks.append(Paragraph("The runs' saved configs are identical."))
    blocks.append(
        Paragraph("Run folders: " + "; ".join(f"{r.name}: `{r.path}`" for r in runs) + ".")
    )
    if not figures:
        return blocks
    colours = {id(r): c for r, c in zip(runs, _colours(len(runs)))}  # a run's colour everywhere
    overlays = []
    for members in _by_classes(runs):
        png = per_class_overlay(members, colours=colours)
        if png is not None:
            names = ", ".join(r.name for r in members)
            overlays.append(
                Image(png, f"Per-class test accuracy against frequency rank ({names}).")
            )
    if overlays:
        blocks += [Heading("Per-class accuracy"), *overlays]
    curves = curves_overlay(runs, colours)
    if curves is not None:
        blocks += [
            Heading("Training curves"),
            Image(curves, "Training loss per epoch and test top-1 at the evaluations."),
        ]
    return blocks


def compare_markdown(runs: Sequence[RunRecord], html_name: str = HTML_FILE) -> str:
    title = f"# Comparison of {len(runs)} runs"
    body = blocks_markdown(compare_blocks(runs, figures=False))
    return f"{title}\n\n{body}\nPlots: `{html_name}` (per-class accuracy, training curves).\n"


def write_compare(
    runs: Sequence[RunRecord], out_dir: Union[str, Path], title: str = ""
) -> Tuple[Path, Path]:
    """``OUT/compare.md`` and ``OUT/compare.html`` (one file, plots embedded); returns both."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, page = out / MARKDOWN_FILE, out / HTML_FILE
    atomic_write_text(md, compare_markdown(runs))
    heading = title or f"Comparison of {len(runs)} runs"
    atomic_write_text(page, html_report(heading, compare_blocks(runs)))
    return md, page
