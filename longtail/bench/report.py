"""Benchmark results: rows from run folders, ``benchmarks/results/<suite>.{md,json}``, and the
``docs/results.md`` page that sets our numbers beside the published ones.

``collect_rows`` reads each planned run's ``metrics.json`` (written by the trainer) and
``bench.json`` (written by the suite runner: wall time, commit, command); ``write_results`` writes
the suite's Markdown + JSON and a self-contained HTML report (``engine/compare.py``'s renderer:
the suite's tables, then its finished run folders compared); ``write_results_doc`` regenerates ``docs/results.md`` from the suite
files and their results JSON (``longtail bench SUITE --report-only``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from longtail.bench.machine import short_machine
from longtail.bench.references import missing_reason, references
from longtail.bench.suite import PlannedRun, Suite, load_suite, plan_suite
from longtail.core.config import split_selectors
from longtail.core.errors import LongtailError
from longtail.core.io import atomic_write_text
from longtail.core.run_folder import RunFolder
from longtail.engine.compare import (
    Block,
    Bullets,
    Heading,
    Paragraph,
    RunRecord,
    Table,
    blocks_markdown,
    compare_blocks,
    duration,
    html_report,
    load_runs,
    pct,
)
from longtail.engine.report import shows_top5

BENCH_FILE = "bench.json"  # per run folder: wall time, commit, command of the bench run
# a row's test numbers (metrics.json keys): top-1, top-5, the shot groups, balanced, ECE
TEST_KEYS = ("top1", "top5", "many", "medium", "few", "mean_class_acc", "ece")
# configs/datasets/<name>.yaml -> its data.dataset (for a run whose config could not be loaded)
_FOLDER_DATASET = {
    "cifar10_lt": "cifar10-lt",
    "cifar100_lt": "cifar100-lt",
    "fashion_mnist_lt": "fashion-mnist-lt",
    "mnist_lt": "mnist-lt",
}
DATASET_LABEL = {
    "cifar10-lt": "CIFAR-10-LT",
    "cifar100-lt": "CIFAR-100-LT",
    "fashion-mnist-lt": "Fashion-MNIST-LT",
    "mnist-lt": "MNIST-LT",
}


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def epochs_done(run_dir: Path) -> int:
    """Finished epochs of an interrupted run (lines of history.jsonl)."""
    return RunFolder(run_dir).epochs_done()


def run_state(run_dir: Path) -> str:
    """done (metrics.json), partial (a run folder without metrics: resumable) or todo."""
    folder = RunFolder(run_dir)
    if folder.is_finished():
        return "done"
    if folder.is_run():
        return "partial"
    return "todo"


def _dataset_and_factor(p: PlannedRun) -> Tuple[str, Optional[float]]:
    if p.cfg is not None:
        return p.cfg.data.dataset, float(p.cfg.data.imbalance_factor)

    selected = split_selectors(p.overrides)[0].get("data")  # the run's data=NAME
    name = Path(selected).stem if selected else p.spec.config.parent.name
    dataset = _FOLDER_DATASET.get(name, name)
    return dataset, float(p.spec.imbalance_factor) if p.spec.imbalance_factor else None


def collect_rows(
    plan: Sequence[PlannedRun],
    statuses: Optional[Dict[str, Tuple[str, str]]] = None,
    baseline: Optional[str] = None,
    previous: Optional[Sequence[Dict[str, Any]]] = None,
) -> List[Dict[str, Any]]:
    """One row per planned run, numbers where its folder holds metrics.json.

    ``statuses`` (name -> (status, message)) overrides the state read from disk for runs that
    failed or were blocked in this invocation. ``previous``: the rows of the suite's results file;
    a finished row whose run folder is not here (another machine, a cleaned disk) is kept as it
    was recorded, marked ``carried``, instead of turning into "todo".
    """
    statuses = statuses or {}
    kept = {r["name"]: r for r in previous or () if r.get("status") == "done"}
    rows: List[Dict[str, Any]] = []
    for p in plan:
        if run_state(p.run_dir) == "todo" and p.name in kept and p.name not in statuses:
            rows.append({**kept[p.name], "carried": True, "group": p.group, "seed": p.seed})
            continue
        dataset, factor = _dataset_and_factor(p)
        state = run_state(p.run_dir)
        row: Dict[str, Any] = {
            "name": p.name,
            "group": p.group,
            "seed": p.seed,
            "method": p.spec.label,
            "config": p.spec.config_text,
            "dataset": dataset,
            "imbalance_factor": factor,
            "stage1": p.spec.stage1,
            "epochs": p.cfg.train.epochs if p.cfg is not None else None,
            "config_epochs": p.base_epochs,
            "run_dir": str(p.run_dir),
            "status": state,
            "train_command": "longtail " + " ".join(_quote(a) for a in p.train_argv()),
        }
        if p.error:
            row.update(status="error", message=p.error)
        if state == "partial":
            row["epochs_done"] = epochs_done(p.run_dir)
        if p.name in statuses and state != "done":
            row["status"], row["message"] = statuses[p.name]
        metrics = RunFolder(p.run_dir).read_metrics() if state == "done" else None
        if metrics is not None:
            val = metrics.get("val") or {}
            row.update(
                {
                    "epochs": metrics.get("epochs", row["epochs"]),
                    "test": {k: metrics.get(k) for k in TEST_KEYS},
                    "num_classes": len(
                        metrics.get("class_counts") or metrics.get("per_class") or []
                    )
                    or None,
                    "val": {k: val.get(k) for k in ("top1", "mean_class_acc", "ece")},
                    "train_seconds": metrics.get("train_seconds"),
                    "images_per_s": metrics.get("images_per_s"),
                    "device": metrics.get("device"),
                }
            )
            for key in ("tau", "tau_val"):
                if key in metrics:
                    row[key] = metrics[key]
            bench = _read_json(p.run_dir / BENCH_FILE) or {}
            row.update(
                {
                    k: bench.get(k)
                    for k in (
                        "wall_seconds",
                        "finished_utc",
                        "git_commit",
                        "git_dirty",
                        "mode",
                        "resumed",
                    )
                }
            )
            if row.get("resumed"):  # the last invocation's wall time covers only part of the run:
                row["wall_seconds_last_invocation"] = row.pop("wall_seconds")  # use train time
        rows.append(row)
    _add_time_cost(rows, baseline)
    return rows


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _add_time_cost(rows: List[Dict[str, Any]], baseline: Optional[str]) -> None:
    """``cost_seconds``: the run's wall time plus that of its stage-1 chain; ``time_vs_baseline``:
    that over the cost of the suite's baseline run (method ``baseline``, no stage 1) of the same
    dataset and IF (None without a baseline)."""
    by_name = {r["name"]: r for r in rows}

    def own(r: Dict[str, Any]) -> Optional[float]:
        return (
            r.get("wall_seconds") if r.get("wall_seconds") is not None else r.get("train_seconds")
        )

    def cost(r: Dict[str, Any], depth: int = 0) -> Optional[float]:
        if r.get("status") != "done" or own(r) is None or depth > len(rows):
            return None
        if r.get("stage1"):
            parent = by_name.get(r["stage1"])
            before = cost(parent, depth + 1) if parent else None
            mine = own(r)
            return None if before is None or mine is None else before + mine
        return own(r)

    for r in rows:
        r["cost_seconds"] = cost(r)
    for r in rows:
        same = [
            c
            for c in rows
            if baseline is not None
            and c["method"] == baseline
            and not c.get("stage1")
            and c["dataset"] == r["dataset"]
            and c["imbalance_factor"] == r["imbalance_factor"]
            and c.get("cost_seconds")
        ]
        same.sort(key=lambda c: c.get("seed") != r.get("seed"))  # the same seed's first
        ce = [c for c in same if c.get("epochs") == r.get("epochs")]
        if r.get("stage1") and not ce:  # a stage-2 run: compare with its own stage-1 run
            ce = [c for c in rows if c["name"] == r["stage1"] and c.get("cost_seconds")]
        if not ce:  # a multi-stage recipe (epochs summed over its stages)
            ce = same
        # a ratio of times measured in two sessions (a carried row and a re-run one) is no
        # measurement: only rows timed alike are compared
        alike = bool(ce) and bool(r.get("carried")) == bool(ce[0].get("carried"))
        r["time_vs_baseline"] = (
            r["cost_seconds"] / ce[0]["cost_seconds"]
            if alike and r.get("cost_seconds") is not None
            else None
        )


# ---------------------------------------------------------------------------------------------
# checks (a suite's ``checks:``: the orderings its results must show)


# a check metric -> (split, key) of a row's numbers
_METRIC_KEYS = {
    "test": ("test", "top1"),
    "val": ("val", "top1"),
    "many": ("test", "many"),
    "medium": ("test", "medium"),
    "few": ("test", "few"),
    "val_mean_class": ("val", "mean_class_acc"),
}


def _metric(row: Dict[str, Any], name: str, suffix: str = "") -> Optional[float]:
    """A check metric of a row (``suffix="_sd"``: its standard deviation over seeds)."""
    split, key = _METRIC_KEYS[name]
    return (row.get(split + suffix) or {}).get(key)


def _mean_sd(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (None with fewer than two values)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def group_rows(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per suite run: its seeds' rows (``group``) as mean, standard deviation and count.

    ``status`` is done when every planned seed is done (else the first unfinished seed's);
    ``test`` / ``val`` hold the means over the finished seeds, ``test_sd`` / ``val_sd`` their
    sample standard deviations (None for one seed), ``n`` the finished seeds."""
    order: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        order.setdefault(r.get("group") or r["name"], []).append(r)
    out = []
    for name, members in order.items():
        done = [r for r in members if r.get("status") == "done"]
        first = members[0]
        g: Dict[str, Any] = {
            k: first.get(k)
            for k in ("method", "dataset", "imbalance_factor", "stage1", "epochs", "config")
        }
        unfinished = [r for r in members if r.get("status") != "done"]
        g.update(
            name=name,
            seeds=[r.get("seed") for r in members],
            n=len(done),
            planned=len(members),
            status="done" if not unfinished else unfinished[0].get("status"),
            carried=any(r.get("carried") for r in done),
            members=[r["name"] for r in members],
        )
        if done:
            g["epochs"] = done[0].get("epochs", g["epochs"])
            g["num_classes"] = done[0].get("num_classes")
        for split, keys in (
            ("test", TEST_KEYS),
            ("val", ("top1", "mean_class_acc", "ece")),
        ):
            means, sds = {}, {}
            for k in keys:
                given = [(r.get(split) or {}).get(k) for r in done]
                vals = [float(v) for v in given if v is not None]
                means[k], sds[k] = _mean_sd(vals) if len(vals) == len(done) else (None, None)
            g[split], g[f"{split}_sd"] = means, sds
        for k in ("wall_seconds", "train_seconds", "images_per_s", "time_vs_baseline"):
            known = [r.get(k) for r in done]
            g[k] = (
                _mean_sd([float(v) for v in known if v is not None])[0]
                if done and None not in known
                else None
            )
        out.append(g)
    return out


