"""``longtail bench SUITE``: run a suite's runs in order, skip finished ones, resume interrupted
ones, and write ``benchmarks/results/<suite>.{md,json}`` after every run.

Each run goes to ``OUT/<suite>/<name>/``. A folder with ``metrics.json`` is finished and skipped;
a folder with ``config.yaml`` but no ``metrics.json`` was interrupted and is resumed from its
``last.pt`` exactly as ``longtail train --resume`` does (with the config saved in the folder). So
a killed suite continues where it stopped when the same command is run again. Runs execute in
this process (``fit``) or, with ``--subprocess``, each as ``python -m longtail train ...``.
"""

from __future__ import annotations

import fnmatch
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from longtail.bench import report
from longtail.bench.launch import Job, default_threads, make_launcher, wait_any
from longtail.bench.machine import environment, git_info, machine_info, short_machine, usable_cores
from longtail.bench.suite import PlannedRun, Suite, check_plan, load_suite, plan_suite
from longtail.core.config import diff_trees, split_selectors
from longtail.core.errors import LongtailError
from longtail.core.facts import RunFacts
from longtail.core.io import atomic_write_json
from longtail.core.run_folder import RunFolder
from longtail.data.build import resolve_exclude_classes
from longtail.data.paths import resolve_data_root
from longtail.data.samplers import build_sampler
from longtail.data.stats import subset_counts
from longtail.engine.pipeline import record, run_pipeline
from longtail.engine.trainer import fit

Printer = Callable[[str], None]


@dataclass
class BenchOptions:
    suite: str
    out: Path = Path("runs/bench")
    data_root: Optional[str] = None
    only: Optional[str] = None  # comma-separated globs over run names
    dry_run: bool = False
    subprocess: bool = False
    results_dir: Path = Path("benchmarks/results")
    report_only: bool = False
    docs: Optional[Path] = Path("docs/results.md")
    command: str = ""  # the command line, for the results files
    jobs: int = 1  # runs at a time
    launcher: str = "local"  # local | slurm | submitit-local (longtail.bench.launch)
    threads: Optional[int] = None  # torch threads per run (None: cores / jobs, or torch's)
    slurm: Dict[str, Any] = field(default_factory=dict)  # submitit parameters
    set_overrides: List[str] = field(default_factory=list)  # appended to the suite's overrides
    epochs: Optional[int] = None  # every run shortened to this (the suite's ``epochs:``)
    extra: Dict[str, Any] = field(default_factory=dict)


def select(plan: Sequence[PlannedRun], only: Optional[str]) -> List[PlannedRun]:
    """Runs whose name (or whose suite run's name, for every seed of it) matches one of the
    comma-separated globs, plus the earlier runs they need (``stage1``, ``{run:NAME}``), in suite
    order. ``None`` selects every run."""
    if not only:
        return list(plan)
    globs = [g.strip() for g in only.split(",") if g.strip()]
    wanted = {
        p.name
        for p in plan
        if any(fnmatch.fnmatchcase(p.name, g) or fnmatch.fnmatchcase(p.group, g) for g in globs)
    }
    if not wanted:
        raise LongtailError(
            f"--only {only!r} matches no run of the suite (runs: "
            f"{', '.join(p.name for p in plan)})."
        )
    by_name = {p.name: p for p in plan}
    stack = list(wanted)
    while stack:
        for need in by_name[stack.pop()].needs:
            if need not in wanted:
                wanted.add(need)
                stack.append(need)
    return [p for p in plan if p.name in wanted]


# ---------------------------------------------------------------------------------------------
# dry run


def nominal_epoch_images(p: PlannedRun) -> Optional[int]:
    """Training images an epoch of this run draws, from the nominal class counts (no data read)."""
    return None if p.cfg is None else config_epoch_images(p.cfg)


def nominal_run_images(p: PlannedRun) -> Optional[int]:
    """Training images of the whole run (every stage of a multi-stage config)."""
    if p.cfg is None:
        return None
    parts = [(s.cfg, s.cfg.train.epochs) for s in p.stages] or [(p.cfg, p.cfg.train.epochs)]
    sizes = [config_epoch_images(c) for c, _ in parts]
    return None if None in sizes else sum(n * e for n, (_, e) in zip(sizes, parts))


def config_epoch_images(cfg) -> Optional[int]:
    """Training images an epoch of ``cfg`` draws: the length its sampler reports for the nominal
    class counts (no image is read)."""
    try:
        d = cfg.data
        counts = subset_counts(d.dataset, d.imbalance_factor, d.profile)
        if d.max_per_class:
            counts = [min(c, d.max_per_class) for c in counts]
        excluded = resolve_exclude_classes(d.exclude_classes, counts)
        counts = [0 if c in excluded else n for c, n in enumerate(counts)]
        labels = np.repeat(np.arange(len(counts)), counts)
        facts = RunFacts(
            seed=cfg.seed,
            epochs=cfg.train.epochs,
            batch_size=cfg.train.batch_size,
            class_counts=counts,
        )
        return len(build_sampler(cfg.sampler.name, labels, counts, facts, **cfg.sampler.params()))
    except Exception:
        return None


