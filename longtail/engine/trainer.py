"""The training loop: builds the parts of a run from its config and drives a Method through epochs.

It knows no method by name: it sets the learning rate, calls ``method.train_step`` on each batch,
evaluates, writes ``history.jsonl`` / checkpoints / ``metrics.json`` atomically (and sends the
same numbers to the loggers of ``train.logger``), and resumes exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from tqdm import tqdm

from longtail.core.config import Config, diff_trees
from longtail.core.distributed import (
    DistInfo,
    all_ok,
    all_reduce_min,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    init_distributed,
    resolve_device,
    wrap_ddp,
)
from longtail.core.errors import ConfigError, LongtailError
from longtail.core.facts import RunFacts
from longtail.core.metrics import shot_groups
from longtail.core.modules import load_fitting_state
from longtail.core.provenance import provenance
from longtail.core.run_folder import RunFolder
from longtail.data import DataBundle
from longtail.data.loader import TrainLoader
from longtail.data.samplers import build_sampler
from longtail.data.sources import build_bundle
from longtail.engine.config_check import data_warnings, prepare_config
from longtail.engine.evaluate import evaluate
from longtail.engine.loggers import Loggers, open_loggers
from longtail.engine.plots import plot_run
from longtail.engine.report import group_sizes_line, results_table
from longtail.hooks import Hook, build_hooks
from longtail.losses import create as create_loss
from longtail.methods import Method, MethodContext, build_method
from longtail.models import build_model
from longtail.optim import (
    OptimWrapper,
    Schedule,
    build_optimizer,
    build_schedule,
    optim_info,
    param_groups,
)
from longtail.optim.precision import cpu_has_native_bf16, describe, resolve_amp


@dataclass
class Run:
    """Everything a training run is made of (built once by :func:`build_run`)."""

    cfg: Config
    folder: RunFolder
    data: DataBundle
    method: Method
    optim: OptimWrapper
    schedule: Schedule
    hooks: Dict[str, Hook]
    loader: TrainLoader
    device: torch.device
    dist: DistInfo
    amp_reason: str = ""  # how cfg.train.amp (resolved: never "auto") was chosen

    @property
    def run_dir(self) -> Path:
        return self.folder.path


# ---------------------------------------------------------------------------------------------
# building


def check_run_dir(folder: RunFolder, resume: bool) -> None:
    """LongtailError unless ``folder`` may be trained into: a run to resume, or (a new run) a
    folder that does not exist or is empty."""
    run_dir = folder.path
    if resume:
        if not folder.is_run():
            raise LongtailError(
                f"{run_dir} is not a run folder (no {folder.CONFIG}). Pass the folder "
                f"that `longtail train` wrote, e.g. --resume runs/<name>."
            )
        return
    if folder.config_path.exists():
        raise LongtailError(
            f"{run_dir} already holds a run. Continue it with --resume {run_dir}, or "
            f"choose another folder with --out DIR."
        )
    others = folder.user_files()
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise LongtailError(
            f"{run_dir} is not empty ({shown}) and is not a longtail run: nothing is written "
            f"into it. Train into a new or empty folder with --out DIR."
        )


def prepare_run_dir(run_dir: Path, resume: bool, info: DistInfo = DistInfo()) -> bool:
    """Rank 0 checks the run folder and creates it while the others wait for its verdict; every
    rank fails together. Returns True on the rank that created the folder."""
    folder = RunFolder(run_dir)
    error: Optional[LongtailError] = None
    created = False
    if info.is_main:
        try:
            check_run_dir(folder, resume)
            if not resume:
                created = not run_dir.exists()
                run_dir.mkdir(parents=True, exist_ok=True)
                probe = run_dir / ".write-test"
                probe.write_text("ok")
                probe.unlink()
        except LongtailError as err:
            error = err
        except OSError as err:
            error = LongtailError(
                f"Cannot write the run folder {run_dir} ({err.strerror}). Choose a "
                f"writable folder with --out DIR."
            )
    if not all_ok(error is None, info):
        raise error or LongtailError(f"Rank 0 refused the run folder {run_dir} (see its message).")
    return created


# what a resumed run may change: its length (to extend it) and how it reports and saves, nothing
# that decides what it computes
RESUME_MAY_CHANGE = (
    "train.epochs",
    "train.progress",
    "train.eval_every",
    "train.checkpoint_every",
    "train.num_threads",
    "train.logger",
    "train.logger_params",
)


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def check_resume_config(folder: RunFolder, cfg: Config, info: DistInfo = DistInfo()) -> Config:
    """A resumed run continues the recorded one: any difference from its ``config.yaml`` outside
    RESUME_MAY_CHANGE is refused with the list of keys; allowed changes are recorded (the new
    config.yaml, a line in resumes.jsonl). Returns the config to continue with."""
    saved = folder.load_config()
    changes = diff_trees(saved.to_dict(), cfg.to_dict())
    refused = {k: v for k, v in changes.items() if not _may_change(k)}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise LongtailError(
            f"--resume {folder} continues the recorded run, but these settings differ from its "
            f"config.yaml: {listed}. Only {', '.join(RESUME_MAY_CHANGE)} may change on resume. "
            f"Resume without them, or start a new run (in another folder) with the new settings."
        )
    done = len(folder.read_history())
    if cfg.train.epochs < done:
        raise LongtailError(
            f"--resume {folder}: train.epochs={cfg.train.epochs} is fewer than the "
            f"{done} epochs it has trained already."
        )
    if changes and info.is_main:
        folder.write_config(cfg)
        folder.record_resume({k: list(v) for k, v in changes.items()})
    return cfg


@contextlib.contextmanager
def hold_run_folder(folder: RunFolder, info: DistInfo = DistInfo()) -> Iterator[None]:
    """Rank 0 holds the folder's lock for the block; every rank fails together if it cannot."""
    with contextlib.ExitStack() as stack:
        error = None
        if info.is_main:
            try:
                stack.enter_context(folder.lock())
            except LongtailError as err:
                error = err
        if not all_ok(error is None, info):
            raise error or LongtailError(f"{folder} is in use by another process (see rank 0).")
        yield