def _metric_sd(group: Dict[str, Any], name: str) -> Optional[float]:
    return _metric(group, name, "_sd")


def evaluate_checks(
    checks: Sequence[Dict[str, Any]], rows: Sequence[Dict[str, Any]]
) -> List[Dict[str, Any]]:
    """One result per (check, metric), on the means over each run's seeds: both means, their
        difference and its standard error ``se`` = sqrt(sd_a^2 / n_a + sd_b^2 / n_b) (terms of runs
        with two or more seeds). ``pass`` when ``run - beats >= by``; ``noise`` when it falls short by
        less than 2 se (the seeds do not tell the two apart at that margin); ``fail`` otherwise;
        ``pending`` while a run has no finished seed (or the metric is empty, e.g. no few-shot class).
    A run with some of its seeds finished is compared on those (``n`` of ``planned``)."""
    groups = {g["name"]: g for g in group_rows(rows)}
    out = []
    for c in checks:
        a, b = groups.get(c["run"], {}), groups.get(c["beats"], {})
        for metric in c["metrics"]:
            x = _metric(a, metric) if a.get("n") else None
            y = _metric(b, metric) if b.get("n") else None
            diff = None if x is None or y is None else x - y
            terms = [
                (sd / math.sqrt(g["n"])) ** 2
                for g in (a, b)
                if g.get("n") and (sd := _metric_sd(g, metric)) is not None
            ]
            se = math.sqrt(sum(terms)) if terms and diff is not None else None
            if diff is None:
                status = "pending"
            elif diff >= c["by"] - 1e-9:
                status = "pass"
            elif se is not None and diff >= c["by"] - 2 * se:
                status = "noise"
            else:
                status = "fail"
            out.append(
                {
                    **c,
                    "metric": metric,
                    "value": x,
                    "other": y,
                    "value_sd": _metric_sd(a, metric) if x is not None else None,
                    "other_sd": _metric_sd(b, metric) if y is not None else None,
                    "n": a.get("n"),
                    "other_n": b.get("n"),
                    "planned": a.get("planned"),
                    "other_planned": b.get("planned"),
                    "diff": diff,
                    "se": se,
                    "status": status,
                }
            )
    return out