def describe_plan(suite: Suite, plan: Sequence[PlannedRun], out_dir: Path) -> str:
    """The planned runs with their resolved epochs and schedule, state and training images."""
    lines = [
        f"suite {suite.name} ({suite.path}): {len(plan)} runs -> {out_dir}/"
        + (
            f"; every run shortened to {suite.epochs} epochs unless it sets its own"
            if suite.epochs
            else ""
        )
    ]
    if suite.overrides:
        lines.append(f"suite overrides: {' '.join(suite.overrides)}")
    head = (
        f"{'#':>3}  {'run':<22} {'config':<36} {'data':<17} {'IF':>4} {'epochs':>9}  "
        f"{'stage1':<14} {'state':<9} {'train imgs':>11}"
    )
    lines += [head, "-" * len(head)]
    totals = {"plain": 0, "stage2": 0}
    for i, p in enumerate(plan, 1):
        state = report.run_state(p.run_dir)
        if state == "partial":
            state = "resume" if p.stages else f"resume@{report.epochs_done(p.run_dir)}"
        if p.cfg is None:
            lines.append(f"{i:>3}  {p.name:<22} {p.spec.config_text:<40} ERROR: {p.error}")
            continue
        epochs = p.cfg.train.epochs
        span = f"{p.base_epochs}->{epochs}" if p.base_epochs != epochs else str(epochs)
        imgs = nominal_run_images(p)
        if imgs is not None:
            totals["stage2" if p.spec.stage1 else "plain"] += imgs
        data = split_selectors(p.overrides)[0].get("data", "-")
        lines.append(
            f"{i:>3}  {p.name:<22} {p.spec.config_text:<36} {data:<17} "
            f"{report.factor_text(p.cfg.data.imbalance_factor):>4} {span:>9}  "
            f"{p.spec.stage1 or '-':<14} {state:<9} "
            f"{'?' if imgs is None else format(imgs, ','):>11}"
        )
        scaled = {k: v for k, v in p.scaled.items() if k != "train.epochs"}
        if scaled:
            lines.append(
                " " * 7 + "scaled: " + "; ".join(f"{k} {a}->{b}" for k, (a, b) in scaled.items())
            )
        if p.stages:
            lines.append(
                " " * 7
                + "stages: "
                + "; ".join(
                    f"{st.name} {st.cfg.method.name} {st.cfg.train.epochs} ep lr {st.cfg.optim.lr:g}"
                    + (f" ({report.run_state(p.run_dir / st.name)})" if p.run_dir.exists() else "")
                    for st in p.stages
                )
            )
    lines.append(
        f"training images (nominal class counts): {totals['plain']:,} in runs that train "
        f"the whole network, {totals['stage2']:,} in stage-2 runs (frozen backbone)"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# running


def _saved_config_note(p: PlannedRun) -> Optional[str]:
    """Which keys of the folder's config.yaml differ from the suite's plan (None if the same)."""
    try:
        saved = RunFolder(p.run_dir).load_config().to_dict()
    except LongtailError as err:
        return str(err)
    planned = p.cfg
    if p.cfg is not None and p.stages:  # a pipeline's folder records its resolved stages
        planned = record(p.cfg, p.stages)
    keys = list(diff_trees(saved, planned.to_dict())) if planned is not None else []
    return ", ".join(keys) if keys else None


def _run_in_process(p: PlannedRun, data_root: Optional[str], resume: bool) -> None:
    root = resolve_data_root(data_root)
    cfg = RunFolder(p.run_dir).load_config() if resume else p.cfg
    if cfg.stages:  # a multi-stage config: the pipeline runner (skips finished stages on resume)
        run_pipeline(
            cfg,
            p.run_dir,
            root,
            resume=resume,
            overrides=() if resume else p.overrides,
            source=p.spec.config,
        )
    elif resume:
        fit(cfg, p.run_dir, root, resume=True)
    else:
        fit(p.cfg, p.run_dir, root)


def train_args(p: PlannedRun, data_root: Optional[str], resume: bool) -> List[str]:
    """``longtail train ...`` arguments for a run (``--resume RUN_DIR`` for an interrupted one)."""
    if resume:
        return ["train", "--resume", str(p.run_dir)] + (
            ["--data-root", str(data_root)] if data_root else []
        )
    return p.train_argv(data_root)


def subprocess_argv(p: PlannedRun, data_root: Optional[str], resume: bool) -> List[str]:
    """``python -m longtail train ...`` for a run."""
    return [sys.executable, "-m", "longtail", *train_args(p, data_root, resume)]


def _write_bench_json(
    p: PlannedRun,
    suite: Suite,
    info: Dict[str, Any],
    mode: str,
    resumed: bool,
    started: float,
    wall: float,
) -> None:
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
    git = info["git"]
    atomic_write_json(
        p.run_dir / report.BENCH_FILE,
        {
            "suite": suite.name,
            "name": p.name,
            "mode": mode,
            "resumed": resumed,
            "wall_seconds": wall,
            "started_utc": iso(started),
            "finished_utc": iso(started + wall),
            "git_commit": git.get("commit"),
            "git_dirty": git.get("dirty"),
            "machine": info["machine_line"],
            "bench_command": info["command"],
            "train_command": "longtail " + " ".join(p.train_argv()),
        },
    )


def _own_outputs(suite_name: str, opts: BenchOptions) -> List[Path]:
    """The files the bench itself rewrites (this suite's results and the docs page): their changes
    do not make a run's checkout dirty."""
    return [*report.result_files(opts.results_dir, suite_name), *([opts.docs] if opts.docs else [])]


def run_bench(opts: BenchOptions, echo: Printer = print) -> int:
    """Run (or plan, or report) a suite; returns the exit status (0 ok, 1 a run failed, 130
    interrupted). Planning mistakes raise LongtailError before anything is trained."""
    suite = load_suite(opts.suite)
    suite.overrides += list(opts.set_overrides)  # --set: a variant of the suite (e.g. a smoke run)
    if opts.epochs is not None:
        suite.epochs = opts.epochs
    out_root = Path(opts.out)
    out_dir = out_root / suite.name
    plan = plan_suite(suite, out_root)
    chosen = select(plan, opts.only)

    if opts.dry_run:
        echo(describe_plan(suite, chosen, out_dir))
        errors = [p.error for p in chosen if p.error]
        for e in errors:
            echo(f"error: {e}")
        return 2 if errors else 0

    if opts.report_only:
        return _report_only(suite, plan, out_dir, opts, echo)

    check_plan(chosen)
    threads = opts.threads or default_threads(opts.launcher, opts.jobs, usable_cores(), opts.slurm)
    launcher = make_launcher(
        opts.launcher, opts.jobs, opts.subprocess, out_dir / "_submitit", threads, opts.slurm
    )
    info = {
        "machine": machine_info(),
        "git": git_info(ignore=_own_outputs(suite.name, opts)),
        "env": environment(),
        "command": opts.command or f"longtail bench {opts.suite}",
    }
    info["machine_line"] = short_machine(info["machine"])
    head = report.header(suite, out_dir, info["command"], info["machine"], info["git"], info["env"])
    head["execution"] = {"launcher": launcher.where, "jobs": opts.jobs, "threads_per_run": threads}
    statuses: Dict[str, Tuple[str, str]] = {}
    # rows finished elsewhere (folders not on this machine) stay in the results file
    previous = (report.load_results(opts.results_dir, suite.name) or {}).get("rows")

    def flush(html: bool = False) -> Tuple[Path, Path]:
        head["date_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        rows = report.collect_rows(plan, statuses, suite.baseline, previous)
        return report.write_results(opts.results_dir, head, rows, html=html)

    mode = launcher.mode
    threads_note = f", {threads} torch thread(s) each" if threads else ""
    echo(
        f"suite {suite.name}: {len(chosen)} of {len(plan)} runs, {launcher.where}{threads_note}, "
        f"folders under {out_dir}/"
    )
    tags = {p.name: f"[{i}/{len(chosen)}] {p.name}" for i, p in enumerate(chosen, 1)}
    waiting = list(chosen)
    running: Dict[Any, Tuple[PlannedRun, bool, float]] = {}  # handle -> (run, resumed, started)
    interrupted = False

    def start(p: PlannedRun) -> str:
        """Skip, block, wait or launch ``p``; returns what happened."""
        tag = tags[p.name]
        state = report.run_state(p.run_dir)
        if state == "done":
            note = _saved_config_note(p)
            echo(
                f"{tag}: finished earlier ({RunFolder(p.run_dir).metrics_path}), skipped"
                + (f"; note: its config differs from the suite's plan in {note}" if note else "")
            )
            return "skipped"
        in_flight = {q.name for q, _, _ in running.values()} | {q.name for q in waiting}
        missing = [n for n in p.needs if report.run_state(out_dir / n) != "done"]
        if any(n in in_flight and n not in statuses for n in missing):
            return "waiting"
        if missing:
            first = missing[0]
            role = "stage1 run" if p.spec.stage1 and first == p.needs[0] else "run"
            why = statuses.get(first, ("not finished", ""))[0]
            statuses[p.name] = ("blocked", f"{role} '{first}' {why}")
            echo(f"{tag}: blocked, its {role} '{first}' is {why}")
            flush()
            return "blocked"
        resume = state == "partial"
        if resume:
            note = _saved_config_note(p)
            echo(
                f"{tag}: resuming after epoch {report.epochs_done(p.run_dir)} "
                f"({p.run_dir}, its saved config.yaml)"
                + (f"; note: it differs from the suite's plan in {note}" if note else "")
            )
        else:
            echo(f"{tag}: longtail {' '.join(p.train_argv())}")
        log = None  # one local run at a time writes to this terminal, parallel ones to a file
        if opts.jobs > 1 or opts.launcher != "local":
            log = out_dir / "_logs" / f"{p.name}.log"
            echo(f"{' ' * len(tag)}  output: {log}")
        job = Job(p.name, train_args(p, opts.data_root, resume), log, threads)
        handle = launcher.submit(job, lambda: _run_in_process(p, opts.data_root, resume))
        running[handle] = (p, resume, time.time())
        return "started"

    def finish(handle: Any) -> None:
        p, resumed, started = running.pop(handle)
        tag = tags[p.name]
        try:
            result = handle.result()
            if result["rc"] != 0:
                raise LongtailError(
                    f"`longtail train` exited with status {result['rc']}"
                    + (
                        f" (its output: {out_dir / '_logs' / (p.name + '.log')})"
                        if opts.jobs > 1
                        else ""
                    )
                )
            if not RunFolder(p.run_dir).is_finished():
                raise LongtailError("the run ended without writing metrics.json")
        except Exception as err:  # one failed run must not stop the others
            if not isinstance(err, LongtailError):
                traceback.print_exception(err)
            statuses[p.name] = (
                "failed",
                str(err) if isinstance(err, LongtailError) else f"{type(err).__name__}: {err}",
            )
            echo(f"{tag}: FAILED: {statuses[p.name][1]}")
            flush()
            return
        _write_bench_json(p, suite, info, mode, resumed, started, result["wall"])
        echo(f"{tag}: done in {report.duration(result['wall'])}")
        flush()

    try:
        while waiting or running:
            for p in list(waiting):
                if len(running) >= launcher.slots:
                    break
                if start(p) != "waiting":
                    waiting.remove(p)
            if not running:  # nothing in flight and nothing could start: needs never finish
                for p in waiting:
                    statuses[p.name] = ("blocked", "a run it needs did not finish")
                break
            for handle in wait_any(list(running), launcher.poll):
                finish(handle)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        launcher.close()
    md, js = flush(html=True)
    rows = report.collect_rows(plan, statuses, suite.baseline, previous)
    echo("")
    echo(report.results_table(rows))
    echo(f"\nresults: {md}  {js}  {report.html_path(opts.results_dir, suite.name)}")
    if interrupted:
        echo(
            "interrupted: run the same command again to continue (finished runs are skipped, "
            "an interrupted run resumes from its last checkpoint)"
        )
        return 130
    echo(
        f"docs: `longtail bench {opts.suite} --report-only` updates {opts.docs or 'docs/results.md'}"
    )
    failed = [n for n, (s, _) in statuses.items() if s in ("failed", "blocked")]
    if failed:
        echo(f"{len(failed)} run(s) did not finish: {', '.join(failed)}")
        return 1
    return 0


def _report_only(
    suite: Suite, plan: Sequence[PlannedRun], out_dir: Path, opts: BenchOptions, echo: Printer
) -> int:
    """Rewrite the suite's results files from its run folders (when there are any) and
    regenerate the docs page from every suite next to this one."""
    previous = (report.load_results(opts.results_dir, suite.name) or {}).get("rows")
    rows = report.collect_rows(plan, baseline=suite.baseline, previous=previous)
    if any(r["status"] == "done" for r in rows):
        existing = report.load_results(opts.results_dir, suite.name) or {}
        head = report.header(
            suite,
            out_dir,
            existing.get("command") or opts.command,
            existing.get("machine") or machine_info(),
            existing.get("git") or git_info(ignore=_own_outputs(suite.name, opts)),
            existing.get("env") or environment(),
        )
        head["report_command"] = opts.command
        md, js = report.write_results(opts.results_dir, head, rows)
        echo(report.results_table(rows))
        echo(f"\nresults: {md}  {js}  {report.html_path(opts.results_dir, suite.name)}")
    else:
        echo(
            f"no finished run under {out_dir}/: kept {Path(opts.results_dir) / suite.name}.json "
            f"as it is"
        )
    if opts.docs:
        files = sorted(suite.path.parent.glob("*.yaml"))
        path = report.write_results_doc(Path(opts.docs), files, opts.results_dir, Path(opts.out))
        echo(f"docs: {path} ({len(files)} suites)")
    return 0
