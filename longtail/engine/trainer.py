"""The training loop: builds the parts of a run from its config and drives a Method through epochs.

It knows no method by name: it sets the learning rate, calls ``method.train_step`` on each batch,
evaluates, writes ``history.jsonl`` / checkpoints / ``metrics.json`` atomically, and resumes exactly.
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from longtail.core.config import Config
from longtail.data import DataBundle, build_data
from longtail.data.loader import TrainLoader
from longtail.core.metrics import shot_groups
from longtail.data.samplers import SAMPLERS, build_sampler
from longtail.core import io as ckpt
from longtail.core.distributed import (DistInfo, all_ok, all_reduce_sum, barrier,
                                         broadcast_buffers, init_distributed, resolve_device)
from longtail.engine.evaluate import evaluate
from longtail.engine.report import group_sizes_line, plot_per_class, results_table
from longtail.core.errors import ConfigError, LongtailError
from longtail.losses import create as create_loss
from longtail.methods import Method, MethodContext, build_method
from longtail.models import build_model
from longtail.optim import build_schedule, set_lr

CHECKPOINT = "last.pt"
WEIGHTS = "model.safetensors"


@dataclass
class Run:
    """Everything a training run is made of (built once by :func:`build_run`)."""

    cfg: Config
    run_dir: Path
    data: DataBundle
    method: Method
    loader: TrainLoader
    device: torch.device
    dist: DistInfo


# ---------------------------------------------------------------------------------------------
# building


def prepare_run_dir(run_dir: Path, resume: bool, info: DistInfo = DistInfo()) -> bool:
    """Check the run folder on every rank; rank 0 creates it while the others wait for its verdict.
    Returns True on the rank that created the folder.

    No rank writes into the folder before every rank has passed this point, so the checks below
    see the same folder on all ranks and fail (or pass) together.
    """
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise LongtailError(f"{run_dir} is not a run folder (no config.yaml). Pass the folder that "
                                f"`longtail train` wrote, e.g. --resume runs/<name>.")
        return False
    if (run_dir / "config.yaml").exists():
        raise LongtailError(f"{run_dir} already holds a run. Continue it with --resume {run_dir}, or "
                            f"choose another folder with --out DIR.")
    error, created = None, False
    if info.is_main:
        created = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            error = LongtailError(f"Cannot write the run folder {run_dir} ({err.strerror}). Choose a "
                                  f"writable folder with --out DIR.")
    if not all_ok(error is None, info):
        raise error or LongtailError(f"Rank 0 could not create the run folder {run_dir} (see its "
                                     f"message). Choose a writable folder with --out DIR.")
    return created


def setup_process(cfg: Config) -> Tuple[torch.device, DistInfo]:
    """This process's device, and its rank in the torchrun process group (joined once)."""
    device = resolve_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device asks for CUDA but no CUDA device is available. Use "
                          "train.device=cpu (or auto).")
    return device, init_distributed(device)


def build_run(cfg: Config, run_dir: Path, data_root: Path) -> Run:
    """Build data, model, loss, method and loader for ``cfg`` (no training yet)."""
    device, info = setup_process(cfg)
    threads = cfg.train.num_threads
    if threads is None and info.enabled and device.type == "cpu":
        threads = 1  # the processes share the CPU cores: one intra-op thread each
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg.train.amp == "bf16" and device.type == "cpu":
        print("warning: bf16 autocast on this CPU may be far slower than fp32 (no native bf16).",
              file=sys.stderr)

    d = cfg.data
    data = build_data(d.dataset, data_root, imbalance_factor=d.imbalance_factor, profile=d.profile,
                      seed=d.subset_seed, max_per_class=d.max_per_class,
                      max_test_per_class=d.max_test_per_class, val_per_class=d.val_per_class,
                      meta_per_class=d.meta_per_class, meta_from=d.meta_from,
                      exclude_classes=d.exclude_classes)
    counts = list(data.class_counts)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, len(counts), data.in_channels)
    loss = create_loss(cfg.loss.name, class_counts=counts, **cfg.loss.params())
    if getattr(loss, "requires_normalized_head", False) and not getattr(model.head, "normalized", False):
        raise ConfigError(f"loss.name={cfg.loss.name} expects cosine logits: set model.head=cosine.")
    ctx = MethodContext(cfg=cfg, model=model, loss=loss, class_counts=counts, device=device,
                        dist=info, train_labels=data.train.labels, data=data)
    method = build_method(cfg.method.name, ctx, cfg.method.params())
    sampler_params = dict(d.sampler_params)
    # run facts a sampler may ask for by name (b3rs: batch_size; progressive: total_epochs)
    accepts = inspect.signature(SAMPLERS.get(d.sampler)).parameters
    for key, value in (("batch_size", cfg.train.batch_size), ("total_epochs", cfg.train.epochs)):
        if key in accepts:
            sampler_params.setdefault(key, value)
    sampler = build_sampler(d.sampler, data.train.labels.numpy(), counts, seed=cfg.seed,
                            **sampler_params)
    loader = TrainLoader(data.train.images, data.train.labels, sampler, cfg.train.batch_size,
                         data.mean, data.std, device=device, seed=cfg.seed, rank=info.rank,
                         world_size=info.world_size, padding=d.crop_padding, flip=d.flip,
                         drop_last=cfg.train.drop_last, channels_last=cfg.train.channels_last)
    return Run(cfg, run_dir, data, method, loader, device, info)