CHECK_LABEL = {"pass": "PASS", "fail": "FAIL", "noise": "within noise", "pending": "PENDING"}


def spread(mean: Any, sd: Any, n: Any = None, planned: Any = None) -> str:
    """``74.20 ± 1.03 (3)`` for a mean over seeds (the count when given; ``2 of 3`` while a seed
    is missing), ``74.20`` for one seed of one."""
    if mean is None:
        return "–"
    count = f"{n} of {planned}" if n and planned and n < planned else (str(n) if n else "")
    text = f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f}"
    return text + (f" ({count})" if count and (sd is not None or n != planned) else "")


def checks_table(results: Sequence[Dict[str, Any]]) -> str:
    return checks_cells(results).markdown()


def checks_cells(results: Sequence[Dict[str, Any]]) -> Table:
    """The checks as a table (Markdown or HTML)."""
    cells = []
    for r in results:
        diff = "–" if r["diff"] is None else f"{r['diff']:+.2f}"
        if r["diff"] is not None and r.get("se") is not None:
            diff += f" ± {r['se']:.2f}"
        cells.append(
            [
                r.get("claim") or "–",
                f"`{r['run']}`",
                f"`{r['beats']}`",
                r["metric"],
                spread(r["value"], r.get("value_sd"), r.get("n"), r.get("planned")),
                spread(r["other"], r.get("other_sd"), r.get("other_n"), r.get("other_planned")),
                diff,
                f">= {r['by']:+.1f}" if r["by"] else ">= 0",
                CHECK_LABEL[r["status"]],
            ]
        )
    headers = ["claim", "run", "beats", "on", "run", "other", "difference", "needed", "result"]
    return Table(headers, cells, ["l"] * 4 + ["r"] * 4 + ["l"], id="checks")


