#!/usr/bin/env python
"""The prepared GPU check (run it through ``benchmarks/gpu_check.sh``, which sets up the Python
path and the carried wheels): CUDA tests, throughput against a hand-written loop, and the
200-epoch CIFAR-10-LT IF100 suite run concurrently, each step inside its share of a time budget;
one JSON + Markdown result with machine, commit and command, whatever step fails or runs out.

The suite's rows are set beside the published numbers (CE 70.4, LDAM-DRW 77.0, LA 77.7 on the
full CIFAR-10 test set): a row within 2.5 points (about two standard errors of our 1,017-image
test set) is "close"; val is reported too. ``--quick`` runs every step with tiny settings on any
device (the test suite runs it on the CPU), so the script works the first time a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from longtail.bench.machine import git_info, machine_info, short_machine  # noqa: E402
from longtail.bench.references import references  # noqa: E402
from longtail.bench.report import group_rows  # noqa: E402

SUITE = "gpu-cifar10"
CLOSE = 2.5  # points: about two standard errors of the 1,017-image test set
# --quick: every run of the suite tiny (1 epoch, ResNet-8, 20 images per class)
QUICK_SET = [
    "model.backbone=resnet8",
    "data.max_per_class=20",
    "data.val_per_class=3",
    "train.batch_size=32",
    "train.eval_batch_size=64",
]


def run_step(name: str, cmd: List[str], limit: float, log: Path, env=None) -> Dict[str, Any]:
    """Run ``cmd`` in its own process group with output appended to ``log``; past ``limit``
    seconds the group gets SIGINT (runs stop and stay resumable), then SIGKILL."""
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n===== {name}: {shlex.join(cmd)}  (limit {limit:.0f}s)\n")
        out.flush()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
        )
        timed_out = False
        try:
            rc = proc.wait(timeout=max(limit, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGINT)
            try:
                rc = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
    seconds = time.perf_counter() - start
    print(f"{name}: exit {rc}{' (time limit)' if timed_out else ''} after {seconds:.0f}s")
    return {
        "name": name,
        "command": shlex.join(cmd),
        "rc": rc,
        "seconds": round(seconds, 1),
        "timed_out": timed_out,
        "limit_s": round(limit),
    }


def data_root(arg: Optional[str]) -> Optional[str]:
    """A data folder: the given one, a .tgz pack unpacked once, the default pack, or None
    ($LONGTAIL_DATA then decides)."""
    path = Path(arg) if arg else ROOT / ".gpu" / "cifar10-lt.tgz"
    if not path.exists():
        if arg:
            raise SystemExit(f"gpu_check: --data {arg} does not exist")
        return None
    if path.is_dir():
        return str(path)
    target = Path("/tmp/longtail-gpu-data")
    if not (target / "cifar-10-batches-py" / "batches.meta").is_file():
        with tarfile.open(path) as tar:
            tar.extractall(target, filter="data")
    return str(target)


def junit_summary(path: Path) -> Dict[str, int]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def suite_rows(results: Path) -> List[Dict[str, Any]]:
    """The suite's runs with our test / val top-1 and the published numbers beside them."""
    try:
        data = json.loads(results.read_text())
    except (OSError, ValueError):
        return []
    out = []
    for g in group_rows(data.get("rows", [])):
        refs = references(g["method"], g["dataset"], g.get("imbalance_factor") or 0)
        ours = (g.get("test") or {}).get("top1") if g["n"] else None
        ref = refs[0].top1 if refs else None
        diff = None if ours is None or ref is None else ours - ref
        out.append(
            {
                "run": g["name"],
                "method": g["method"],
                "status": g["status"],
                "epochs": g.get("epochs"),
                "test_top1": ours,
                "val_top1": (g.get("val") or {}).get("top1") if g["n"] else None,
                "published": ref,
                "published_source": refs[0].citation() if refs else None,
                "diff": diff,
                "close": None if diff is None else abs(diff) <= CLOSE,
                "images_per_s": g.get("images_per_s"),
                "wall_seconds": g.get("wall_seconds"),
            }
        )
    return out