def setup_process(cfg: Config) -> Tuple[torch.device, DistInfo]:
    """This process's device, and its rank in the torchrun process group (joined once)."""
    device = resolve_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device asks for CUDA but no CUDA device is available. Use "
            "train.device=cpu (or auto)."
        )
    return device, init_distributed(device)


def attach_step(
    method: Method, cfg: Config, facts: RunFacts, device: torch.device, info: DistInfo = DistInfo()
) -> OptimWrapper:
    """Place the method's model (device, memory format), wrap it for DDP / compile, build the
    optimiser over its trainable parameters and the step wrapper, and attach both to it."""
    model = method.model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model = wrap_ddp(model, info, device)
    if cfg.train.compile:
        train_model = torch.compile(train_model, mode=cfg.train.compile_mode)
    groups = param_groups(
        method.trainable_parameters(),
        model.head.parameters(),
        cfg.optim.head_lr,
        cfg.optim.head_weight_decay,
    )
    optimizer = build_optimizer(cfg.optim, groups, facts)
    optim = OptimWrapper(
        optimizer,
        needs_closure=optim_info(cfg.optim.name).needs_closure,
        device_type=device.type,
        amp=cfg.train.amp,
        grad_clip=cfg.optim.grad_clip,
        model=model,
        accumulate_steps=cfg.train.accumulate_steps,
        train_model=train_model,
    )
    method.attach(optim, train_model)
    return optim