def checks_summary(results: Sequence[Dict[str, Any]]) -> str:
    counts = {k: sum(r["status"] == k for r in results) for k in CHECK_LABEL}
    return (
        f"{counts['pass']} pass, {counts['noise']} within noise, {counts['fail']} fail, "
        f"{counts['pending']} pending (a run with no finished seed). Values are means ± sample "
        f"standard deviation over a run's finished seeds (their count in brackets, 'k of n' while "
        f"some are missing), the difference ± its standard error; a claim short of its margin by "
        f"less than two standard errors is 'within noise': its seeds do not decide it."
    )


# ---------------------------------------------------------------------------------------------
# formatting


def factor_text(x: Any) -> str:
    if x is None:
        return "?"
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def results_cells(rows: Sequence[Dict[str, Any]]) -> Table:
    """The suite's runs with a finished seed as a table: one line per run, means ± standard
    deviations over its finished seeds (the count in ``seeds``). top-5 is a column when a run
    has more than 10 classes; balanced: the mean of the test per-class accuracies."""
    groups = [g for g in group_rows(rows) if g["n"]]
    top5 = any(shows_top5(g.get("num_classes") or 0) for g in groups)
    headers = ["run", "method", "dataset", "IF", "epochs", "seeds", "test all"]
    headers += (["top-5"] if top5 else []) + ["balanced", "many", "medium", "few"]
    headers += ["val all", "val mean-class", "ECE", "wall", "img/s", "time vs baseline"]
    cells, data = [], []
    for g in groups:
        t, v = g.get("test") or {}, g.get("val") or {}
        ts, vs = g.get("test_sd") or {}, g.get("val_sd") or {}
        wall = (
            duration(g.get("wall_seconds"))
            if g.get("wall_seconds") is not None
            else (f"~{duration(g.get('train_seconds'))}")
        )
        ips = g.get("images_per_s")
        cost = g.get("time_vs_baseline")
        seeds = str(g["n"]) if g["n"] == g["planned"] else f"{g['n']} of {g['planned']}"
        row = [
            g["name"] + (" \\*" if g.get("carried") else ""),
            g["method"],
            DATASET_LABEL.get(g["dataset"], g["dataset"]),
            factor_text(g["imbalance_factor"]),
            str(g.get("epochs", "–")),
            seeds,
            spread(t.get("top1"), ts.get("top1")),
        ]
        if top5:
            shown = shows_top5(g.get("num_classes") or 0)
            row.append(spread(t.get("top5"), ts.get("top5")) if shown else "–")
        row += [spread(t.get(k), ts.get(k)) for k in ("mean_class_acc", "many", "medium", "few")]
        row += [
            spread(v.get("top1"), vs.get("top1")),
            spread(v.get("mean_class_acc"), vs.get("mean_class_acc")),
            spread(t.get("ece"), ts.get("ece")),
            wall,
            "–" if ips is None else f"{ips:.0f}",
            "–" if cost is None else f"{cost:.2f}x",
        ]
        cells.append(row)
        data.append({"run": g["name"], "seeds": ",".join(str(x) for x in g.get("seeds") or [])})
    return Table(headers, cells, ["l"] * 4 + ["r"] * (len(headers) - 4), "suite", "", data)


