#!/usr/bin/env python
"""Training throughput on CPU: the ``longtail train`` engine against a minimal hand-written loop.

Both sides train ResNet-32 (``longtail.models.build_model``, same seed) on the real CIFAR-10-LT
IF100 training subset with batch 128, random crop (4-px zero padding) + horizontal flip +
normalisation, cross-entropy and SGD (momentum 0.9, weight decay 2e-4), in one process:

* engine: the run is built by ``build_run`` from ``configs/methods/ce.yaml data=cifar10_lt`` exactly as
  ``longtail train`` builds it (progress bar on, as users have it) and driven by the engine's own
  ``train_one_epoch`` with its tqdm bar, schedule, sampler, TrainLoader and ``Method.train_step``.
  The only change is that each "epoch" is cut to its first ``--steps`` batches (the real loader's
  iterator, sliced), so a measurement has a fixed length;
* hand: the simplest idiomatic PyTorch loop (no torchvision, nothing from longtail but the model
  and the data tensors): a random permutation, uint8 gather, inline batched crop/flip,
  normalisation, ``F.cross_entropy``, ``torch.optim.SGD``.

A third arm trains the engine with the other memory format (``train.channels_last``), so the same
run also gives channels_last vs contiguous for the engine. After warm-up, the arms take turns
``--repeats`` times, the engine always in the middle (hand, engine, other / other, engine, hand),
so each ratio pairs two measurements taken back to back. Reported: each side's median images/s,
the ratio of those medians, and the median of the per-round paired ratios. The check uses the
paired median: on a machine shared with other jobs, bursts of load slow a few measurements by
several times, which can tip one side's median, while a back-to-back pair mostly sees the same
load. Exit status 1 when engine/hand < 0.9 (``--no-check`` disables). Each measurement's median
step time is recorded as well (a view insensitive to bursts inside a measurement).

    LONGTAIL_DATA=/work/data python benchmarks/throughput.py            # full run (a few minutes)
    LONGTAIL_DATA=/work/data python benchmarks/throughput.py --quick --no-check   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
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
from tqdm import tqdm  # noqa: E402

CONFIG = REPO_ROOT / "configs" / "methods" / "ce.yaml"  # with data=cifar10_lt
DATASET = "cifar10-lt"
BATCH = 128
PADDING = 4
THRESHOLD = 0.9


# ---------------------------------------------------------------------------------------------
# engine side: the real `longtail train` path


class StepWindow:
    """The run's own TrainLoader with every epoch cut to its first ``steps`` batches."""

    def __init__(self, loader, steps: int):
        self.loader = loader
        self.steps = steps
        self.marks: List[float] = []

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int):
        # a time mark as each batch is handed over, and one when the trainer asks past the last:
        # consecutive marks bound one step (train_step of a batch + loading the next)
        self.marks = []
        for batch in itertools.islice(self.loader.epoch(epoch), self.steps):
            self.marks.append(time.perf_counter())
            yield batch
        self.marks.append(time.perf_counter())

    def __getattr__(self, name):
        return getattr(self.loader, name)


class EngineArm:
    """``build_run`` + ``train_one_epoch`` with the tqdm bar, as ``longtail.engine.trainer.fit``."""

    def __init__(self, name: str, data_root: Path, channels_last: bool, threads: Optional[int]):
        from longtail.core.config import load_config
        from longtail.engine.trainer import build_run

        self.name = name
        self.channels_last = channels_last
        self.overrides = [
            "data=cifar10_lt",
            "train.device=cpu",
            "train.progress=true",
            f"train.channels_last={str(channels_last).lower()}",
            f"train.batch_size={BATCH}",
        ]
        if threads:
            self.overrides.append(f"train.num_threads={threads}")
        self.cfg = load_config(CONFIG, self.overrides)
        self._tmp = tempfile.TemporaryDirectory(prefix="longtail-throughput-")
        run = build_run(self.cfg, Path(self._tmp.name) / "run", data_root)  # writes nothing there
        self.full_steps = len(run.loader)
        self.run = dataclasses.replace(run, loader=StepWindow(run.loader, 1))
        self.epoch = 0
        self.last_loss = float("nan")

    @property
    def train_labels(self) -> torch.Tensor:
        return self.run.data.train.labels

    def measure(self, steps: int) -> float:
        """Train ``steps`` batches through the engine; returns the wall seconds."""
        from longtail.engine.trainer import train_one_epoch

        run, cfg = self.run, self.cfg
        run.loader.steps = steps
        show_bar = cfg.train.progress and run.dist.is_main
        start = time.perf_counter()
        bar = tqdm(
            total=len(run.loader),
            desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=not show_bar,
        )
        row = train_one_epoch(run, self.epoch, bar if show_bar else None)
        bar.close()
        seconds = time.perf_counter() - start
        self.epoch += 1
        self.last_loss = row["loss"]
        self.step_seconds = [b - a for a, b in zip(run.loader.marks, run.loader.marks[1:])]
        return seconds