def resolve_precision(
    cfg: Config, model: torch.nn.Module, data: DataBundle, device: torch.device, info: DistInfo
) -> Tuple[Config, str]:
    """``cfg`` with ``train.amp=auto`` resolved (optim/precision.py) on ``model`` (left as it is,
    the RNG too) for this process's micro-batch, and the reason. Every rank trains in one
    precision: bf16 only where every rank chose it."""
    t = cfg.train
    micro_batch = -(-t.batch_size // (info.world_size * t.accumulate_steps))
    arch = json.dumps(
        {"model": cfg.model.model_dump(mode="json"), "classes": len(data.class_counts)},
        sort_keys=True,
    )
    amp, reason = resolve_amp(
        t.amp,
        device,
        model,
        (data.in_channels, data.image_size, data.image_size),
        micro_batch,
        t.channels_last,
        arch=arch,
    )
    if t.amp != "auto":
        return cfg, reason
    if info.enabled:
        vote = torch.tensor([1.0 if amp == "bf16" else 0.0], dtype=torch.float64)
        if all_reduce_min(vote, info).item() < 1.0 and amp == "bf16":
            amp, reason = "none", f"{reason}; fp32 all the same, as another rank chose it"
    resolved = cfg.model_copy(deep=True)
    resolved.train.amp = amp
    return resolved, reason


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
    if cfg.train.amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        print(
            "warning: bf16 autocast on this CPU may be far slower than fp32 (no native bf16).",
            file=sys.stderr,
        )

    d = cfg.data
    data = build_bundle(d, data_root, seed=cfg.seed)
    counts = list(data.class_counts)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, len(counts), data.in_channels)
    loss = create_loss(cfg.loss.name, class_counts=counts, **cfg.loss.params())
    if getattr(loss, "requires_normalized_head", False) and not getattr(
        model.head, "normalized", False
    ):
        raise ConfigError(
            f"loss.name={cfg.loss.name} expects cosine logits: set model.head=cosine."
        )
    cfg, amp_reason = resolve_precision(cfg, model, data, device, info)
    facts = RunFacts(
        seed=cfg.seed,
        epochs=cfg.train.epochs,
        batch_size=cfg.train.batch_size,
        class_counts=counts,
        rank=info.rank,
        world_size=info.world_size,
        device=str(device),
        loss=loss,
    )
    ctx = MethodContext(
        cfg=cfg,
        model=model,
        loss=loss,
        class_counts=counts,
        device=device,
        dist=info,
        train_labels=data.train.labels,
        data=data,
        facts=facts,
    )
    method = build_method(cfg.method.name, ctx, cfg.method.params())
    optim = attach_step(method, cfg, facts, device, info)
    schedule = build_schedule(cfg.schedule, cfg.train.epochs, cfg.optim.lr)
    hooks = build_hooks(cfg.hooks, facts)
    sampler = build_sampler(
        cfg.sampler.name, data.train.labels.numpy(), counts, facts, **cfg.sampler.params()
    )
    loader = TrainLoader(
        data.train.images,
        data.train.labels,
        sampler,
        cfg.train.batch_size,
        data.mean,
        data.std,
        device=device,
        seed=cfg.seed,
        rank=info.rank,
        world_size=info.world_size,
        padding=d.crop_padding,
        flip=d.flip,
        drop_last=cfg.train.drop_last,
        channels_last=cfg.train.channels_last,
    )
    folder = RunFolder(run_dir)
    run = Run(cfg, folder, data, method, optim, schedule, hooks, loader, device, info, amp_reason)
    for hook in hooks.values():
        hook.before_run(run)
    for hook in hooks.values():
        optim.after_first_backward.append(
            lambda batch, step_loss, hook=hook: hook.after_backward(run, batch, step_loss)
        )
    return run


# ---------------------------------------------------------------------------------------------
# state


def training_state(run: Run, epochs_done: int) -> Dict[str, Any]:
    return {
        "format": 2,
        "epoch": epochs_done,
        "model": run.method.model.state_dict(),
        "method": run.method.state_dict(),
        "optim": run.optim.state_dict(),
        "hooks": {name: hook.state_dict() for name, hook in run.hooks.items()},
        "torch_rng": torch.get_rng_state(),
        # the device's generator too: a loss or optimiser that draws noise on it (GCL, RSAM)
        "cuda_rng": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
    }


