"""The ``longtail`` command line: data (stats | split | check) | train | eval | compare | bench.

A user mistake (bad config key, missing data, unwritable folder) prints one paragraph saying what
is wrong and how to fix it, and exits with status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import yaml

from longtail import __version__
from longtail.core.errors import LongtailError

FILE_DATASET_HELP = "imagenet-lt, places-lt, inat2018 (split files) or folder:PATH (class folders)"


def _add_file_data_args(p: argparse.ArgumentParser, split_help: str) -> None:
    p.add_argument("--split", choices=["train", "val", "test"], default=None, help=split_help)
    p.add_argument(
        "--split-dir",
        default=None,
        help="folder holding the published split files (default: --data-root)",
    )
    p.add_argument(
        "--split-file",
        default=None,
        help="folder:PATH only: list the images with this 'relative/path label' file, no scan",
    )


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "dataset",
        help="cifar10, cifar100, mnist, fashion-mnist, each also with -lt; " + FILE_DATASET_HELP,
    )
    p.add_argument(
        "--imbalance-factor",
        type=float,
        default=None,
        help="n_max / n_min (default 100); for folder:PATH, count its long-tailed subset",
    )
    p.add_argument("--profile", choices=["exp", "step"], default=None, help="default exp")
    p.add_argument(
        "--data-root",
        default=None,
        help="data folder (else $LONGTAIL_DATA, else the cache); for the file datasets, "
        "their image root (no fallback)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longtail", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"longtail {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset statistics and split export")
    dsub = data.add_subparsers(dest="data_command", required=True)
    stats = dsub.add_parser(
        "stats", help="per-class counts, imbalance factor, many/medium/few classes"
    )
    _add_data_args(stats)
    _add_file_data_args(stats, "file datasets: the split to count (default train)")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    split = dsub.add_parser(
        "split",
        help="write the training subset as 'index label' lines (file datasets: "
        "'relative/path label', a folder's long-tailed subset with --imbalance-factor)",
    )
    _add_data_args(split)
    _add_file_data_args(split, "file datasets: the split to write (default train)")
    split.add_argument("--out", required=True, help="output text file")
    check = dsub.add_parser(
        "check",
        help="open every listed image: missing / corrupt files, exit status 1 if any",
    )
    check.add_argument("dataset", help=FILE_DATASET_HELP)
    check.add_argument(
        "--data-root", default=None, help="the image root the split files' paths are relative to"
    )
    _add_file_data_args(check, "only this split (default: every split)")
    check.add_argument(
        "--workers", type=int, default=None, help="threads opening images (default min(8, cores))"
    )
    check.add_argument(
        "--verify-only",
        action="store_true",
        help="Pillow verify() instead of a decode: faster, but a truncated JPEG passes",
    )

    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", nargs="?", help="YAML config (optional with --resume)")
    train.add_argument(
        "overrides",
        nargs="*",
        help="data=NAME (configs/datasets/), model=NAME (configs/models/) and dotted "
        "overrides, e.g. data=cifar10_lt train.epochs=2 optim.lr=0.05",
    )
    train.add_argument("--data-root", default=None)
    train.add_argument("--out", default=None, help="run folder (default runs/<config>-<time>)")
    train.add_argument(
        "--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run"
    )
    train.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (composed, overridden, validated) and exit",
    )

    ev = sub.add_parser("eval", help="recompute a run's metrics from its saved weights")
    ev.add_argument("run_dir")
    ev.add_argument("--data-root", default=None)
    ev.add_argument("--json", action="store_true")

    cmp = sub.add_parser(
        "compare",
        help="finished runs side by side: a Markdown table and one self-contained HTML report",
    )
    cmp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run folders")
    cmp.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where compare.md and compare.html go (default runs/compare-<time>)",
    )
    cmp.add_argument(
        "--names",
        nargs="+",
        default=None,
        metavar="NAME",
        help="a name per run folder, in their order (after the folders; default: folder names)",
    )
    cmp.add_argument("--title", default="", help="the report's title")

    ls = sub.add_parser("list", help="the registered components a config can name, with options")
    ls.add_argument(
        "section",
        nargs="?",
        default=None,
        help="only one section: loss, optim, schedule, sampler, method, hooks, model",
    )
    ls.add_argument("--json", action="store_true")

    bench = sub.add_parser("bench", help="run a benchmark suite (configs/bench/<name>.yaml)")
    bench.add_argument("suite", help="suite name (configs/bench/<name>.yaml) or a suite file")
    bench.add_argument(
        "--out", default="runs/bench", help="runs go to OUT/<suite>/<run> (default runs/bench)"
    )
    bench.add_argument("--data-root", default=None)
    bench.add_argument(
        "--only",
        default=None,
        metavar="GLOB",
        help="only runs whose name matches (comma-separated globs; their stage1 runs are added)",
    )
    bench.add_argument(
        "--dry-run", action="store_true", help="print the planned runs, train nothing"
    )
    bench.add_argument(
        "--subprocess",
        action="store_true",
        help="run each as `python -m longtail train ...` (default: in this process)",
    )
    bench.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="runs at a time (local: N processes, the CPU cores split between them; on a GPU "
        "machine they share the GPU, or take one GPU each when there are several)",
    )
    bench.add_argument(
        "--launcher",
        choices=("local", "slurm", "submitit-local"),
        default="local",
        help="local: this machine; slurm: one submitit job per run on a SLURM cluster; "
        "submitit-local: submitit's local executor (the SLURM path without a cluster)",
    )
    bench.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="T",
        help="torch threads per run (default: cores / jobs with --jobs > 1, else torch's)",
    )
    bench.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a submitit parameter for --launcher slurm / submitit-local, repeatable (e.g. "
        "slurm_partition=gpu, gpus_per_node=1, cpus_per_task=8, timeout_min=240)",
    )
    bench.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for every run, after the suite's own (repeatable; e.g. a smoke run "
        "with --set data.max_per_class=20)",
    )
    bench.add_argument(
        "--epochs",
        type=int,
        default=None,
        metavar="N",
        help="shorten every run to N epochs (epoch-valued settings scaled, as the suite's epochs:)",
    )
    bench.add_argument(
        "--results",
        default="benchmarks/results",
        metavar="DIR",
        help="where <suite>.md / <suite>.json go (default benchmarks/results)",
    )
    bench.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: rewrite the results files from the run folders and "
        "regenerate the docs page",
    )
    bench.add_argument(
        "--docs",
        default="docs/results.md",
        metavar="FILE",
        help="the page --report-only regenerates (default docs/results.md)",
    )
    return parser


def _print_file_stats(stats: dict) -> None:
    split = f" {stats['split']}" if stats["split"] else ""
    print(
        f"{stats['dataset']}{split} ({stats['source']}): {stats['total']} images, "
        f"{stats['num_classes']} classes, max {stats['max']}, min {stats['min']}, "
        f"imbalance factor {stats['imbalance_factor']:.1f}"
    )
    groups = stats["groups"]
    print(
        f"  many (> 100) / medium (20-100) / few (< 20): {len(groups['many'])} / "
        f"{len(groups['medium'])} / {len(groups['few'])} classes"
    )
    order = sorted(range(stats["num_classes"]), key=lambda c: (-stats["counts"][c], c))
    for title, ids in (("largest", order[:3]), ("smallest", order[::-1][:3])):
        shown = ", ".join(f"{stats['classes'][c]} ({c}) {stats['counts'][c]}" for c in ids)
        print(f"  {title}: {shown}")
    for name, entry in stats.get("super_categories", {}).items():
        print(f"  {name}: {entry['classes']} classes, {entry['images']} images")


def cmd_data_stats(args) -> int:
    from longtail.data.files import is_file_dataset
    from longtail.data.stats import dataset_stats, file_dataset_stats

    if is_file_dataset(args.dataset):
        stats = file_dataset_stats(
            args.dataset,
            args.split,
            data_root=args.data_root,
            split_dir=args.split_dir,
            split_file=args.split_file,
            imbalance_factor=args.imbalance_factor,
            profile=args.profile,
        )
        if args.json:
            print(json.dumps(stats))
        else:
            _print_file_stats(stats)
        return 0
    if args.split or args.split_dir or args.split_file:
        raise LongtailError(
            f"--split, --split-dir and --split-file are for {FILE_DATASET_HELP}; "
            f"{args.dataset} is counted from its official files."
        )
    stats = dataset_stats(args.dataset, *_profile(args), args.data_root)
    if args.json:
        print(json.dumps(stats))
        return 0
    print(
        f"{stats['dataset']}: {stats['num_classes']} classes, {stats['total']} training images, "
        f"imbalance factor {stats['imbalance_factor']:.1f}"
    )
    width = len(str(stats["num_classes"] - 1))
    group_of = {c: g for g, cs in stats["groups"].items() for c in cs}
    for c, n in enumerate(stats["counts"]):
        print(f"  class {c:>{width}}  {n:>6}  {group_of[c]}")
    for g, cs in stats["groups"].items():
        print(f"{g:>6}: {len(cs)} classes {cs if len(cs) <= 20 else ''}")
    return 0


def _profile(args) -> tuple:
    """--imbalance-factor / --profile with their defaults (100, exp)."""
    factor = 100.0 if args.imbalance_factor is None else args.imbalance_factor
    return factor, args.profile or "exp"


def cmd_data_split(args) -> int:
    from longtail.data.files import is_file_dataset
    from longtail.data.stats import export_split

    if is_file_dataset(args.dataset):
        from longtail.data.stats import export_file_split

        n = export_file_split(
            args.dataset,
            Path(args.out),
            split=args.split,
            imbalance_factor=args.imbalance_factor,
            profile=args.profile,
            data_root=args.data_root,
            split_dir=args.split_dir,
            split_file=args.split_file,
        )
        print(f"wrote {n} lines 'relative/path label' to {args.out}")
        return 0
    n = export_split(args.dataset, Path(args.out), *_profile(args), args.data_root)
    print(f"wrote {n} lines 'index label' to {args.out}")
    return 0


def cmd_data_check(args) -> int:
    from tqdm import tqdm

    from longtail.data.stats import check_dataset

    bars: list = []

    def progress(label: str, total: int):
        bars.append(tqdm(total=total, desc=label, unit="img", disable=not sys.stderr.isatty()))
        return bars[-1].update

    try:
        reports = check_dataset(
            args.dataset,
            [args.split] if args.split else None,
            data_root=args.data_root,
            split_dir=args.split_dir,
            split_file=args.split_file,
            workers=args.workers,
            decode=not args.verify_only,
            progress=progress,
        )
    finally:
        for bar in bars:
            bar.close()
    for label, rep in reports:
        print(
            f"{label}: {rep.listed} listed, {rep.ok} readable, {rep.missing} missing, "
            f"{rep.corrupt} corrupt"
        )
        for path in rep.first_missing:
            print(f"  missing: {path}")
        if rep.missing > len(rep.first_missing):
            print(f"  ... and {rep.missing - len(rep.first_missing)} more missing")
        for path, why in rep.first_corrupt:
            print(f"  corrupt: {path} ({why})")
        if rep.corrupt > len(rep.first_corrupt):
            print(f"  ... and {rep.corrupt - len(rep.first_corrupt)} more corrupt")
    return 0 if all(rep.passed for _, rep in reports) else 1


def _split_overrides(config: Optional[str], overrides: List[str]):
    """argparse puts a first 'key=value' into ``config`` when no config file is given."""
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *overrides]
    return config, overrides


def cmd_train(args) -> int:
    from longtail.core.config import (
        apply_overrides,
        load_config,
        split_selectors,
        validate,
    )
    from longtail.data.paths import resolve_data_root
    from longtail.engine.trainer import fit

    config, overrides = _split_overrides(args.config, args.overrides)
    selectors, _ = split_selectors(overrides)
    if args.resume:
        if config is not None or args.out:
            given = " and ".join(
                x
                for x in (
                    f"the config {config}" if config else "",
                    f"--out {args.out}" if args.out else "",
                )
                if x
            )
            raise LongtailError(
                f"--resume {args.resume} continues the run in that folder with the config it "
                f"saved; {given} would be ignored. Drop them (key=value overrides of "
                f"train.epochs and the like may follow --resume), or start a new run without "
                f"--resume."
            )
        if selectors:
            raise LongtailError(
                f"--resume {args.resume} continues the run with the config it "
                f"saved; {', '.join(f'{k}=...' for k in selectors)} cannot change "
                f"its files. Start a new run (longtail train RECIPE "
                f"{' '.join(f'{k}={v}' for k, v in selectors.items())}) instead."
            )
        from longtail.core.run_folder import RunFolder

        folder = RunFolder(args.resume)
        run_dir = folder.path
        cfg = validate(
            apply_overrides(folder.config_tree(), overrides), f"config {folder.config_path}"
        )
    else:
        if config is None:
            raise LongtailError(
                "No config given. Usage: longtail train CONFIG [data=NAME] "
                "[key=value ...], e.g. longtail train configs/methods/ce.yaml "
                "data=cifar10_lt train.epochs=2."
            )
        cfg = load_config(config, overrides)
        from longtail.api import default_run_dir

        run_dir = Path(args.out) if args.out else default_run_dir(Path(config), selectors)
    args.run_dir = run_dir  # for the Ctrl-C message
    if args.print_config:
        from longtail.engine.config_check import check_config

        if not cfg.stages:  # a pipeline's stages are checked when they are expanded
            check_config(cfg)
        print(cfg.to_yaml(), end="")
        return 0
    if cfg.stages:  # a multi-stage config: RUN_DIR/<stage>/ each (longtail.engine.pipeline)
        from longtail.engine.pipeline import run_pipeline

        run_pipeline(
            cfg,
            run_dir,
            resolve_data_root(args.data_root),
            resume=bool(args.resume),
            overrides=overrides,
            source=None if args.resume else Path(config),
        )
        return 0
    fit(cfg, run_dir, resolve_data_root(args.data_root), resume=bool(args.resume))
    return 0


def _interrupted(run_dir: Optional[Path]) -> str:
    """What Ctrl-C left: the folder, and --resume only when there is something to resume."""
    from longtail.core.run_folder import RunFolder

    if run_dir is None:
        return "interrupted."
    folder = RunFolder(run_dir)
    if folder.is_finished():
        return f"interrupted after the run finished; its results are in {run_dir}."
    if folder.has_checkpoint():
        return (
            f"interrupted; {run_dir} holds a checkpoint: continue with "
            f"`longtail train --resume {run_dir}`."
        )
    if folder.is_run():
        return (
            f"interrupted before the first checkpoint of {run_dir}; "
            f"`longtail train --resume {run_dir}` starts it again from epoch 0."
        )
    return "interrupted before the run started; nothing was written."


def cmd_eval(args) -> int:
    from longtail.data.paths import resolve_data_root
    from longtail.engine.evaluate_run import evaluate_run
    from longtail.engine.report import results_table

    results = evaluate_run(Path(args.run_dir), resolve_data_root(args.data_root))
    if args.json:
        print(json.dumps(results))
    else:
        splits = {
            "test": results,
            **{k: v for k, v in results.items() if isinstance(v, dict) and "top1" in v},
        }
        print(results_table(splits))
    return 0


def cmd_compare(args) -> int:
    from longtail.engine.compare import load_runs, metrics_table, write_compare

    names = None
    if args.names is not None:  # --names a,b,c as well as --names a b c
        names = [n for part in args.names for n in part.split(",") if n]
    runs = load_runs([Path(p) for p in args.run_dirs], names)
    out = Path(args.out) if args.out else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    md, page = write_compare(runs, out, args.title)
    print(metrics_table(runs).markdown())
    print(f"\nreport: {page}   table: {md}")
    return 0


def _bench_command(args) -> str:
    """The bench invocation as a re-runnable command line (options at their defaults left out)."""
    import shlex

    parts = ["longtail", "bench", args.suite]
    for flag, value, default in (
        ("--out", args.out, "runs/bench"),
        ("--data-root", args.data_root, None),
        ("--only", args.only, None),
        ("--results", args.results, "benchmarks/results"),
        ("--docs", args.docs, "docs/results.md"),
        ("--jobs", args.jobs, 1),
        ("--launcher", args.launcher, "local"),
        ("--threads", args.threads, None),
        ("--epochs", args.epochs, None),
    ):
        if value != default:
            parts += [flag, str(value)]
    parts += [
        flag
        for flag, on in (
            ("--subprocess", args.subprocess),
            ("--dry-run", args.dry_run),
            ("--report-only", args.report_only),
        )
        if on
    ]
    parts += [a for kv in args.slurm for a in ("--slurm", kv)]
    parts += [a for kv in args.set for a in ("--set", kv)]
    return shlex.join(parts)


def _slurm_params(pairs) -> dict:
    """``--slurm KEY=VALUE`` options as submitit parameters (values read as YAML scalars)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise LongtailError(
                f"--slurm {pair!r}: give KEY=VALUE, e.g. --slurm slurm_partition=gpu."
            )
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_bench(args) -> int:
    from longtail.bench.runner import BenchOptions, run_bench

    for kv in args.set:
        if "=" not in kv:
            raise LongtailError(f"--set {kv!r}: give KEY=VALUE, e.g. --set optim.lr=0.05.")

    return run_bench(
        BenchOptions(
            suite=args.suite,
            out=Path(args.out),
            data_root=args.data_root,
            only=args.only,
            dry_run=args.dry_run,
            subprocess=args.subprocess,
            results_dir=Path(args.results),
            report_only=args.report_only,
            docs=Path(args.docs) if args.docs else None,
            command=_bench_command(args),
            jobs=args.jobs,
            launcher=args.launcher,
            threads=args.threads,
            slurm=_slurm_params(args.slurm),
            set_overrides=list(args.set),
            epochs=args.epochs,
        )
    )