# ---------------------------------------------------------------------------------------------
# hand side: a minimal PyTorch loop a researcher would write


def crop_flip(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int = PADDING
) -> torch.Tensor:
    """uint8 [B, C, H, W] -> random crop from the zero-padded image at (dy, dx), flipped where asked."""
    b, c, h, w = x.shape
    x = F.pad(x, (pad, pad, pad, pad))
    rows = dy.view(b, 1, 1, 1) + torch.arange(h).view(1, 1, h, 1)
    cols = dx.view(b, 1, 1, 1) + torch.arange(w).view(1, 1, 1, w)
    x = x[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
    return torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)


class HandArm:
    """Everything inline: permutation, gather, crop/flip, normalise, forward, CE, backward, SGD."""

    def __init__(
        self,
        name: str,
        data_root: Path,
        model_cfg,
        seed: int,
        lr: float,
        warmup_epochs: float,
        channels_last: bool,
    ):
        from longtail.data import build_data
        from longtail.models import build_model

        self.name = name
        self.channels_last = channels_last
        data = build_data(DATASET, data_root)
        self.images = data.train.images  # uint8 [N, 3, 32, 32]
        self.labels = data.train.labels  # int64 [N]
        self.mean = torch.tensor(data.mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(data.std).view(1, -1, 1, 1) * 255
        torch.manual_seed(seed)
        self.model = build_model(model_cfg, len(data.class_counts), data.in_channels)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.lr, self.warmup_epochs = lr, warmup_epochs
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9, weight_decay=2e-4)
        self.epoch = 0
        self.gen = torch.Generator().manual_seed(seed)
        self.last_loss = float("nan")

    def measure(self, steps: int) -> float:
        model, opt, g = self.model, self.opt, self.gen
        n = len(self.labels)
        start = time.perf_counter()
        model.train()
        # linear warm-up per epoch (as the CIFAR-LT recipe), so both sides follow the same lr
        for group in opt.param_groups:
            group["lr"] = self.lr * min(1.0, (self.epoch + 1) / self.warmup_epochs)
        perm = torch.randperm(n, generator=g)
        total = 0.0
        marks = []
        for i in range(steps):
            marks.append(time.perf_counter())
            idx = perm[i * BATCH : (i + 1) * BATCH]
            x, y = self.images[idx], self.labels[idx]
            dy = torch.randint(0, 2 * PADDING + 1, (len(idx),), generator=g)
            dx = torch.randint(0, 2 * PADDING + 1, (len(idx),), generator=g)
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = (crop_flip(x, dy, dx, flip).float() - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x).logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        marks.append(time.perf_counter())
        seconds = time.perf_counter() - start
        self.step_seconds = [b - a for a, b in zip(marks, marks[1:])]
        self.last_loss = total / max(steps, 1)
        self.epoch += 1
        return seconds