def restore(run: Run) -> int:
    """Load ``last.pt`` into the run; returns the number of epochs done."""
    state = run.folder.load_checkpoint()
    if state.get("format") != 2:
        raise LongtailError(
            f"{run.folder.checkpoint_path} was written by an older longtail "
            f"(checkpoint format {state.get('format')}); resume it with that "
            f"version, or start the run again in a new folder."
        )
    load_fitting_state(run.method.model, state["model"], str(run.folder.checkpoint_path))
    try:
        run.method.load_state_dict(state["method"])
        run.optim.load_state_dict(state["optim"])
    except (KeyError, ValueError, RuntimeError) as err:
        raise LongtailError(
            f"{run.folder.checkpoint_path} does not fit this run's method or "
            f"optimiser ({err}). It was written by another config: resume with "
            f"the config it was trained with."
        ) from None
    for name, hook in run.hooks.items():
        hook.load_state_dict(state["hooks"].get(name, {}))
    torch.set_rng_state(state["torch_rng"])
    if run.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], run.device)
    return int(state["epoch"])


# ---------------------------------------------------------------------------------------------
# loop


def check_finite(run: Run, epoch: int, steps: int, first_bad: torch.Tensor) -> None:
    """Stop a diverged run: a LongtailError naming the first step with a non-finite loss (every
    rank takes the same decision). Nothing of this epoch is written; the last checkpoint stays."""
    # the first bad step of any rank (steps: none), so every rank stops at the same check
    flag = first_bad.detach().double().cpu().reshape(1)
    flag = torch.where(flag < 0, torch.full_like(flag, float(steps)), flag)
    step = int(all_reduce_min(flag, run.dist).item())
    if step >= steps:
        return
    kept = (
        f"its last checkpoint ({run.folder.checkpoint_path}, after epoch {epoch}) is kept"
        if epoch > 0 and run.folder.has_checkpoint()
        else "no epoch had finished"
    )
    raise LongtailError(
        f"Training diverged: the loss is not finite (NaN or inf) at epoch {epoch + 1}, step "
        f"{step + 1} of {steps} (optim.lr={run.cfg.optim.lr}). The run stopped and {kept}. "
        f"Train again in a new folder with a smaller optim.lr, optim.grad_clip set, or "
        f"train.amp=none; check the data if it persists."
    )


def train_one_epoch(run: Run, epoch: int, bar: Optional[tqdm]) -> Dict[str, Any]:
    method, loader, optim = run.method, run.loader, run.optim
    method.train_model.train()
    method.on_epoch_start(epoch)
    optim.set_epoch(epoch)
    for hook in run.hooks.values():
        hook.before_epoch(run, epoch)
    steps = len(loader)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    seen = 0
    start = time.perf_counter()
    lr = 0.0
    first_bad = torch.full((), -1, dtype=torch.long, device=run.device)  # no sync per step
    # steps between the loop's host syncs (the divergence check, the bar's loss): each one waits
    # for the device, which on an accelerator runs steps ahead of the host, so there it is rare
    every = 10 if run.device.type == "cpu" else 50
    world, global_batch, total = run.dist.world_size, loader.batch_size, len(loader.sampler)
    for step, batch in enumerate(loader.epoch(epoch)):
        lr = optim.set_lr(run.schedule.factor(epoch, step, steps))
        n = batch.labels.numel()
        if run.dist.enabled:
            # DDP averages gradients over ranks: weight each rank by its share of the global batch,
            # so a last batch split unevenly (e.g. 23 + 22) still gives the single-process step
            optim.set_batch_share(n * world / min(global_batch, total - step * global_batch))
        stats = method.train_step(batch)
        lr = optim.lr  # a hook may set the step's lr from its loss (mlrsnet)
        loss_sum += stats["loss"].double() * n
        seen += n
        bad = (first_bad < 0) & ~torch.isfinite(stats["loss"].detach())
        first_bad = torch.where(bad, step, first_bad)
        synced = step % every == 0 or step == steps - 1
        if synced:
            check_finite(run, epoch, steps, first_bad)
        if bar is not None:
            bar.update(1)
            if synced:  # the loss is read where the check has just waited for the device
                elapsed = time.perf_counter() - start
                bar.set_postfix(
                    loss=f"{float(loss_sum) / max(seen, 1):.4f}",
                    lr=f"{lr:.4g}",
                    img_s=f"{seen * run.dist.world_size / max(elapsed, 1e-9):.0f}",
                )
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - start
    totals = torch.tensor([float(loss_sum), float(seen)], dtype=torch.float64)
    all_reduce_sum(totals, run.dist)
    row = {
        "epoch": epoch + 1,
        "lr": lr,
        "loss": float(totals[0] / max(totals[1], 1)),
        "images_per_s": float(totals[1]) / seconds,
        "seconds": seconds,
    }
    row.update(method.on_epoch_end(epoch))
    for hook in run.hooks.values():
        row.update(hook.after_epoch(run, epoch))
    return row


