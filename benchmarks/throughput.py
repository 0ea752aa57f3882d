#!/usr/bin/env python
"""Training throughput: the ``longtail train`` engine against a minimal hand-written loop.

Both sides train ResNet-32 (``longtail.models.build_model``, same seed) on the real CIFAR-10-LT
IF100 training subset with batch 128, random crop (4-px zero padding) + horizontal flip +
normalisation, cross-entropy and SGD (momentum 0.9, weight decay 2e-4), in one process, on
``--device`` (cpu, cuda; auto: cuda where there is one), with ``--amp`` (none, bf16, fp16 with
loss scaling) and ``--compile MODE`` (torch.compile of the model) applied to both sides:

* engine: the run is built by ``build_run`` from ``configs/methods/ce.yaml data=cifar10_lt`` exactly as
  ``longtail train`` builds it (progress bar on, as users have it) and driven by the engine's own
  ``train_one_epoch`` with its tqdm bar, schedule, sampler, TrainLoader and ``Method.train_step``.
  The only change is that each "epoch" is cut to its first ``--steps`` batches (the real loader's
  iterator, sliced), so a measurement has a fixed length;
* hand: the simplest idiomatic PyTorch loop (no torchvision, nothing from longtail but the model
  and the data tensors, all on the device): a random permutation, uint8 gather, inline batched
  crop/flip, normalisation, autocast / GradScaler where asked, ``F.cross_entropy``,
  ``torch.optim.SGD``; the loss is summed on the device and read once a measurement.

A third arm trains the engine with the other memory format (``train.channels_last``), so the same
run also gives channels_last vs contiguous for the engine. After warm-up, the arms take turns
``--repeats`` times, the engine always in the middle (hand, engine, other / other, engine, hand),
so each ratio pairs two measurements taken back to back. Reported: each side's median images/s,
the ratio of those medians, and the median of the per-round paired ratios. The check uses the
paired median: on a machine shared with other jobs, bursts of load slow a few measurements by
several times, which can tip one side's median, while a back-to-back pair mostly sees the same
load. Each measurement's median step time is recorded as well on the CPU (a view insensitive to
bursts inside a measurement; on a GPU a step's host time says nothing of the device's, so only
whole measurements are timed, between ``torch.cuda.synchronize`` calls).

``--concurrent N`` then starts N processes that each build their own engine run (in the faster
memory format) on the same device and, after warm-up, start together and train ``--repeats`` x
``--steps`` batches; reported: the images of all of them over the wall time from the first start
to the last end. On CUDA the issue-12 targets (one H100 / H200) are printed beside the numbers
with PASS / FAIL: engine/hand >= 0.95, >= 40,000 img/s for one run, >= 120,000 img/s summed over
the concurrent runs. Exit status 1 when a check fails (``--no-check`` disables): engine/hand
>= 0.9 on the CPU, every target on CUDA.

    LONGTAIL_DATA=/work/data python benchmarks/throughput.py            # full run (a few minutes)
    LONGTAIL_DATA=/work/data python benchmarks/throughput.py --quick --no-check   # smoke run
    python benchmarks/throughput.py --device cuda --amp bf16 --compile reduce-overhead --concurrent 4
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math
import multiprocessing as mp
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import (  # noqa: E402
    REPO_ROOT,
    RESULTS_DIR,
    format_table,
    load_average,
    median,
    parse_timing_args,
    run_header,
    spread,
    timing_parser,
    usable_cores,
    write_json,
)
from tqdm import tqdm  # noqa: E402

CONFIG = REPO_ROOT / "configs" / "methods" / "ce.yaml"  # with data=cifar10_lt
DATASET = "cifar10-lt"
BATCH = 128
PADDING = 4
THRESHOLD = {"cpu": 0.9, "cuda": 0.95}  # engine / hand, paired median, required
# issue 12's targets on one H100 / H200 (judged on CUDA only): (key, label, required)
TARGETS = [
    ("engine_over_hand", "engine / hand (paired median)", THRESHOLD["cuda"]),
    ("one_run_images_per_s", "one ResNet-32 run, img/s", 40_000.0),
    ("concurrent_images_per_s", "concurrent runs, summed img/s", 120_000.0),
]


@dataclasses.dataclass(frozen=True)
class Setup:
    """How both sides run: device, precision, torch.compile mode, threads."""

    device: torch.device
    amp: str = "none"  # none | bf16 | fp16
    compile: Optional[str] = None  # a torch.compile mode; None: eager
    threads: Optional[int] = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)

    def sync(self) -> None:
        """Wait for the device: read clocks only after it (CUDA runs ahead of the host)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def overrides(self) -> List[str]:
        return [
            f"train.device={self.device}",
            f"train.amp={self.amp}",
            f"train.compile={self.compile or 'false'}",
        ] + ([f"train.num_threads={self.threads}"] if self.threads else [])


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

    def __init__(self, name: str, data_root: Path, channels_last: bool, setup: Setup):
        from longtail.core.config import load_config
        from longtail.engine.trainer import build_run

        self.name, self.setup = name, setup
        self.channels_last = channels_last
        self.overrides = [
            "data=cifar10_lt",
            "train.progress=true",
            f"train.channels_last={str(channels_last).lower()}",
            f"train.batch_size={BATCH}",
            *setup.overrides(),
        ]
        self.cfg = load_config(CONFIG, self.overrides)
        self._tmp = tempfile.TemporaryDirectory(prefix="longtail-throughput-")
        run = build_run(self.cfg, Path(self._tmp.name) / "run", data_root)  # writes nothing there
        self.full_steps = len(run.loader)
        self.run = dataclasses.replace(run, loader=StepWindow(run.loader, 1))
        self.epoch = 0
        self.last_loss = float("nan")
        self.step_seconds: List[float] = []

    @property
    def train_labels(self) -> torch.Tensor:
        return self.run.data.train.labels

    def measure(self, steps: int) -> float:
        """Train ``steps`` batches through the engine; returns the wall seconds."""
        from longtail.engine.trainer import train_one_epoch

        run, cfg = self.run, self.cfg
        run.loader.steps = steps
        show_bar = cfg.train.progress and run.dist.is_main
        self.setup.sync()
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
        self.setup.sync()
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
    dev = x.device
    rows = dy.view(b, 1, 1, 1) + torch.arange(h, device=dev).view(1, 1, h, 1)
    cols = dx.view(b, 1, 1, 1) + torch.arange(w, device=dev).view(1, 1, 1, w)
    bi, ci = torch.arange(b, device=dev).view(b, 1, 1, 1), torch.arange(c, device=dev)
    x = x[bi, ci.view(1, c, 1, 1), rows, cols]
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
        setup: Setup,
    ):
        from longtail.data import build_data
        from longtail.models import build_model

        self.name, self.setup = name, setup
        self.channels_last = channels_last
        dev = setup.device
        data = build_data(DATASET, data_root)
        self.labels_cpu = data.train.labels
        self.images = data.train.images.to(dev)  # uint8 [N, 3, 32, 32], on the device once
        self.labels = data.train.labels.to(dev)  # int64 [N]
        self.mean = torch.tensor(data.mean, device=dev).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(data.std, device=dev).view(1, -1, 1, 1) * 255
        torch.manual_seed(seed)
        model = build_model(model_cfg, len(data.class_counts), data.in_channels).to(dev)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.forward = torch.compile(model, mode=setup.compile) if setup.compile else model
        self.lr, self.warmup_epochs = lr, warmup_epochs
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=2e-4)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=setup.amp == "fp16")
        self.epoch = 0
        self.gen = torch.Generator(device=dev).manual_seed(seed)
        self.last_loss = float("nan")
        self.step_seconds: List[float] = []

    def autocast(self):
        dtype = self.setup.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.setup.device.type, dtype=dtype)

    def measure(self, steps: int) -> float:
        model, opt, g, dev = self.model, self.opt, self.gen, self.setup.device
        n = len(self.labels)
        self.setup.sync()
        start = time.perf_counter()
        model.train()
        # linear warm-up per epoch (as the CIFAR-LT recipe), so both sides follow the same lr
        for group in opt.param_groups:
            group["lr"] = self.lr * min(1.0, (self.epoch + 1) / self.warmup_epochs)
        perm = torch.randperm(n, generator=g, device=dev)
        total = torch.zeros((), device=dev)
        marks = []
        for i in range(steps):
            marks.append(time.perf_counter())
            idx = perm[i * BATCH : (i + 1) * BATCH]
            x, y = self.images[idx], self.labels[idx]
            b = len(idx)
            dy = torch.randint(0, 2 * PADDING + 1, (b,), generator=g, device=dev)
            dx = torch.randint(0, 2 * PADDING + 1, (b,), generator=g, device=dev)
            flip = torch.rand(b, generator=g, device=dev) < 0.5
            x = (crop_flip(x, dy, dx, flip).float() - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                logits = self.forward(x).logits
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()
            total += loss.detach()
        marks.append(time.perf_counter())
        self.last_loss = float(total) / max(steps, 1)  # waits for the device
        self.setup.sync()
        seconds = time.perf_counter() - start
        self.step_seconds = [b - a for a, b in zip(marks, marks[1:])]
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
# concurrent engine runs


def _concurrent_worker(rank: int, job: Dict[str, Any], barrier, out) -> None:
    """One process of ``--concurrent``: its own engine run (``job``: data_root, channels_last,
    setup, steps, repeats, warmup); warm up, start with the others, train repeats x steps
    batches; put (rank, start, end, images, last loss, error) on ``out``."""
    try:
        setup = job["setup"]
        if setup.threads:
            torch.set_num_threads(setup.threads)
        arm = EngineArm(f"engine-{rank}", job["data_root"], job["channels_last"], setup)
        arm.cfg.train.progress = False  # N bars would garble the terminal
        if job["warmup"]:
            arm.measure(job["warmup"])
        barrier.wait()
        start = time.time()  # wall clock: comparable between processes
        for _ in range(job["repeats"]):
            arm.measure(job["steps"])
        images = job["repeats"] * job["steps"] * BATCH
        out.put((rank, start, time.time(), images, arm.last_loss, None))
    except BaseException as err:  # reported by the parent, which would otherwise wait forever
        barrier.abort()
        out.put((rank, 0.0, 0.0, 0, float("nan"), f"{type(err).__name__}: {err}"))


def measure_concurrent(args, data_root: Path, channels_last: bool, setup: Setup) -> Dict[str, Any]:
    """``args.concurrent`` engine runs at once on ``setup.device``: summed images per second."""
    n = args.concurrent
    if not setup.cuda and setup.threads is None:  # the processes share the cores
        setup = dataclasses.replace(setup, threads=max(1, usable_cores() // n))
    job = dict(
        data_root=data_root,
        channels_last=channels_last,
        setup=setup,
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_concurrent_worker, args=(r, job, barrier, out)) for r in range(n)]
    for p in procs:
        p.start()
    results: List[tuple] = []
    while len(results) < n:
        try:
            results.append(out.get(timeout=10))
        except queue.Empty:
            if sum(p.is_alive() for p in procs) < n - len(results):  # one died without a word
                for p in procs:
                    p.kill()
                codes = [p.exitcode for p in procs]
                raise SystemExit(f"a concurrent run died (exit codes {codes})") from None
    for p in procs:
        p.join()
    results.sort()
    errors = [f"process {r}: {e}" for r, *_, e in results if e]
    if errors:
        raise SystemExit("concurrent runs failed: " + "; ".join(errors))
    starts, ends = [r[1] for r in results], [r[2] for r in results]
    images = sum(r[3] for r in results)
    wall = max(ends) - min(starts)
    return {
        "processes": n,
        "memory_format": "channels_last" if channels_last else "contiguous",
        "threads_per_process": setup.threads,
        "images": images,
        "wall_seconds": wall,
        "images_per_s": images / wall,
        "per_process_images_per_s": [r[3] / (r[2] - r[1]) for r in results],
        "start_skew_seconds": max(starts) - min(starts),
        "last_losses": [r[4] for r in results],
    }


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
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="(cpu)")
    p.add_argument(
        "--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype (none)"
    )
    p.add_argument(
        "--compile",
        choices=("default", "reduce-overhead", "max-autotune"),
        default=None,
        help="torch.compile the model with this mode, on both sides (default: eager)",
    )
    p.add_argument(
        "--concurrent",
        type=int,
        default=0,
        metavar="N",
        help="then train N engine runs at once, each in its own process (default: 0, none)",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="compare engine and hand loop in channels_last (the extra arm is then the "
        "engine in contiguous format)",
    )
    p.add_argument(
        "--no-check", action="store_true", help="exit 0 even when a check or target fails"
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_timing_args(p, argv, "throughput", quick=(2, 2, 0))
    if args.concurrent < 0:
        p.error("--concurrent must be >= 0")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        args.out = RESULTS_DIR / f"{result_name(args)}.json"
    return args


def result_name(args) -> str:
    """throughput-<device>[-<amp>][-compile-<mode>][-cl][-xN][-quick]: each setting its own file,
    so a variant or a smoke run never replaces the reference result (throughput-cpu.json)."""
    parts = ["throughput", args.device]
    parts += [args.amp] if args.amp != "none" else []
    parts += [f"compile-{args.compile}"] if args.compile else []
    parts += ["cl"] if args.channels_last else []
    parts += [f"x{args.concurrent}"] if args.concurrent else []
    parts += ["quick"] if args.quick else []
    return "-".join(parts)


def run_rounds(arms, args, setup: Setup):
    """Warm-up, then ``args.repeats`` rounds, the engine always between the other two arms.
    Returns (images/s per arm, median-step images/s per arm: None on CUDA)."""
    if args.warmup:
        for arm in arms:
            arm.measure(args.warmup)
    engine, hand, other = arms
    ips: Dict[str, List[float]] = {arm.name: [] for arm in arms}
    step_ips: Optional[Dict[str, List[float]]] = None if setup.cuda else {a.name: [] for a in arms}
    for r in range(args.repeats):
        # the engine sits between the hand loop and the other-format engine in every round, so
        # each ratio compares measurements taken back to back; who goes first alternates
        order = [hand, engine, other] if r % 2 == 0 else [other, engine, hand]
        for arm in order:
            ips[arm.name].append(args.steps * BATCH / arm.measure(args.steps))
            line = f"  round {r + 1}/{args.repeats}  {arm.name:<22} {ips[arm.name][-1]:9.1f} img/s"
            if step_ips is not None:
                step_ips[arm.name].append(BATCH / median(arm.step_seconds))
                line += f"  (median step: {step_ips[arm.name][-1]:6.1f} img/s)"
            print(line, flush=True)
    return ips, step_ips


def judge_targets(measured: Dict[str, Optional[float]]) -> List[Dict[str, Any]]:
    """Issue 12's CUDA targets beside the measured values (None: not measured in this run)."""
    return [
        {
            "target": key,
            "label": label,
            "required": required,
            "measured": measured.get(key),
            "passed": None if measured.get(key) is None else measured[key] >= required,
        }
        for key, label, required in TARGETS
    ]


def print_targets(targets: List[Dict[str, Any]]) -> None:
    def shown(t: Dict[str, Any]) -> str:
        v = t["measured"]
        return "-" if v is None else format(v, ".3f" if t["required"] < 10 else ".0f")

    verdicts = {True: "PASS", False: "FAIL", None: "not measured (--concurrent N)"}
    print("\nissue-12 targets (one H100 / H200):")
    print(
        format_table(
            ["target", "measured", "required", "verdict"],
            [
                [t["label"], shown(t), f">= {t['required']:g}", verdicts[t["passed"]]]
                for t in targets
            ],
        )
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    from longtail.data.paths import resolve_data_root

    if args.threads:
        torch.set_num_threads(args.threads)
    setup = Setup(torch.device(args.device), args.amp, args.compile, args.threads)
    data_root = resolve_data_root(args.data_root)
    load_at_start = load_average()
    check_augmentation_matches()

    cl = args.channels_last
    main_fmt = "channels_last" if cl else "contiguous"
    other_fmt = "contiguous" if cl else "channels_last"
    print(f"building the arms (data: {data_root}, device: {setup.device}) ...", flush=True)
    t0 = time.perf_counter()
    engine = EngineArm("engine", data_root, channels_last=cl, setup=setup)
    if args.steps > engine.full_steps:
        raise SystemExit(f"--steps {args.steps} exceeds the {engine.full_steps} steps of an epoch")
    # each measurement is one (cut) epoch on both sides: same lr, warm-up, momentum, weight decay
    lr, warmup_epochs = engine.cfg.optim.lr, engine.cfg.schedule.warmup_epochs
    hand = HandArm(
        "hand", data_root, engine.cfg.model, engine.cfg.seed, lr, warmup_epochs, cl, setup
    )
    if not torch.equal(hand.labels_cpu, engine.train_labels):
        raise SystemExit("internal error: the two sides do not train on the same subset")
    other = EngineArm(f"engine-{other_fmt}", data_root, channels_last=not cl, setup=setup)
    arms = [engine, hand, other]
    build_s = time.perf_counter() - t0

    where = (
        torch.cuda.get_device_name(setup.device)
        if setup.cuda
        else f"{torch.get_num_threads()} threads"
    )
    print(
        f"CIFAR-10-LT IF100: {len(hand.labels)} training images, batch {BATCH}, "
        f"{engine.full_steps} steps/epoch; torch {torch.__version__}, {where}; amp {setup.amp}, "
        f"compile {setup.compile or 'off'}; {args.warmup} warm-up + {args.repeats} x "
        f"{args.steps} steps per arm",
        flush=True,
    )
    t1 = time.perf_counter()
    ips, step_ips = run_rounds(arms, args, setup)
    measure_s = time.perf_counter() - t1

    med = {k: median(v) for k, v in ips.items()}
    step_med = {k: median(v) for k, v in step_ips.items()} if step_ips else None

    def step_ratio(a: str, b: str) -> Optional[float]:
        return step_med[a] / step_med[b] if step_med else None

    ratio = med["engine"] / med["hand"]
    paired = [e / h for e, h in zip(ips["engine"], ips["hand"])]
    cl_name, contig_name = ("engine", other.name) if cl else (other.name, "engine")
    cl_ratio = med[cl_name] / med[contig_name]
    cl_paired = [a / b for a, b in zip(ips[cl_name], ips[contig_name])]
    threshold = THRESHOLD[setup.device.type]
    passed = median(paired) >= threshold

    def fmt(v: Optional[float], spec: str = ".1f") -> str:
        return "-" if v is None else format(v, spec)

    labels = {"engine": "engine (longtail train path)", "hand": "hand-written loop"}
    rows = [
        [
            labels.get(arm.name, labels["engine"]),
            main_fmt if arm is not other else other_fmt,
            f"{med[arm.name]:.1f}",
            f"{min(ips[arm.name]):.1f}",
            f"{max(ips[arm.name]):.1f}",
            f"{100 * spread(ips[arm.name]):.1f}%",
            fmt(step_med[arm.name] if step_med else None),
            f"{arm.last_loss:.3f}",
        ]
        for arm in arms
    ]
    heads = ["arm", "memory format", "img/s (median)", "min", "max", "spread"]
    print()
    print(format_table([*heads, "median-step img/s", "last loss"], rows))
    print()
    print(
        format_table(
            ["ratio", "paired rounds (median)", "medians per side", "median steps"],
            [
                [
                    f"engine / hand ({main_fmt})",
                    f"{median(paired):.3f}",
                    f"{ratio:.3f}",
                    fmt(step_ratio("engine", "hand"), ".3f"),
                ],
                [
                    "engine channels_last / contiguous",
                    f"{median(cl_paired):.3f}",
                    f"{cl_ratio:.3f}",
                    fmt(step_ratio(cl_name, contig_name), ".3f"),
                ],
            ],
        )
    )
    print(
        f"\ncheck: engine / hand, median of the {len(paired)} back-to-back pairs = "
        f"{median(paired):.3f} (required >= {threshold}): {'PASS' if passed else 'FAIL'}"
    )

    # the faster engine arm is "one run" for the target, and the format the concurrent runs use
    fast = max((engine, other), key=lambda arm: med[arm.name])
    concurrent = None
    if args.concurrent:
        print(
            f"\n{args.concurrent} concurrent engine runs "
            f"({'channels_last' if fast.channels_last else 'contiguous'}) ...",
            flush=True,
        )
        concurrent = measure_concurrent(args, data_root, fast.channels_last, setup)
        per = ", ".join(f"{v:.0f}" for v in concurrent["per_process_images_per_s"])
        print(
            f"  {concurrent['images_per_s']:.1f} img/s summed over {args.concurrent} processes "
            f"(each: {per}; start skew {concurrent['start_skew_seconds']:.2f} s)"
        )

    targets = None
    if setup.cuda:
        targets = judge_targets(
            {
                "engine_over_hand": median(paired),
                "one_run_images_per_s": med[fast.name],
                "concurrent_images_per_s": concurrent["images_per_s"] if concurrent else None,
            }
        )
        print_targets(targets)
        passed = passed and all(t["passed"] is not False for t in targets)

    result = run_header("throughput")
    result["machine"]["load_average_at_start"] = load_at_start
    result["machine"]["load_average_at_end"] = result["machine"].pop("load_average_1_5_15", None)
    result.update(
        {
            "settings": {
                "device": str(setup.device),
                "amp": setup.amp,
                "compile": setup.compile,
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
                "concurrent": args.concurrent,
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
                    "median_step": step_med[arm.name] if step_med else None,
                    "median_step_runs": step_ips[arm.name] if step_ips else None,
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
                "engine_over_hand_median_step": step_ratio("engine", "hand"),
                "engine_channels_last_over_contiguous_median_step": step_ratio(
                    cl_name, contig_name
                ),
            },
            "concurrent": concurrent,
            "check": {
                "statistic": "engine_over_hand_paired_median",
                "threshold": threshold,
                "targets": targets,
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
            f"FAIL: engine / hand = {median(paired):.3f} (required >= {threshold})"
            + ("; or a target above failed" if targets else ""),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