def results_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The Markdown table of the suite's runs with a finished seed (:func:`results_cells`)."""
    return results_cells(rows).markdown()


def seeds_cells(rows: Sequence[Dict[str, Any]]) -> Table:
    """Each seed of the runs with several: test / val top-1, ECE and wall time."""
    several = {g["name"] for g in group_rows(rows) if g["planned"] > 1}
    cells, data = [], []
    for r in rows:
        if (r.get("group") or r["name"]) not in several or r.get("status") != "done":
            continue
        t, v = r.get("test") or {}, r.get("val") or {}
        cells.append(
            [
                str(r.get("group")),
                str(r.get("seed")),
                r["name"] + (" \\*" if r.get("carried") else ""),
                pct(t.get("top1")),
                pct(t.get("medium")),
                pct(v.get("top1")),
                pct(t.get("ece")),
                duration(r.get("wall_seconds") or r.get("train_seconds")),
            ]
        )
        data.append({"run": r["name"], "seed": str(r.get("seed"))})
    headers = ["run", "seed", "instance", "test all", "medium", "val all", "ECE", "wall"]
    return Table(headers, cells, ["l", "r", "l"] + ["r"] * 5, "seeds", "", data)


def seeds_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Each seed of the runs with several (Markdown; empty when there is none)."""
    table = seeds_cells(rows)
    return table.markdown() if table.rows else ""


def suite_title(header: Dict[str, Any]) -> str:
    return f"Benchmark suite `{header['suite']}`"


def suite_blocks(header: Dict[str, Any], rows: Sequence[Dict[str, Any]]) -> List[Block]:
    """The suite's report (its Markdown and the top of its HTML page) as blocks."""
    git = header.get("git") or {}
    machine = header.get("machine") or {}

    out: List[Block] = []
    if header.get("description"):
        out.append(Paragraph(header["description"]))
    sched = (
        f"every run shortened to {header['epochs']} epochs (epoch-valued settings scaled)"
        if header.get("epochs")
        else "each config's own schedule"
    )
    out.append(
        Paragraph(
            f"Suite file `{header.get('suite_file')}`; {sched}; run folders under "
            f"`{header.get('out_dir')}`."
        )
    )
    done = [r for r in rows if r.get("status") == "done"]
    out.append(results_cells(rows) if done else Paragraph("_No run has finished yet._"))
    if header.get("checks"):
        results = evaluate_checks(header["checks"], rows)
        out += [
            Heading("Checks"),
            Paragraph(
                f"The orderings the suite file claims (`checks:`): {checks_summary(results)}"
            ),
            checks_cells(results),
        ]
    per_seed = seeds_cells(rows)
    if per_seed.rows:
        out += [Heading("Seeds"), Paragraph("The runs with several seeds, each seed:"), per_seed]
    pending = [r for r in rows if r.get("status") != "done"]
    if pending:
        out.append(
            Paragraph(
                "Not finished: "
                + "; ".join(
                    f"`{r['name']}` ({r['status']}"
                    + (
                        f", {r['epochs_done']}/{r['epochs']} epochs"
                        if r["status"] == "partial"
                        else ""
                    )
                    + (
                        f": {r['message']}"
                        if r.get("message") and r["status"] in ("failed", "blocked")
                        else ""
                    )
                    + ")"
                    for r in pending
                )
                + "."
            )
        )
    out.append(
        Paragraph(
            "Columns: top-1 accuracy (%) on the test split (all classes; top-5 where a run has "
            "more than 10 classes; balanced: the mean of the per-class accuracies; then the many- "
            "/ medium- / few-shot groups: > 100, 20-100, < 20 training images); on the balanced "
            "held-out val split (overall and mean of per-class accuracies); ECE (%) on test; the "
            "epochs trained; wall: the run's wall-clock time (data, training, final evaluation; "
            "`~` = training time only); seeds: the finished seeds of the run; with more than one, "
            "each number is the mean ± sample standard deviation over them (each seed: ## Seeds); "
            "img/s: training images per second; time vs baseline: wall time of the run plus its "
            "stage-1 runs (a multi-stage recipe: all its stages) over that of the suite's "
            f"baseline run (`{header.get('baseline')}`) of the same dataset, IF and schedule; "
            "with equal epochs, the per-epoch cost relative to it (compared only between rows "
            "timed in the same invocation). Rows marked \\* are carried from an earlier "
            "invocation whose run folders are not on this machine (each keeps its own commit in "
            "the JSON)."
        )
    )
    facts = [
        f"Machine: {short_machine(machine)}",
        f"Git commit: `{git.get('commit') or 'unknown'}`"
        + (
            f" (dirty: {len(git.get('changed_files') or [])} changed files)"
            if git.get("dirty")
            else " (clean)"
            if git.get("dirty") is False
            else ""
        ),
        f"Command: `{header.get('command')}` (in `{header.get('cwd')}`"
        + (
            ", " + ", ".join(f"{k}={v}" for k, v in (header.get("env") or {}).items())
            if header.get("env")
            else ""
        )
        + ")",
        f"Written: {header.get('date_utc')}",
    ]
    other = sorted(
        {
            (r["name"], r["git_commit"][:10])
            for r in done
            if r.get("git_commit") and r.get("git_commit") != git.get("commit")
        }
    )
    if other:
        facts.append(
            "Rows finished at another commit: " + ", ".join(f"`{n}` @ `{c}`" for n, c in other)
        )
    out.append(Bullets(facts))
    return out


