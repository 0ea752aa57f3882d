#!/usr/bin/env python
"""Cost of a training step of the meta-learning methods against plain CE, on CPU, in one run.

Each arm is a config (plus overrides) built exactly as ``longtail train`` builds it
(``build_run``, then the schedule built and attached as in ``fit``), and trained through the
engine's per-step path (schedule factor, ``set_lr``, ``Method.train_step``: MFM's meta step,
MLR-SNet's step hook) on the same pre-built augmented batches of the real CIFAR-10-LT IF100
training subset (the CE run's TrainLoader; ``LONGTAIL_DATA`` or ``--data-root``). Once-per-run
work (MLR-SNet's gamma, computed on ``gamma_images`` images at an epoch start) is done before the
clock starts.

A measurement is the *mean* step time over ``--steps`` consecutive steps (40 by default: a
multiple of every arm's meta period, 1 / 8 / 10, so the periodic meta updates are counted at their
real rate; a median would hide them). After ``--warmup`` untimed steps per arm, the arms take turns
``--repeats`` times (the order reverses every round) and each arm's ratio to CE is the median of
its per-round ratios: each pairs two measurements taken close together, which load bursts on a
shared machine disturb least. An epoch is the same number of steps for every arm, so the step
ratio is the per-epoch cost ratio that the cifar-short table's "time vs CE" column estimates from
whole runs.

    LONGTAIL_DATA=/work/data python benchmarks/method_cost.py           # ~8 min on 2 cores
    LONGTAIL_DATA=/work/data python benchmarks/method_cost.py --quick   # smoke (numbers meaningless)

Results: ``benchmarks/results/method_cost-cpu.json`` (``-quick`` with ``--quick``) with machine,
git commit and command.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import (  # noqa: E402
    REPO_ROOT,
    format_table,
    load_average,
    median,
    parse_timing_args,
    run_header,
    spread,
    timing_parser,
    write_json,
)

C10 = REPO_ROOT / "configs" / "methods"  # the recipes, run on data=cifar10_lt
BATCH = 128
# (label, config, overrides): the first arm is the reference
ARMS = [
    ("ce", C10 / "ce.yaml", []),
    ("mfm (meta every step)", C10 / "mfm.yaml", ["method.meta_every=1"]),
    ("mfm (meta every 8, cifar-short)", C10 / "mfm.yaml", ["method.meta_every=8"]),
    (
        "mlrsnet (meta every 10, cifar-short)",
        C10 / "mlrsnet.yaml",
        ["hooks.mlrsnet.meta_every=10", "hooks.mlrsnet.gamma_images=512"],
    ),
]


class Arm:
    def __init__(
        self, label: str, config: Path, overrides: List[str], data_root: Path, common: List[str]
    ):
        from longtail.core.config import load_config
        from longtail.engine.trainer import build_run

        self.label = label
        self.cfg = load_config(config, [*common, *overrides])
        self._tmp = tempfile.TemporaryDirectory(prefix="longtail-method-cost-")
        self.run = build_run(self.cfg, Path(self._tmp.name), data_root)
        self.run.method.train_model.train()
        self.run.method.on_epoch_start(0)
        for hook in self.run.hooks.values():  # MLR-SNet: gamma, before any timing
            hook.before_epoch(self.run, 0)
        self.step = 0
        self.last_loss = float("nan")

    def measure(self, batches) -> float:
        """Train on ``batches`` as train_one_epoch does; returns the mean step time (s)."""
        method, steps = self.run.method, len(self.run.loader)
        start = time.perf_counter()
        for batch in batches:
            self.run.optim.set_lr(self.run.schedule.factor(0, self.step % steps, steps))
            stats = method.train_step(batch)
            self.step += 1
        self.last_loss = float(stats["loss"])
        return (time.perf_counter() - start) / len(batches)


def parse_args(argv=None) -> argparse.Namespace:
    p = timing_parser(
        __doc__,
        "method_cost",
        steps=40,
        repeats=3,
        warmup=2,
        quick_help="1 warm-up + 1 round of 4 steps",
    )
    return parse_timing_args(p, argv, "method_cost", quick=(4, 1, 1))


def main(argv=None) -> int:
    args = parse_args(argv)
    from longtail.data.paths import resolve_data_root

    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = load_average()
    data_root = resolve_data_root(args.data_root)
    common = [
        "data=cifar10_lt",
        "train.device=cpu",
        "train.progress=false",
        f"train.batch_size={BATCH}",
    ]
    t0 = time.perf_counter()
    arms = [Arm(label, cfg, ov, data_root, common) for label, cfg, ov in ARMS]
    n = args.warmup + args.steps * args.repeats
    batches = list(
        itertools.islice(
            itertools.chain.from_iterable(arms[0].run.loader.epoch(e) for e in itertools.count()), n
        )
    )
    build_s = time.perf_counter() - t0
    print(
        f"CIFAR-10-LT IF100, batch {BATCH}, ResNet-32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.warmup} warm-up + {args.repeats} x "
        f"{args.steps} steps per arm",
        flush=True,
    )
    warm, timed = batches[: args.warmup], batches[args.warmup :]
    for arm in arms:
        if warm:
            arm.measure(warm)
    runs: Dict[str, List[float]] = {a.label: [] for a in arms}
    t1 = time.perf_counter()
    for r in range(args.repeats):
        chunk = timed[r * args.steps : (r + 1) * args.steps]
        for arm in arms if r % 2 == 0 else list(reversed(arms)):
            runs[arm.label].append(arm.measure(chunk))
        print(
            f"  round {r + 1}/{args.repeats}  "
            + "  ".join(f"{a.label.split(' ')[0]} {1000 * runs[a.label][-1]:.0f} ms" for a in arms),
            flush=True,
        )
    measure_s = time.perf_counter() - t1

    ref = arms[0].label
    ratios = {a.label: median([x / c for x, c in zip(runs[a.label], runs[ref])]) for a in arms}
    rows = [
        [
            a.label,
            f"{1000 * median(runs[a.label]):.0f}",
            f"{100 * spread(runs[a.label]):.1f}%",
            f"{ratios[a.label]:.2f}x",
            f"{a.last_loss:.3f}",
        ]
        for a in arms
    ]
    print()
    print(
        format_table(
            ["method", "step ms (median of means)", "spread", f"x {ref} (paired)", "last loss"],
            rows,
        )
    )
    result = run_header("method_cost")
    result["machine"]["load_average_at_start"] = load_at_start
    result.update(
        {
            "settings": {
                "device": "cpu",
                "data": "CIFAR-10-LT IF100 (real), engine augmentation",
                "data_root": str(data_root),
                "batch_size": BATCH,
                "common_overrides": common,
                "arms": [
                    {"label": lab, "config": str(c.relative_to(REPO_ROOT)), "overrides": o}
                    for lab, c, o in ARMS
                ],
                "steps": args.steps,
                "repeats": args.repeats,
                "warmup_steps": args.warmup,
                "threads": torch.get_num_threads(),
                "quick": args.quick,
                "measurement": "mean step time over `steps` consecutive steps",
                "order": "rounds alternate the arm order; same batches per round",
                "build_seconds": round(build_s, 1),
                "measure_seconds": round(measure_s, 1),
            },
            "step_seconds": {
                label: {"median": median(v), "runs": v, "spread": spread(v)}
                for label, v in runs.items()
            },
            "ratio_to_ce_paired_median": ratios,
        }
    )
    path = write_json(Path(args.out), result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