def evaluate_splits(run: Run, splits=("test", "val")) -> Dict[str, Dict[str, Any]]:
    data, cfg = run.data, run.cfg
    broadcast_buffers(run.method.model, run.dist)  # every rank evaluates rank 0's (saved) weights
    out = {}
    for split in splits:
        subset = getattr(data, split)
        if subset is None or len(subset) == 0:
            continue
        out[split] = evaluate(
            run.method.model,
            subset.images,
            subset.labels,
            data.class_counts,
            data.mean,
            data.std,
            device=run.device,
            batch_size=cfg.train.eval_batch_size,
            info=run.dist,
            amp_dtype=run.optim.amp_dtype,
            channels_last=cfg.train.channels_last,
            logits_fn=run.method.eval_logits_fn(),
        )
    return out


SUMMARY_KEYS = ("top1", "top5", "mean_class_acc", "many", "medium", "few", "ece")


def summary(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """The evaluation numbers a history row keeps (those the metrics have)."""
    return {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}


def announce(run: Run, start_epoch: int) -> None:
    """The run's data, groups, folder and device, printed once by rank 0."""
    counts = run.data.class_counts
    print(
        f"{run.data.name}: {len(run.data.train)} training images, {len(counts)} classes, "
        f"imbalance {max(counts) / max(min(counts), 1):.0f}; "
        f"{group_sizes_line(shot_groups(counts))}"
    )
    val = run.data.val
    missing = sorted(set(range(len(counts))) - set(val.labels.tolist())) if val is not None else []
    if val is not None and missing:
        print(
            f"note: val has no images of classes {missing} (the long-tailed subset uses all of "
            f"them); anything tuned on val (tau, model selection) cannot see those classes."
        )
    print(
        f"run folder: {run.folder.path}  device: {run.device}  processes: {run.dist.world_size}"
        + (f"  resuming after epoch {start_epoch}" if start_epoch else "")
    )
    print(f"precision: {describe(run.cfg.train.amp)} ({run.amp_reason})")
    n = parameter_counts(run)
    print(
        f"parameters: {n['trainable']:,} trainable of {n['total']:,} "
        f"({100.0 * n['trainable'] / max(n['total'], 1):.2f}%; tuning {run.cfg.model.tuning})"
    )


def parameter_counts(run: Run) -> Dict[str, int]:
    """The model's parameters, and those the optimiser updates (each tensor counted once)."""
    total = {id(p): p.numel() for p in run.method.model.parameters()}
    trained = {id(p): p.numel() for p in run.optim.params()}
    head = {id(p) for p in run.method.model.head.parameters()}
    return {
        "total": sum(total.values()),
        "trainable": sum(trained.values()),
        "trainable_head": sum(v for k, v in trained.items() if k in head),
    }


def fit(
    cfg: Config,
    run_dir: Path,
    data_root: Path,
    resume: bool = False,
    stop_after_epoch: Optional[int] = None,
) -> Optional[Dict[str, Any]]:
    """Train (or resume) a run; returns the final metrics (None if stopped early on purpose).

    ``stop_after_epoch`` ends the process after that many epochs, as a crash would (for tests).
    """
    run_dir = Path(run_dir)
    cfg, notes = prepare_config(cfg)  # checked, train.rescale_schedule applied, warnings
    _, info = setup_process(cfg)
    created = prepare_run_dir(run_dir, resume, info)
    folder = RunFolder(run_dir)
    try:
        with hold_run_folder(folder, info):
            return _fit(cfg, folder, data_root, resume, stop_after_epoch, info, notes)
    finally:
        if created and info.is_main:
            folder.remove_if_unused()  # a run that never started leaves no folder behind


def _fit(
    cfg: Config,
    folder: RunFolder,
    data_root: Path,
    resume: bool,
    stop_after_epoch: Optional[int],
    info: DistInfo,
    notes: List[str],
) -> Optional[Dict[str, Any]]:
    run_dir = folder.path
    if resume and cfg.train.amp == "auto":  # auto on resume: the precision the run recorded
        cfg = cfg.model_copy(deep=True)
        cfg.train.amp = folder.load_config().train.amp
    if resume:
        cfg = check_resume_config(folder, cfg, info)
    if not resume and folder.is_run():  # created while this process waited for the lock
        raise LongtailError(
            f"{run_dir} already holds a run. Continue it with --resume "
            f"{run_dir}, or choose another folder with --out DIR."
        )
    run = build_run(cfg, run_dir, data_root)
    cfg, info = run.cfg, run.dist  # train.amp resolved: what config.yaml records
    if resume:
        run.amp_reason = f"train.amp={cfg.train.amp}, as the run recorded it in {folder.CONFIG}"
    barrier(info)
    if resume and not folder.has_checkpoint() and info.is_main:
        print(
            f"note: {run_dir} has no checkpoint yet (no epoch had finished): the run starts "
            f"from epoch 0 with its saved config."
        )
    start_epoch = restore(run) if resume and folder.has_checkpoint() else 0
    history = folder.read_history(start_epoch) if resume else []
    if info.is_main and not resume:
        folder.write_config(cfg, exclusive=True)
    if info.is_main:
        announce(run, start_epoch)
        for line in [] if resume else notes + data_warnings(cfg, run.data):
            print(line, file=sys.stderr, flush=True)
    loggers = open_loggers(cfg.train.logger, cfg.train.logger_params, run_dir, info)
    with contextlib.closing(loggers):
        loggers.log_params(cfg.to_dict())
        return train_epochs(run, history, start_epoch, stop_after_epoch, loggers)


def train_epochs(
    run: Run,
    history: List[Dict[str, Any]],
    start_epoch: int,
    stop_after_epoch: Optional[int],
    loggers: Loggers,
) -> Optional[Dict[str, Any]]:
    """The epochs from ``start_epoch`` on, then the final evaluation and the results."""
    cfg, info, folder = run.cfg, run.dist, run.folder
    show_bar = cfg.train.progress and info.is_main
    for epoch in range(start_epoch, cfg.train.epochs):
        bar = tqdm(
            total=len(run.loader),
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=not show_bar,
        )
        row = train_one_epoch(run, epoch, bar if show_bar else None)
        bar.close()
        last = epoch + 1 == cfg.train.epochs
        if cfg.train.eval_every and (epoch + 1) % cfg.train.eval_every == 0 and not last:
            for split, m in evaluate_splits(run).items():
                row[split] = summary(m)
        history.append(row)
        if info.is_main:
            evals = "  ".join(f"{s} {row[s]['top1']:.2f}" for s in ("test", "val") if s in row)
            print(
                f"epoch {row['epoch']:>3}/{cfg.train.epochs}  loss {row['loss']:.4f}  "
                f"lr {row['lr']:.4g}  {row['images_per_s']:.0f} img/s  {row['seconds']:.1f}s"
                + (f"  top-1 {evals}" if evals else ""),
                flush=True,
            )
            folder.write_history(history)
            loggers.log_epoch(row)
            if (epoch + 1) % cfg.train.checkpoint_every == 0 or last:
                folder.save_checkpoint(training_state(run, epoch + 1))
        barrier(info)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and not last:
            return None

    run.method.on_train_end()
    if info.is_main:  # last.pt also holds what on_train_end set (a tau on val): eval reads it
        folder.save_checkpoint(training_state(run, cfg.train.epochs))
    results = evaluate_splits(run)
    metrics = final_metrics(run, results, history)
    if info.is_main:
        record_final_evaluation(run, history, results, loggers)
        write_results(run, results, metrics)
        loggers.log_final(metrics, cfg.train.epochs)
    barrier(info)
    return metrics


def record_final_evaluation(
    run: Run, history: List[Dict[str, Any]], results: Dict[str, Dict[str, Any]], loggers: Loggers
) -> None:
    """The final evaluation (after ``on_train_end``) into the last epoch's history row."""
    if not history or history[-1]["epoch"] != run.cfg.train.epochs:
        return
    evals = {split: summary(m) for split, m in results.items()}
    history[-1].update(evals)
    run.folder.write_history(history)
    loggers.log_epoch({"epoch": history[-1]["epoch"], **evals})


def final_metrics(
    run: Run, results: Dict[str, Dict[str, Any]], history: List[Dict[str, Any]]
) -> Dict[str, Any]:
    test = results["test"]
    train_seconds = sum(r["seconds"] for r in history)
    metrics = {k: v for k, v in test.items()}
    metrics.update(
        {
            "dataset": run.data.name,
            "epochs": run.cfg.train.epochs,
            "class_counts": list(run.data.class_counts),
            "train_seconds": train_seconds,
            "images_per_s": (
                sum(r["images_per_s"] * r["seconds"] for r in history) / train_seconds
                if train_seconds
                else None
            ),
            "world_size": run.dist.world_size,
            "device": str(run.device),
            "amp": run.cfg.train.amp,
            "amp_reason": run.amp_reason,
            "parameters": parameter_counts(run),
            "torch": torch.__version__,
            "machine": platform.machine(),
        }
    )
    metrics["provenance"] = provenance(run.data, run.cfg.data, run.device)
    metrics["logit_scale"] = run.method.logit_scale()  # ECE / NLL are of outputs x this
    metrics.update(run.method.extra_metrics())
    for hook in run.hooks.values():
        metrics.update(hook.metrics(run))
    for split, m in results.items():
        if split != "test":
            metrics[split] = m
    return metrics


def write_results(run: Run, results: Dict[str, Dict[str, Any]], metrics: Dict[str, Any]) -> None:
    folder = run.folder
    folder.save_weights(
        run.method.model.state_dict(), {"format": "longtail", "dataset": run.data.name}
    )
    run.method.save_artifacts(folder.path)  # method files (e.g. MFM's modulator.safetensors)
    for hook in run.hooks.values():
        hook.save_artifacts(run, folder)
    folder.write_metrics(metrics)  # last: marks the run finished
    plots = plot_run(
        folder.path,
        results,
        run.data.class_counts,
        class_names=getattr(run.data.train, "classes", None),
        title=f"{run.data.name}: {run.cfg.method.name} / {run.cfg.loss.name}",
    )
    print()
    print(results_table(results))
    print(f"\nmetrics: {folder.metrics_path}   plots: {', '.join(p.name for p in plots.values())}")