def cmd_list(args) -> int:
    from longtail.engine.config_check import LISTED, describe_components

    if args.section is not None and not any(
        k == args.section or k.startswith(args.section + ".") for k in LISTED
    ):
        raise LongtailError(
            f"No section {args.section!r}: use one of "
            f"{', '.join(sorted({k.split('.')[0] for k in LISTED}))}."
        )
    rows = describe_components(args.section)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    section = None
    for r in rows:
        if r["section"] != section:
            section = r["section"]
            print(f"\n{section}:" if r is not rows[0] else f"{section}:")
        opts = (
            "any (checked by the component)"
            if r["options"] is None
            else (", ".join(r["options"]) or "none")
        )
        print(f"  {r['name']:<18} {r['summary']}")
        print(f"  {'':<18} options: {opts}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "bench": cmd_bench,
    "list": cmd_list,
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after options (train CONFIG --out DIR a.b=1): argparse leaves them over
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if args.command != "train" and overrides or len(overrides) != len(extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "train":
        args.overrides = [*args.overrides, *overrides]
    finished = False
    try:
        if args.command == "data":
            return {"stats": cmd_data_stats, "split": cmd_data_split, "check": cmd_data_check}[
                args.data_command
            ](args)
        rc = COMMANDS[args.command](args)
        finished = True
        return rc
    except LongtailError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `longtail list | head`
        sys.stderr.close()
        return 0
    except OSError as err:  # an unwritable --out, a full disk, a folder that vanished
        where = f" {err.filename}" if err.filename else ""
        print(
            f"error: cannot access{where}: {err.strerror or err}. Check that the path exists and is "
            f"writable, or choose another one.",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(_interrupted(getattr(args, "run_dir", None)), file=sys.stderr)
        return 130
    finally:
        from longtail.core.distributed import shutdown_distributed

        shutdown_distributed(barrier=finished)


if __name__ == "__main__":
    raise SystemExit(main())
