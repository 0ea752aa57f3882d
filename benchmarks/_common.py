"""Shared helpers for the scripts in ``benchmarks/``: machine facts, git commit, command line,
table printing and JSON writing.

Every benchmark writes one JSON file under ``benchmarks/results/`` holding ``machine``, ``git``,
``command`` and its own ``results``, so a number can always be traced to the code, the machine
and the exact invocation that produced it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from longtail.bench.machine import command_info, cpu_model, git_info, machine_info, usable_cores  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run_header(name: str) -> Dict[str, Any]:
    """The common part of every result file."""
    return {
        "benchmark": name,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "git": git_info(),
        **command_info(),
    }


def write_json(path: Path, data: Dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON atomically (temp file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how much repeated measurements disagree."""
    m = median(values)
    return float((max(values) - min(values)) / m) if m else float("nan")


def format_table(headers: Sequence[str], rows: List[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns (first column left-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def timing_parser(
    doc: str, name: str, steps: int, repeats: int, warmup: int, quick_help: str
) -> argparse.ArgumentParser:
    """The options every paired-timing benchmark shares (its own go between this and
    :func:`parse_timing_args`): --steps --repeats --warmup --threads --quick --data-root --out."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=steps, help=f"steps per measurement ({steps})")
    p.add_argument(
        "--repeats",
        type=int,
        default=repeats,
        help=f"measurements per arm, interleaved ({repeats})",
    )
    p.add_argument(
        "--warmup", type=int, default=warmup, help=f"untimed steps per arm first ({warmup})"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's default)",
    )
    p.add_argument(
        "--quick", action="store_true", help=f"smoke run: {quick_help} (numbers are not meaningful)"
    )
    p.add_argument("--data-root", default=None, help="datasets folder (default: $LONGTAIL_DATA)")
    p.add_argument(
        "--out",
        default=None,
        help=f"JSON result path (default benchmarks/results/"
        f"{name}-cpu.json; {name}-cpu-quick.json with --quick)",
    )
    return p


def parse_timing_args(
    p: argparse.ArgumentParser,
    argv: Optional[Sequence[str]],
    name: str,
    quick: Tuple[int, int, int],
) -> argparse.Namespace:
    """Parse; ``--quick`` sets (steps, repeats, warmup) to ``quick``; check the counts; fill
    the default ``--out``."""
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup = quick
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.out is None:
        args.out = RESULTS_DIR / f"{name}-cpu{'-quick' if args.quick else ''}.json"
    return args


def load_average() -> Optional[List[float]]:
    """The 1 / 5 / 15-minute load averages (None where the OS has none): how busy the machine was."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