def results_markdown(header: Dict[str, Any], rows: Sequence[Dict[str, Any]]) -> str:
    return f"# {suite_title(header)}\n\n" + blocks_markdown(suite_blocks(header, rows))


def suite_runs(rows: Sequence[Dict[str, Any]]) -> Tuple[List[RunRecord], List[str]]:
    """The finished run folders of the suite's rows (carried rows have none here), and the
    names of those that could not be read."""
    runs, unread = [], []
    for r in rows:
        if r.get("status") != "done" or r.get("carried") or not r.get("run_dir"):
            continue
        try:
            runs += load_runs([Path(r["run_dir"])], [r["name"]])
        except LongtailError:
            unread.append(r["name"])
    return runs, unread


def results_html(header: Dict[str, Any], rows: Sequence[Dict[str, Any]]) -> str:
    """The suite's self-contained HTML report: its tables, then its finished run folders
    compared (``longtail compare``'s sections: per run and seed, config differences, per-class
    accuracy and training curves)."""
    blocks = suite_blocks(header, rows)
    runs, unread = suite_runs(rows)
    if runs:
        blocks += compare_blocks(runs)
    if unread:
        blocks.append(Paragraph("Run folders that could not be read: " + ", ".join(unread) + "."))
    return html_report(suite_title(header), blocks)


