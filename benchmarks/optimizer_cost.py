#!/usr/bin/env python
"""Cost of a training step with SAM and RSAM against plain SGD, on CPU, in one run.

Three arms train the same ResNet-32 (``configs/methods/ce.yaml data=cifar10_lt``, same seed, same
channels_last setting as ``longtail train``) through the engine's own step,
``Method.train_step`` (closure protocol, ``optim.name`` = ``sgd`` | ``rsam`` | ``sam``), on the
same pre-built batches of 128: the real CIFAR-10-LT IF100 training subset, augmented by the
engine's TrainLoader (``LONGTAIL_DATA`` or ``--data-root``), or random images with
``--synthetic``. Batches are prepared before timing, so the numbers are step time only
(forward, loss, backward, optimiser), which is what the optimiser changes.

After ``--warmup`` untimed steps per arm, the arms take turns ``--repeats`` times (rounds
alternate SGD, RSAM, SAM / SAM, RSAM, SGD), each measurement ``--steps`` steps. A measurement's
value is its median step time. Reported: each arm's median over rounds, and the ratios RSAM/SGD
and SAM/SGD as the median of the per-round ratios (the check's statistic: each ratio pairs
measurements taken close together, which a shared machine's load bursts disturb least) and as
the ratio of the medians.

Load-independent evidence: every arm counts its forward passes (a forward hook on the model)
and backward passes (a post-accumulate-grad hook on the first trainable weight) during the
timed steps; per step they must be 1/1 (SGD), 1/1 (RSAM) and 2/2 (SAM).

Exit status 1 when RSAM/SGD > 1.15, SAM/SGD is outside [1.7, 2.3], or the pass counts differ
from the expected ones (``--no-check`` disables). Results: ``benchmarks/results/
optimizer_cost-cpu.json`` (``optimizer_cost-cpu-quick.json`` with ``--quick``) with machine,
git commit and command.

    LONGTAIL_DATA=/work/data python benchmarks/optimizer_cost.py            # full (~3 min)
    LONGTAIL_DATA=/work/data python benchmarks/optimizer_cost.py --quick    # smoke (< 30 s)
    python benchmarks/optimizer_cost.py --synthetic --quick --no-check      # no dataset needed
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
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

CONFIG = REPO_ROOT / "configs" / "methods" / "ce.yaml"  # with data=cifar10_lt
BATCH = 128
ARMS = ("sgd", "rsam", "sam")
EXPECTED_PASSES = {"sgd": 1, "rsam": 1, "sam": 2}
RSAM_MAX = 1.15
SAM_RANGE = (1.7, 2.3)


class Arm:
    """One optimiser: a Method built as ``build_run`` builds it, with pass counters attached."""

    def __init__(self, optim_name: str, overrides: List[str], counts: List[int], in_channels: int):
        from longtail.core.config import load_config
        from longtail.core.facts import RunFacts
        from longtail.engine.trainer import attach_step
        from longtail.losses import create as create_loss
        from longtail.methods import MethodContext, build_method
        from longtail.models import build_model

        self.name = optim_name
        # fp32: the arms compare optimisers, not precisions (train.amp=auto is resolved by build_run)
        self.cfg = load_config(CONFIG, [*overrides, f"optim.name={optim_name}", "train.amp=none"])
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights in every arm
        model = build_model(cfg.model, len(counts), in_channels)
        loss = create_loss(cfg.loss.name, class_counts=counts, **cfg.loss.params())
        ctx = MethodContext(
            cfg=cfg, model=model, loss=loss, class_counts=counts, device=torch.device("cpu")
        )
        self.method = build_method(cfg.method.name, ctx, cfg.method.params())
        facts = RunFacts(
            seed=cfg.seed,
            epochs=cfg.train.epochs,
            batch_size=cfg.train.batch_size,
            class_counts=counts,
            loss=loss,
        )
        optim = attach_step(self.method, cfg, facts, torch.device("cpu"))
        self.method.train_model.train()
        self.method.on_epoch_start(1)
        optim.set_epoch(1)  # (RSAM: decay factor 1, not epoch 0's 2)
        self.forwards = 0
        self.backwards = 0
        self.method.model.register_forward_hook(self._count_forward)
        first = next(p for p in self.method.model.parameters() if p.requires_grad)
        first.register_post_accumulate_grad_hook(self._count_backward)
        self.step_seconds: List[float] = []
        self.last_loss = float("nan")

    def _count_forward(self, module, args, output) -> None:
        if module.training:
            self.forwards += 1

    def _count_backward(self, param) -> None:
        self.backwards += 1

    def measure(self, batches) -> float:
        """Train on ``batches``; returns the median step time (seconds)."""
        times = []
        for batch in batches:
            start = time.perf_counter()
            stats = self.method.train_step(batch)
            loss = float(stats["loss"])  # waits for the step (CPU: already done)
            times.append(time.perf_counter() - start)
        self.last_loss = loss
        self.step_seconds.extend(times)
        return median(times)


def real_batches(data_root: Path, cfg, n: int):
    """The first ``n`` augmented batches of epoch 0 of the engine's TrainLoader."""
    from longtail.data import build_data
    from longtail.data.loader import TrainLoader
    from longtail.data.samplers import build_sampler

    d = cfg.data
    data = build_data(
        d.dataset,
        data_root,
        imbalance_factor=d.imbalance_factor,
        profile=d.profile,
        seed=d.subset_seed,
        val_per_class=d.val_per_class,
    )
    counts = list(data.class_counts)
    sampler = build_sampler(
        cfg.sampler.name, data.train.labels.numpy(), counts, seed=cfg.seed, **cfg.sampler.params()
    )
    loader = TrainLoader(
        data.train.images,
        data.train.labels,
        sampler,
        BATCH,
        data.mean,
        data.std,
        device=torch.device("cpu"),
        seed=cfg.seed,
        padding=d.crop_padding,
        flip=d.flip,
        channels_last=cfg.train.channels_last,
    )
    batches = list(itertools.islice(loader.epoch(0), n))
    if len(batches) < n:
        raise SystemExit(f"need {n} batches, an epoch has {len(batches)}: lower --steps")
    return batches, counts, data.in_channels, len(data.train)