def check_augmentation_matches() -> None:
    """The inline crop/flip gives exactly longtail's augmentation for the same random choices."""
    from longtail.data.augment import AugmentParams, random_crop_flip

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    off = torch.randint(0, 2 * PADDING + 1, (16, 2), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    ours = crop_flip(x, off[:, 0], off[:, 1], flip)
    theirs = random_crop_flip(x, AugmentParams(off, flip), PADDING)
    if not torch.equal(ours, theirs):
        raise SystemExit("internal error: the hand-written crop/flip differs from longtail's")


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = timing_parser(
        __doc__,
        "throughput",
        steps=30,
        repeats=7,
        warmup=5,
        quick_help="2 steps x 2 repeats, no warm-up",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="compare engine and hand loop in channels_last (the extra arm is then the "
        "engine in contiguous format)",
    )
    p.add_argument(
        "--no-check", action="store_true", help=f"exit 0 even when engine/hand < {THRESHOLD}"
    )
    return parse_timing_args(p, argv, "throughput", quick=(2, 2, 0))


def main(argv=None) -> int:
    args = parse_args(argv)
    from longtail.data.paths import resolve_data_root

    if args.threads:
        torch.set_num_threads(args.threads)
    data_root = resolve_data_root(args.data_root)
    load_at_start = load_average()
    check_augmentation_matches()

    cl = args.channels_last
    main_fmt = "channels_last" if cl else "contiguous"
    other_fmt = "contiguous" if cl else "channels_last"
    print(f"building the arms (data: {data_root}) ...", flush=True)
    t0 = time.perf_counter()
    engine = EngineArm("engine", data_root, channels_last=cl, threads=args.threads)
    if args.steps > engine.full_steps:
        raise SystemExit(f"--steps {args.steps} exceeds the {engine.full_steps} steps of an epoch")
    # each measurement is one (cut) epoch on both sides: same lr, warm-up, momentum, weight decay
    lr, warmup_epochs = engine.cfg.optim.lr, engine.cfg.schedule.warmup_epochs
    hand = HandArm(
        "hand", data_root, engine.cfg.model, engine.cfg.seed, lr, warmup_epochs, channels_last=cl
    )
    if not torch.equal(hand.labels, engine.train_labels):
        raise SystemExit("internal error: the two sides do not train on the same subset")
    other = EngineArm(f"engine-{other_fmt}", data_root, channels_last=not cl, threads=args.threads)
    arms = [engine, hand, other]
    build_s = time.perf_counter() - t0

    print(
        f"CIFAR-10-LT IF100: {len(hand.labels)} training images, batch {BATCH}, "
        f"{engine.full_steps} steps/epoch; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.warmup} warm-up + {args.repeats} x "
        f"{args.steps} steps per arm",
        flush=True,
    )
    if args.warmup:
        for arm in arms:
            arm.measure(args.warmup)

    t1 = time.perf_counter()
    seconds: Dict[str, List[float]] = {arm.name: [] for arm in arms}
    step_ips: Dict[str, List[float]] = {arm.name: [] for arm in arms}
    for r in range(args.repeats):
        # the engine sits between the hand loop and the other-format engine in every round, so
        # each ratio compares measurements taken back to back; who goes first alternates
        order = [hand, engine, other] if r % 2 == 0 else [other, engine, hand]
        for arm in order:
            s = arm.measure(args.steps)
            seconds[arm.name].append(s)
            step_ips[arm.name].append(BATCH / median(arm.step_seconds))
            print(
                f"  round {r + 1}/{args.repeats}  {arm.name:<22} {args.steps * BATCH / s:7.1f} img/s"
                f"  (median step: {step_ips[arm.name][-1]:6.1f} img/s)",
                flush=True,
            )

    measure_s = time.perf_counter() - t1
    ips = {k: [args.steps * BATCH / s for s in v] for k, v in seconds.items()}
    med = {k: median(v) for k, v in ips.items()}
    step_med = {k: median(v) for k, v in step_ips.items()}
    step_ratio = step_med["engine"] / step_med["hand"]
    ratio = med["engine"] / med["hand"]
    paired = [e / h for e, h in zip(ips["engine"], ips["hand"])]
    cl_name, contig_name = ("engine", other.name) if cl else (other.name, "engine")
    cl_ips, contig_ips = ips[cl_name], ips[contig_name]
    step_cl_ratio = step_med[cl_name] / step_med[contig_name]
    cl_ratio = median(cl_ips) / median(contig_ips)
    cl_paired = [a / b for a, b in zip(cl_ips, contig_ips)]
    passed = median(paired) >= THRESHOLD

    labels = {
        "engine": "engine (longtail train path)",
        "hand": "hand-written loop",
        other.name: "engine (longtail train path)",
    }
    rows = []
    for arm in arms:
        v = ips[arm.name]
        rows.append(
            [
                labels[arm.name],
                main_fmt if arm is not other else other_fmt,
                f"{med[arm.name]:.1f}",
                f"{min(v):.1f}",
                f"{max(v):.1f}",
                f"{100 * spread(v):.1f}%",
                f"{step_med[arm.name]:.1f}",
                f"{arm.last_loss:.3f}",
            ]
        )
    print()
    print(
        format_table(
            [
                "arm",
                "memory format",
                "img/s (median)",
                "min",
                "max",
                "spread",
                "median-step img/s",
                "last loss",
            ],
            rows,
        )
    )
    print()
    print(
        format_table(
            ["ratio", "paired rounds (median)", "medians per side", "median steps"],
            [
                [
                    f"engine / hand ({main_fmt})",
                    f"{median(paired):.3f}",
                    f"{ratio:.3f}",
                    f"{step_ratio:.3f}",
                ],
                [
                    "engine channels_last / contiguous",
                    f"{median(cl_paired):.3f}",
                    f"{cl_ratio:.3f}",
                    f"{step_cl_ratio:.3f}",
                ],
            ],
        )
    )
    print(
        f"\ncheck: engine / hand, median of the {len(paired)} back-to-back pairs = "
        f"{median(paired):.3f} (required >= {THRESHOLD}): {'PASS' if passed else 'FAIL'}"
    )

    result = run_header("throughput")
    result["machine"]["load_average_at_start"] = load_at_start
    result["machine"]["load_average_at_end"] = result["machine"].pop("load_average_1_5_15", None)
    result.update(
        {
            "settings": {
                "device": "cpu",
                "dataset": DATASET,
                "train_images": len(hand.labels),
                "batch_size": BATCH,
                "steps_per_epoch": engine.full_steps,
                "steps": args.steps,
                "repeats": args.repeats,
                "warmup_steps": args.warmup,
                "threads": torch.get_num_threads(),
                "threads_requested": args.threads,
                "channels_last": cl,
                "quick": args.quick,
                "engine_config": str(CONFIG.relative_to(REPO_ROOT)),
                "engine_overrides": engine.overrides,
                "hand_lr": lr,
                "hand_warmup_epochs": warmup_epochs,
                "order": "rounds alternate hand, engine, engine-other / engine-other, engine, hand",
                "build_seconds": round(build_s, 2),
                "measure_seconds": round(measure_s, 1),
            },
            "images_per_s": {
                arm.name: {
                    "memory_format": main_fmt if arm is not other else other_fmt,
                    "median": med[arm.name],
                    "runs": ips[arm.name],
                    "spread": spread(ips[arm.name]),
                    "median_step": step_med[arm.name],
                    "median_step_runs": step_ips[arm.name],
                    "last_loss": arm.last_loss,
                }
                for arm in arms
            },
            "ratios": {
                "engine_over_hand": ratio,
                "engine_over_hand_paired_median": median(paired),
                "engine_over_hand_paired": paired,
                "engine_channels_last_over_contiguous": cl_ratio,
                "engine_channels_last_over_contiguous_paired_median": median(cl_paired),
                "engine_over_hand_median_step": step_ratio,
                "engine_channels_last_over_contiguous_median_step": step_cl_ratio,
            },
            "check": {
                "statistic": "engine_over_hand_paired_median",
                "threshold": THRESHOLD,
                "passed": passed,
                "enforced": not args.no_check,
            },
        }
    )
    if not all(math.isfinite(arm.last_loss) for arm in arms):
        print("warning: a non-finite training loss was seen", file=sys.stderr)
    path = write_json(Path(args.out), result)
    print(f"\nwrote {path}")
    if not passed and not args.no_check:
        print(
            f"FAIL: the engine reaches {median(paired):.3f}x of the hand-written loop "
            f"(< {THRESHOLD})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