def write_results(
    results_dir: Path,
    header: Dict[str, Any],
    rows: Sequence[Dict[str, Any]],
    html: bool = True,
) -> Tuple[Path, Path]:
    """``<results_dir>/<suite>.md`` and ``.json`` (atomically), and (``html``) the HTML report
    ``<suite>.html`` beside them (its plots cost a second or two); returns the first two."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    md, js, html_file = result_files(results_dir, header["suite"])
    record = {**header, "rows": list(rows)}
    if header.get("checks"):
        record["check_results"] = evaluate_checks(header["checks"], rows)
    atomic_write_text(js, json.dumps(record, indent=2) + "\n")
    atomic_write_text(md, results_markdown(header, rows))
    if html:
        atomic_write_text(html_file, results_html(header, rows))
    return md, js


def result_files(results_dir: Path, suite_name: str) -> Tuple[Path, Path, Path]:
    """The files ``write_results`` writes: ``<results_dir>/<suite>.md``, ``.json``, ``.html``."""
    d = Path(results_dir)
    return d / f"{suite_name}.md", d / f"{suite_name}.json", d / f"{suite_name}.html"


def html_path(results_dir: Path, suite_name: str) -> Path:
    """Where the suite's HTML report goes: ``<results_dir>/<suite>.html``."""
    return result_files(results_dir, suite_name)[2]


# ---------------------------------------------------------------------------------------------
# docs/results.md

DOC_INTRO = """# Results

Our numbers beside the published ones. Generated by `longtail.bench.report.write_results_doc`
from the suite files in `configs/bench/` and their results in `benchmarks/results/<suite>.json`;
regenerate with `longtail bench SUITE --report-only` (do not edit by hand). "not run yet": the
suite has no result for that row.

Reading the comparison (the notes below):

- Reference numbers are test top-1 (%) on the full 10,000-image CIFAR test sets, mostly the
  *best* test epoch; ours are the *last* epoch. Tags: [CODE] read in the named repository, [AGG]
  a results aggregator, [MEM] a commonly quoted value not re-verified (not a hard target).
- Our CIFAR-LT training subsets follow the LDAM-DRW construction (seed 0). The BagofTricks-LT
  grid (converted here from its top-1 errors) uses the older Cui et al. split: compare within
  about 1 point. The logit-adjustment repository uses its own LT files and a ~4.8x longer schedule.
- On this machine CIFAR-10's test split has only the first 1,017 official test images (about 100
  per class; standard error about 1.4 points), so the val columns (a balanced held-out split of
  unused training images; classes 1-9 for CIFAR-10, whose class 0 has none to spare) are the
  finer comparison. CIFAR-100 is not available here in full: `cifar-full` needs it (a GPU
  machine with the official files).
- Rows of a shortened schedule (`epochs` in the suite) have no reference number: no paper
  trains that schedule. They rank methods under a fixed small budget, nothing more.
"""


def _ref_cells(
    method: str, dataset: str, factor: Optional[float], short: Optional[int]
) -> Tuple[str, str]:
    if short:
        return "–", f"none: {short}-epoch schedule, no published number"
    refs = references(method, dataset, factor if factor is not None else 0)
    if not refs:
        return "–", missing_reason(method, dataset)
    return " / ".join(r.cell() for r in refs), "; ".join(r.citation() for r in refs)