def synthetic_batches(cfg, n: int):
    from longtail.data.loader import Batch

    g = torch.Generator().manual_seed(cfg.seed)
    counts = [5000 // (2**i) + 1 for i in range(10)]  # long-tailed class counts (loss only)
    out = []
    for i in range(n):
        images = torch.randn(BATCH, 3, 32, 32, generator=g)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (BATCH,), generator=g)
        out.append(Batch(images, labels, torch.arange(i * BATCH, (i + 1) * BATCH)))
    return out, counts, 3, None


def parse_args(argv=None) -> argparse.Namespace:
    p = timing_parser(
        __doc__,
        "optimizer_cost",
        steps=8,
        repeats=7,
        warmup=3,
        quick_help="1 warm-up + 2 rounds of 1 step",
    )
    p.add_argument("--synthetic", action="store_true", help="random images instead of CIFAR-10-LT")
    p.add_argument(
        "--no-check",
        action="store_true",
        help=f"exit 0 even when RSAM/SGD > {RSAM_MAX}, SAM/SGD is outside "
        f"{list(SAM_RANGE)} or the pass counts are not 1/1/2",
    )
    return parse_timing_args(p, argv, "optimizer_cost", quick=(1, 2, 1))


def main(argv=None) -> int:
    args = parse_args(argv)
    from longtail.core.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = load_average()
    t0 = time.perf_counter()
    overrides = [
        "data=cifar10_lt",
        "train.device=cpu",
        "train.progress=false",
        f"train.batch_size={BATCH}",
    ]
    if args.threads:
        overrides.append(f"train.num_threads={args.threads}")
    base_cfg = load_config(CONFIG, overrides)
    n_batches = args.warmup + args.steps * args.repeats
    if args.synthetic:
        data_root = None
        batches, counts, in_channels, train_images = synthetic_batches(base_cfg, n_batches)
        source = "synthetic (random normal images, random labels)"
    else:
        from longtail.data.paths import resolve_data_root

        data_root = resolve_data_root(args.data_root)
        batches, counts, in_channels, train_images = real_batches(data_root, base_cfg, n_batches)
        source = f"CIFAR-10-LT IF100 ({train_images} training images), engine augmentation"
    arms = {name: Arm(name, overrides, counts, in_channels) for name in ARMS}
    build_s = time.perf_counter() - t0
    warm, timed = batches[: args.warmup], batches[args.warmup :]
    print(
        f"{source}; batch {BATCH}; ResNet-32; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.warmup} warm-up + {args.repeats} x "
        f"{args.steps} steps per arm",
        flush=True,
    )

    for arm in arms.values():
        if warm:
            arm.measure(warm)
        arm.forwards = arm.backwards = 0
        arm.step_seconds = []

    t1 = time.perf_counter()
    runs: Dict[str, List[float]] = {name: [] for name in ARMS}
    for r in range(args.repeats):
        chunk = timed[r * args.steps : (r + 1) * args.steps]  # every arm trains on the same batches
        order = ARMS if r % 2 == 0 else tuple(reversed(ARMS))
        for name in order:
            runs[name].append(arms[name].measure(chunk))
        print(
            f"  round {r + 1}/{args.repeats}  "
            + "  ".join(f"{name} {1000 * runs[name][-1]:7.1f} ms" for name in ARMS),
            flush=True,
        )
    measure_s = time.perf_counter() - t1

    steps_timed = args.steps * args.repeats
    passes = {
        name: {
            "forward": arms[name].forwards / steps_timed,
            "backward": arms[name].backwards / steps_timed,
        }
        for name in ARMS
    }
    med = {name: median(v) for name, v in runs.items()}
    paired = {name: [a / s for a, s in zip(runs[name], runs["sgd"])] for name in ("rsam", "sam")}
    ratio_paired = {name: median(v) for name, v in paired.items()}
    ratio_medians = {name: med[name] / med["sgd"] for name in ("rsam", "sam")}

    passes_ok = all(
        passes[n]["forward"] == passes[n]["backward"] == EXPECTED_PASSES[n] for n in ARMS
    )
    rsam_ok = ratio_paired["rsam"] <= RSAM_MAX
    sam_ok = SAM_RANGE[0] <= ratio_paired["sam"] <= SAM_RANGE[1]
    passed = passes_ok and rsam_ok and sam_ok

    rows = []
    for name in ARMS:
        v = runs[name]
        rows.append(
            [
                name,
                f"{passes[name]['forward']:g} / {passes[name]['backward']:g}",
                f"{1000 * med[name]:.1f}",
                f"{1000 * min(v):.1f}",
                f"{1000 * max(v):.1f}",
                f"{100 * spread(v):.1f}%",
                "1" if name == "sgd" else f"{ratio_paired[name]:.3f}",
                "1" if name == "sgd" else f"{ratio_medians[name]:.3f}",
                f"{arms[name].last_loss:.3f}",
            ]
        )
    print()
    print(
        format_table(
            [
                "optimiser",
                "fwd / bwd per step",
                "step ms (median)",
                "min",
                "max",
                "spread",
                "x SGD (paired)",
                "x SGD (medians)",
                "last loss",
            ],
            rows,
        )
    )
    print(
        f"\ncheck: passes per step 1/1/2: {'PASS' if passes_ok else 'FAIL'}; "
        f"RSAM/SGD {ratio_paired['rsam']:.3f} <= {RSAM_MAX}: {'PASS' if rsam_ok else 'FAIL'}; "
        f"SAM/SGD {ratio_paired['sam']:.3f} in [{SAM_RANGE[0]}, {SAM_RANGE[1]}]: "
        f"{'PASS' if sam_ok else 'FAIL'}"
    )

    result = run_header("optimizer_cost")
    result["machine"]["load_average_at_start"] = load_at_start
    result["machine"]["load_average_at_end"] = result["machine"].pop("load_average_1_5_15", None)
    result.update(
        {
            "settings": {
                "device": "cpu",
                "data": source,
                "synthetic": args.synthetic,
                "data_root": None if data_root is None else str(data_root),
                "model": base_cfg.model.backbone,
                "batch_size": BATCH,
                "channels_last": base_cfg.train.channels_last,
                "config": str(CONFIG.relative_to(REPO_ROOT)),
                "overrides": overrides,
                "optimizers": {
                    name: {
                        "optim.name": name,
                        "rho": arms[name].cfg.optim.params().get("rho"),
                        "dis_mul": arms[name].cfg.optim.params().get("dis_mul"),
                    }
                    for name in ARMS
                },
                "steps": args.steps,
                "repeats": args.repeats,
                "warmup_steps": args.warmup,
                "threads": torch.get_num_threads(),
                "threads_requested": args.threads,
                "quick": args.quick,
                "order": "rounds alternate sgd, rsam, sam / sam, rsam, sgd; same batches per round",
                "measurement": "median step time of the steps of one measurement",
                "build_seconds": round(build_s, 2),
                "measure_seconds": round(measure_s, 1),
            },
            "passes_per_step": passes,
            "step_seconds": {
                name: {
                    "median": med[name],
                    "runs": runs[name],
                    "spread": spread(runs[name]),
                    "all_steps": arms[name].step_seconds,
                    "last_loss": arms[name].last_loss,
                }
                for name in ARMS
            },
            "ratios": {
                "rsam_over_sgd_paired_median": ratio_paired["rsam"],
                "sam_over_sgd_paired_median": ratio_paired["sam"],
                "rsam_over_sgd_paired": paired["rsam"],
                "sam_over_sgd_paired": paired["sam"],
                "rsam_over_sgd_medians": ratio_medians["rsam"],
                "sam_over_sgd_medians": ratio_medians["sam"],
            },
            "check": {
                "statistic": "paired medians and passes per step",
                "expected_passes": EXPECTED_PASSES,
                "rsam_max": RSAM_MAX,
                "sam_range": list(SAM_RANGE),
                "passes_ok": passes_ok,
                "rsam_ok": rsam_ok,
                "sam_ok": sam_ok,
                "passed": passed,
                "enforced": not args.no_check,
            },
        }
    )
    if not all(math.isfinite(arm.last_loss) for arm in arms.values()):
        print("warning: a non-finite training loss was seen", file=sys.stderr)
    path = write_json(Path(args.out), result)
    print(f"\nwrote {path}")
    if not passed and not args.no_check:
        print("FAIL: see the check line above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