# ---------------------------------------------------------------------------------------------
# state


def training_state(run: Run, epochs_done: int, schedule=None) -> Dict[str, Any]:
    return {"format": 1, "epoch": epochs_done, "model": run.method.model.state_dict(),
            "method": run.method.state_dict(), "torch_rng": torch.get_rng_state(),
            "schedule": schedule.state_dict() if schedule is not None else {}}


def restore(run: Run, schedule=None) -> int:
    """Load ``last.pt`` into the run (and its schedule); returns the number of epochs done."""
    state = ckpt.load_checkpoint(run.run_dir / CHECKPOINT)
    run.method.model.load_state_dict(state["model"])
    run.method.load_state_dict(state["method"])
    if schedule is not None and state.get("schedule"):
        schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"])


def read_history(path: Path, upto_epoch: int) -> List[Dict[str, Any]]:
    """History lines of epochs <= upto_epoch (later ones belong to an interrupted epoch)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def write_history(path: Path, rows: List[Dict[str, Any]]) -> None:
    ckpt.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# loop


def train_one_epoch(run: Run, epoch: int, schedule, bar: Optional[tqdm]) -> Dict[str, float]:
    method, loader = run.method, run.loader
    method.train_model.train()
    method.on_epoch_start(epoch)
    schedule.on_epoch_start(epoch)
    steps = len(loader)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    seen = 0
    start = time.perf_counter()
    lr = 0.0
    world, global_batch, total = run.dist.world_size, loader.batch_size, len(loader.sampler)
    for step, batch in enumerate(loader.epoch(epoch)):
        lr = set_lr(method.optimizer, schedule.factor(epoch, step, steps))
        n = batch.labels.numel()
        if run.dist.enabled:
            # DDP averages gradients over ranks: weight each rank by its share of the global batch,
            # so a last batch split unevenly (e.g. 23 + 22) still gives the single-process step
            method.grad_scale = n * world / min(global_batch, total - step * global_batch)
        stats = method.train_step(batch)
        lr = method.optimizer.param_groups[0]["lr"]   # a loss-driven schedule sets it in the step
        loss_sum += stats["loss"].double() * n
        seen += n
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == steps - 1:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{float(loss_sum) / max(seen, 1):.4f}", lr=f"{lr:.4g}",
                                img_s=f"{seen * run.dist.world_size / max(elapsed, 1e-9):.0f}")
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - start
    totals = torch.tensor([float(loss_sum), float(seen)], dtype=torch.float64)
    all_reduce_sum(totals, run.dist)
    row = {"epoch": epoch + 1, "lr": lr, "loss": float(totals[0] / max(totals[1], 1)),
           "images_per_s": float(totals[1]) / seconds, "seconds": seconds}
    row.update(method.on_epoch_end(epoch))
    row.update(schedule.on_epoch_end(epoch))
    return row


def evaluate_splits(run: Run, splits=("test", "val")) -> Dict[str, Dict[str, Any]]:
    data, cfg = run.data, run.cfg
    broadcast_buffers(run.method.model, run.dist)  # every rank evaluates rank 0's (saved) weights
    out = {}
    for split in splits:
        subset = getattr(data, split)
        if subset is None or len(subset) == 0:
            continue
        out[split] = evaluate(run.method.model, subset.images, subset.labels, data.class_counts,
                              data.mean, data.std, device=run.device,
                              batch_size=cfg.train.eval_batch_size, info=run.dist,
                              amp_dtype=run.method.amp_dtype,
                              channels_last=cfg.train.channels_last,
                              logits_fn=run.method.eval_logits_fn())
    return out


def summary(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: metrics[k] for k in ("top1", "many", "medium", "few", "ece")}


def fit(cfg: Config, run_dir: Path, data_root: Path, resume: bool = False,
        stop_after_epoch: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """Train (or resume) a run; returns the final metrics (None if stopped early on purpose).

    ``stop_after_epoch`` ends the process after that many epochs, as a crash would (for tests).
    """
    run_dir = Path(run_dir)
    _, info = setup_process(cfg)
    created = prepare_run_dir(run_dir, resume, info)
    try:
        run = build_run(cfg, run_dir, data_root)
        schedule = build_schedule(cfg.optim, cfg.train.epochs)
        schedule.attach(run)
    except Exception:
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that never started leaves no folder behind
        raise
    info = run.dist
    barrier(info)
    start_epoch = restore(run, schedule) if resume and (run_dir / CHECKPOINT).exists() else 0
    history = read_history(run_dir / "history.jsonl", start_epoch) if resume else []
    if info.is_main and not resume:
        ckpt.atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    if info.is_main:
        counts = run.data.class_counts
        print(f"{run.data.name}: {len(run.data.train)} training images, {len(counts)} classes, "
              f"imbalance {max(counts) / max(min(counts), 1):.0f}; "
              f"{group_sizes_line(shot_groups(counts))}")
        val = run.data.val
        missing = sorted(set(range(len(counts))) - set(val.labels.tolist())) if val is not None else []
        if val is not None and missing:
            print(f"note: val has no images of classes {missing} (the long-tailed subset uses all of "
                  f"them); anything tuned on val (tau, model selection) cannot see those classes.")
        print(f"run folder: {run_dir}  device: {run.device}  processes: {info.world_size}"
              + (f"  resuming after epoch {start_epoch}" if start_epoch else ""))

    show_bar = cfg.train.progress and info.is_main
    for epoch in range(start_epoch, cfg.train.epochs):
        bar = tqdm(total=len(run.loader), desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                   leave=False, dynamic_ncols=True, disable=not show_bar)
        row = train_one_epoch(run, epoch, schedule, bar if show_bar else None)
        bar.close()
        last = epoch + 1 == cfg.train.epochs
        if cfg.train.eval_every and (epoch + 1) % cfg.train.eval_every == 0 and not last:
            for split, m in evaluate_splits(run).items():
                row[split] = summary(m)
        history.append(row)
        if info.is_main:
            evals = "  ".join(f"{s} {row[s]['top1']:.2f}" for s in ("test", "val") if s in row)
            print(f"epoch {row['epoch']:>3}/{cfg.train.epochs}  loss {row['loss']:.4f}  "
                  f"lr {row['lr']:.4g}  {row['images_per_s']:.0f} img/s  {row['seconds']:.1f}s"
                  + (f"  top-1 {evals}" if evals else ""), flush=True)
            write_history(run_dir / "history.jsonl", history)
            if (epoch + 1) % cfg.train.checkpoint_every == 0 or last:
                ckpt.save_checkpoint(run_dir / CHECKPOINT, training_state(run, epoch + 1, schedule))
        barrier(info)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and not last:
            return None

    run.method.on_train_end()
    if info.is_main:  # last.pt also holds what on_train_end set (a tau picked on val): `eval` reads it
        ckpt.save_checkpoint(run_dir / CHECKPOINT, training_state(run, cfg.train.epochs, schedule))
    results = evaluate_splits(run)
    metrics = final_metrics(run, results, history)
    metrics.update(schedule.extra_metrics())
    if info.is_main:
        schedule.save_artifacts(run_dir)   # before metrics.json, which marks the run finished
        write_results(run, results, metrics)
    barrier(info)
    return metrics


def final_metrics(run: Run, results: Dict[str, Dict[str, Any]],
                  history: List[Dict[str, Any]]) -> Dict[str, Any]:
    test = results["test"]
    train_seconds = sum(r["seconds"] for r in history)
    metrics = {k: v for k, v in test.items()}
    metrics.update({
        "dataset": run.data.name, "epochs": run.cfg.train.epochs,
        "class_counts": list(run.data.class_counts),
        "train_seconds": train_seconds,
        "images_per_s": (sum(r["images_per_s"] * r["seconds"] for r in history) / train_seconds
                         if train_seconds else None),
        "world_size": run.dist.world_size, "device": str(run.device),
        "torch": torch.__version__, "machine": platform.machine(),
    })
    metrics.update(run.method.extra_metrics())
    for split, m in results.items():
        if split != "test":
            metrics[split] = m
    return metrics


def write_results(run: Run, results: Dict[str, Dict[str, Any]], metrics: Dict[str, Any]) -> None:
    run_dir = run.run_dir
    ckpt.save_weights(run_dir / WEIGHTS, run.method.model.state_dict(),
                      {"format": "longtail", "dataset": run.data.name})
    run.method.save_artifacts(run_dir)   # method-specific files (e.g. MFM's modulator.safetensors)
    ckpt.atomic_write_json(run_dir / "metrics.json", metrics)
    plot_per_class(run_dir / "per_class_accuracy.png", run.data.class_counts, results,
                   title=f"{run.data.name}: {run.cfg.method.name} / {run.cfg.loss.name}")
    print()
    print(results_table(results))
    print(f"\nmetrics: {run_dir / 'metrics.json'}   plot: {run_dir / 'per_class_accuracy.png'}")