def render_results_doc(
    entries: Sequence[Tuple[Suite, Sequence[PlannedRun], Optional[Dict[str, Any]]]],
) -> str:
    """The docs/results.md text: one section and table per suite."""
    out = [DOC_INTRO]
    for suite, plan, results in entries:
        by_name = {g["name"]: g for g in group_rows((results or {}).get("rows", []))}
        out += [f"## `{suite.name}`", ""]
        if suite.description:
            out += [" ".join(suite.description.split()), ""]
        if results:
            git = results.get("git") or {}

            out += [
                f"Results: `benchmarks/results/{suite.name}.json` ({results.get('date_utc')}, "
                f"commit `{(git.get('commit') or 'unknown')[:10]}`"
                f"{', dirty' if git.get('dirty') else ''}; "
                f"{short_machine(results.get('machine') or {})}).",
                "",
            ]
        else:
            out += [
                f"Results: not run yet (`longtail bench {suite.name}` writes "
                f"`benchmarks/results/{suite.name}.json`).",
                "",
            ]
        out += [
            "| method | dataset | IF | epochs | seeds | ours: test top-1 | many / medium / few | "
            "ours: val top-1 | reference top-1 | reference source |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
        ]
        for p in plan:
            if p.name != p.group:  # one line per suite run, its seeds summarised
                continue
            dataset, factor = _dataset_and_factor(p)
            row = by_name.get(p.group, {})
            done = bool(row.get("n"))
            t, v = row.get("test") or {}, row.get("val") or {}
            ts, vs = row.get("test_sd") or {}, row.get("val_sd") or {}
            seeds = (
                "–"
                if not done
                else (
                    str(row["n"])
                    if row["n"] == row["planned"]
                    else f"{row['n']} of {row['planned']}"
                )
            )
            epochs = row.get("epochs") or (p.cfg.train.epochs if p.cfg is not None else "?")
            # a suite with ``epochs`` is a short-schedule suite: no published number applies
            ref, source = _ref_cells(p.spec.label, dataset, factor, suite.epochs)
            out.append(
                "| "
                + " | ".join(
                    [
                        p.spec.label,
                        DATASET_LABEL.get(dataset, dataset),
                        factor_text(factor),
                        str(epochs),
                        seeds,
                        spread(t.get("top1"), ts.get("top1")) if done else "not run yet",
                        f"{pct(t.get('many'))} / {pct(t.get('medium'))} / {pct(t.get('few'))}"
                        if done
                        else "–",
                        spread(v.get("top1"), vs.get("top1")) if done else "–",
                        ref,
                        source,
                    ]
                )
                + " |"
            )
        out.append("")
        if suite.checks:
            checked = evaluate_checks(
                [c.as_dict() for c in suite.checks], (results or {}).get("rows", [])
            )
            out += [
                f"Checks (the suite's `checks:`): {checks_summary(checked)}",
                "",
                checks_table(checked),
                "",
            ]
    return "\n".join(out)


def load_results(results_dir: Path, suite_name: str) -> Optional[Dict[str, Any]]:
    return _read_json(Path(results_dir) / f"{suite_name}.json")


def write_results_doc(
    path: Path, suite_files: Sequence[Path], results_dir: Path, out_root: Path
) -> Path:
    """Regenerate ``path`` (docs/results.md) from ``suite_files`` and their results JSON."""
    entries = []
    for f in suite_files:
        suite = load_suite(f)
        entries.append((suite, plan_suite(suite, out_root), load_results(results_dir, suite.name)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), render_results_doc(entries))
    return Path(path)


def header(
    suite: Suite,
    out_dir: Path,
    command: str,
    machine: Dict[str, Any],
    git: Dict[str, Any],
    env: Dict[str, str],
) -> Dict[str, Any]:
    """The top of a suite's results JSON."""
    import os

    return {
        "suite": suite.name,
        "suite_file": str(suite.path),
        "description": suite.description,
        "epochs": suite.epochs,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "git": git,
        "command": command,
        "cwd": os.getcwd(),
        "env": env,
        "out_dir": str(out_dir),
        "baseline": suite.baseline,
        "checks": [c.as_dict() for c in suite.checks],
    }