def parity_summary(results: Path) -> Dict[str, Any]:
    """bf16 against fp32 (the amp-parity suite): mean ± sd per precision, the checks, the ratio."""
    try:
        data = json.loads(results.read_text())
    except (OSError, ValueError):
        return {}
    groups = {g["name"]: g for g in group_rows(data.get("rows", []))}
    out: Dict[str, Any] = {
        name: {
            "n": g["n"],
            "test_top1": (g.get("test") or {}).get("top1"),
            "test_sd": (g.get("test_sd") or {}).get("top1"),
            "val_top1": (g.get("val") or {}).get("top1"),
            "val_sd": (g.get("val_sd") or {}).get("top1"),
            "images_per_s": g.get("images_per_s"),
        }
        for name, g in groups.items()
    }
    bf16 = groups.get("c10-bf16") or {}
    out["bf16_time_vs_fp32"] = bf16.get("time_vs_baseline")
    out["checks"] = [
        {k: c.get(k) for k in ("claim", "metric", "diff", "se", "status")}
        for c in data.get("check_results", [])
    ]
    return out


def fmt(x: Any, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(record: Dict[str, Any], throughput_md: str) -> str:
    lines = [
        "# GPU check"
        + (" (quick: tiny settings, numbers not meaningful)" if record["quick"] else ""),
        "",
        f"- Machine: {record['machine_line']}",
        f"- Commit: `{record['git'].get('commit')}`"
        + (" (dirty)" if record["git"].get("dirty") else ""),
        f"- Command: `{record['command']}`",
        f"- Written: {record['date_utc']}; budget {record['budget_s']} s, used {record['seconds']:.0f} s",
        "",
        "## Steps",
        "",
        "| step | exit | seconds | limit | note |",
        "|---|--:|--:|--:|---|",
    ]
    for s in record["steps"]:
        lines.append(
            f"| {s['name']} | {s['rc']} | {s['seconds']:.0f} | {s['limit_s']} | "
            f"{'stopped at its time limit' if s['timed_out'] else ''} |"
        )
    t = record.get("tests") or {}
    lines += [
        "",
        "## CUDA tests (`pytest -m cuda`)",
        "",
        (
            f"{t.get('passed', 0)} passed, {t.get('failures', 0)} failed, {t.get('errors', 0)} "
            f"errors, {t.get('skipped', 0)} skipped of {t.get('tests', 0)}."
            if t
            else "No test report (see steps.log)."
        ),
        "",
        "## Throughput",
        "",
        throughput_md or "No throughput result (see steps.log).",
        "",
        "## bf16 against fp32 (amp-parity: CE, 4 epochs, 3 seeds each)",
        "",
        *parity_lines(record.get("amp_parity") or {}),
        "",
        f"## {SUITE}: CIFAR-10-LT IF100, each recipe's own schedule",
        "",
        "Published: test top-1 on the full 10,000-image test set; ours: the 1,017 test images this "
        f"project has (standard error ~1.4 points) and the balanced val split. close: within "
        f"{CLOSE} points.",
        "",
        "| run | status | epochs | ours: test | ours: val | published | difference | close | img/s | wall s |",
        "|---|---|--:|--:|--:|--:|--:|---|--:|--:|",
    ]
    for r in record.get("suite") or []:
        lines.append(
            f"| {r['run']} | {r['status']} | {r['epochs']} | {fmt(r['test_top1'])} | "
            f"{fmt(r['val_top1'])} | {fmt(r['published'])} | {fmt(r['diff'], '+.2f')} | "
            f"{'–' if r['close'] is None else ('yes' if r['close'] else 'NO')} | "
            f"{fmt(r['images_per_s'], '.0f')} | {fmt(r['wall_seconds'], '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def parity_lines(p: Dict[str, Any]) -> List[str]:
    if not p:
        return ["No result (see steps.log)."]
    lines = ["| precision | seeds | test top-1 | val top-1 | img/s |", "|---|--:|--:|--:|--:|"]
    for name in ("c10-fp32", "c10-bf16"):
        g = p.get(name) or {}
        lines.append(
            f"| {name[4:]} | {g.get('n', 0)} | {fmt(g.get('test_top1'))} ± {fmt(g.get('test_sd'))} | "
            f"{fmt(g.get('val_top1'))} ± {fmt(g.get('val_sd'))} | {fmt(g.get('images_per_s'), '.0f')} |"
        )
    checks = "; ".join(
        f"{c['claim']} on {c['metric']}: {c['status']}" for c in p.get("checks") or []
    )
    return lines + ["", f"bf16 wall time / fp32: {fmt(p.get('bf16_time_vs_fp32'))}x. {checks}"]


def throughput_markdown(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    table = data.get("table")
    if isinstance(table, str):
        return "```\n" + table + "\n```"
    return "```\n" + json.dumps(data.get("results", data), indent=1)[:4000] + "\n```"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings, any device")
    p.add_argument("--out", default=os.environ.get("OUT") or None, help="result folder")
    p.add_argument("--data", default=None, help="data folder or .tgz pack")
    p.add_argument("--budget", type=float, default=470.0, help="seconds for all steps")
    p.add_argument("--jobs", type=int, default=None, help="suite runs at once (8; quick: 2)")
    args = p.parse_args(argv)
    out = Path(
        args.out
        or ROOT / "benchmarks" / "results" / ("gpu-check-quick" if args.quick else "gpu-check")
    )
    out.mkdir(parents=True, exist_ok=True)
    log = out / "steps.log"
    runs = Path("/tmp/longtail-gpu-runs" if not args.quick else out / "runs")
    root = data_root(args.data)
    started = time.perf_counter()
    env = dict(os.environ)
    if root:
        env["LONGTAIL_DATA"] = root
    py = sys.executable
    steps = []

    def left() -> float:
        return args.budget - (time.perf_counter() - started)

    def limit(cap: float, share: float) -> float:
        """A step's time limit: its share of the GPU budget; --quick (a smoke run on a possibly
        loaded CPU) lets each step use what is left of the budget."""
        return max(left() - 10.0, 30.0) if args.quick else min(cap, share * args.budget)

    # 1. the CUDA tests (skipped on a machine without CUDA)
    junit = Path("/tmp") / f"longtail-gpu-junit-{os.getpid()}.xml"
    steps.append(
        run_step(
            "cuda-tests",
            [
                py,
                "-m",
                "pytest",
                "-m",
                "cuda",
                "tests/test_cuda.py",
                "-q",
                "-p",
                "no:cacheprovider",
                f"--junitxml={junit}",
            ],
            limit(150.0, 0.3),
            log,
            env,
        )
    )
    tests = junit_summary(junit)

    # 2. throughput: the engine against the hand-written loop, and runs at once on one device
    tp = out / "throughput.json"
    tp_cmd = [py, "benchmarks/throughput.py", "--device", "auto", "--out", str(tp), "--no-check"]
    tp_cmd += ["--quick"] if args.quick else ["--amp", "bf16", "--concurrent", "8", "--steps", "97"]
    steps.append(run_step("throughput", tp_cmd, limit(100.0, 0.21), log, env))

    def bench(suite: str, jobs: int) -> List[str]:
        """``longtail bench SUITE`` into this check's folders (--quick: every run tiny)."""
        cmd = [py, "-m", "longtail", "bench", suite, "--out", str(runs), "--results", str(out)]
        cmd += ["--docs", str(out / "results-page.md.tmp"), "--jobs", str(jobs)]
        if args.quick:
            cmd += ["--epochs", "1", *(a for kv in QUICK_SET for a in ("--set", kv))]
        return cmd

    # 3. bf16 against fp32: the same accuracy within seed noise, and the speed ratio
    parity = bench("amp-parity", 2 if args.quick else 6)
    steps.append(run_step("amp-parity", parity, limit(75.0, 0.16), log, env))

    # 4. the 200-epoch table, every run at once
    suite = bench(SUITE, args.jobs or (2 if args.quick else 8))
    steps.append(run_step("suite", suite, max(left() - 15.0, 30.0), log, env))
    Path(out / "results-page.md.tmp").unlink(missing_ok=True)

    git = git_info(ROOT)
    if not git.get("commit") and (ROOT / ".gpu" / "COMMIT").is_file():  # no .git on that machine
        git = {**json.loads((ROOT / ".gpu" / "COMMIT").read_text()), "from": ".gpu/COMMIT"}
    machine = machine_info()
    record = {
        "benchmark": "gpu_check",
        "quick": args.quick,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "machine_line": short_machine(machine),
        "git": git,
        "command": shlex.join(
            ["bash", "benchmarks/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])]
        ),
        "budget_s": args.budget,
        "seconds": time.perf_counter() - started,
        "data_root": root,
        "steps": steps,
        "tests": tests,
        "throughput_file": tp.name if tp.is_file() else None,
        "suite": suite_rows(out / f"{SUITE}.json"),
        "amp_parity": parity_summary(out / "amp-parity.json"),
    }
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(record, throughput_markdown(tp)))
    print((out / "gpu_check.md").read_text())
    ok = all(s["rc"] == 0 for s in steps) and not tests.get("failures") and not tests.get("errors")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
