"""Training strategies ("methods"): how one step, epoch or stage is run.

The trainer only calls the hooks of :class:`Method`; a method owns its optimiser, its loss and any
extra state (teacher, feature queue, meta set), so adding one never touches the trainer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from longtail.data.loader import Batch
from longtail.core.distributed import DistInfo, unwrap, wrap_ddp
from longtail.core.errors import ConfigError
from longtail.optim import build_optimizer
from longtail.core.registry import Registry

METHODS = Registry("method")


@dataclass
class MethodContext:
    """What every method may use. ``model`` is the bare (unwrapped) model."""

    cfg: Any                       # the validated Config
    model: nn.Module
    loss: nn.Module
    class_counts: List[int]
    device: torch.device
    dist: DistInfo = field(default_factory=DistInfo)
    train_labels: Optional[torch.Tensor] = None  # int64 [N] labels of the training set
    data: Any = None               # the DataBundle (for methods that need val / meta sets)


class Method:
    """Base class: a plain supervised step with AMP, gradient clipping and DDP.

    Subclasses override :meth:`setup_model` (load/freeze/replace parts before DDP wrapping),
    :meth:`trainable_parameters`, :meth:`train_step`, and the epoch hooks.
    """

    def __init__(self, ctx: MethodContext):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.device = ctx.device
        self.loss = ctx.loss.to(ctx.device)
        self.setup_model(ctx.model)
        model = ctx.model.to(ctx.device)
        if self.cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model                             # bare model: eval, checkpoints
        # run facts an optimiser may ask for by name (rsam: noise seed, the loss's DRW epoch)
        self.optimizer = build_optimizer(self.cfg.optim, self.trainable_parameters(),
                                         seed=self.cfg.seed,
                                         drw_epoch=getattr(self.loss, "drw_epoch", None))
        self.train_model = wrap_ddp(model, ctx.dist, ctx.device)  # what the step runs
        if self.cfg.train.compile:
            self.train_model = torch.compile(self.train_model)
        amp = self.cfg.train.amp
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=(amp == "fp16"))
        # set by the trainer before each step under DDP: (this rank's batch / global batch) x world
        # size; 1.0 unless the ranks' shares differ (a short last batch split unevenly)
        self.grad_scale = 1.0
        # called as hook(batch, loss) once per step, after the first backward of the closure and
        # before the optimiser's update (loss: detached, at the current weights); a loss-driven
        # schedule (optim.schedule=mlrsnet) sets the step's lr here
        self.step_hooks: List[Callable[[Batch, torch.Tensor], None]] = []

    # -- hooks -------------------------------------------------------------------------------
    def setup_model(self, model: nn.Module) -> None:
        """Change the model before it is moved, wrapped and optimised (default: nothing)."""

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def on_epoch_start(self, epoch: int) -> None:
        if hasattr(self.loss, "set_epoch"):
            self.loss.set_epoch(epoch)
        if hasattr(self.optimizer, "set_epoch"):   # e.g. rsam's noise decay
            self.optimizer.set_epoch(epoch)

    def on_epoch_end(self, epoch: int) -> Dict[str, float]:
        """Extra per-epoch statistics for history.jsonl."""
        return {}

    def on_train_end(self) -> None:
        """After the last epoch, before the final evaluation (e.g. pick a tau on val)."""

    def eval_logits_fn(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """A post-processing of logits applied at evaluation (post-hoc adjustment); None: raw."""
        return None

    def extra_metrics(self) -> Dict[str, Any]:
        """Method-specific entries for metrics.json (e.g. the tau chosen on val)."""
        return {}

    def save_artifacts(self, run_dir: Path) -> None:
        """Write method-specific files into the finished run folder (rank 0, before metrics.json;
        e.g. MFM's ``modulator.safetensors``). Default: nothing."""

    # -- the step ----------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        with self.autocast():
            out = self.train_model(batch.images)
        return self.loss(out.logits.float(), batch.labels)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """Backward + step for a loss computed outside a closure (one gradient at the current
        weights). :meth:`train_step` uses the closure path instead; optimisers that evaluate the
        closure themselves (sam, rsam) cannot use this."""
        if getattr(self.optimizer, "needs_closure", False):
            raise ConfigError(f"{type(self).__name__} computes its loss outside the step closure, "
                              f"which optim.name={self.cfg.optim.name} needs. Use optim.name=sgd, "
                              f"or build the step with make_closure() and optimizer_step().")
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def backward(self, loss: torch.Tensor) -> None:
        """The closure's backward: DDP share weighting, fp16 loss scaling, gradient clipping."""
        if self.grad_scale != 1.0:
            loss = loss * self.grad_scale
        self.scaler.scale(loss).backward()
        clip = self.cfg.optim.grad_clip
        if clip:
            # fp16: cut the scaled gradients at clip x scale (the same cut as clip on unscaled
            # ones) and leave the one unscale + inf check of the step to scaler.step, which a
            # step with several closures (sam) could not call unscale_ before; 1.0 without fp16
            scale = float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), clip * scale)

    @contextlib.contextmanager
    def frozen_running_stats(self):
        """Leave BatchNorm running statistics (and num_batches_tracked) as they were before."""
        saved = [(buf, buf.detach().clone()) for m in self.model.modules()
                 if isinstance(m, nn.modules.batchnorm._NormBase) and m.training
                 and m.track_running_stats
                 for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
                 if buf is not None]
        try:
            yield
        finally:
            with torch.no_grad():
                for buf, old in saved:
                    buf.copy_(old)

    def make_closure(self, batch: Batch) -> Callable[[], torch.Tensor]:
        """PyTorch's closure for this batch: zero the gradients, forward, loss, backward (with
        grad_scale, AMP, clipping); returns the detached loss. The optimiser calls it once (sgd,
        rsam) or more (sam: at w, then at w + e); BatchNorm running statistics are updated by the
        first call of the step only. Under DDP every backward all-reduces (no ``no_sync``)."""
        calls = 0

        def closure() -> torch.Tensor:
            nonlocal calls
            again = calls > 0
            calls += 1
            with self.frozen_running_stats() if again else contextlib.nullcontext():
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.compute_loss(batch)
                self.backward(loss)
            if not again:
                for hook in self.step_hooks:
                    hook(batch, loss.detach())
            return loss.detach()

        return closure

    def optimizer_step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``optimizer.step(closure)``; returns the closure's (first) loss. With fp16, GradScaler
        unscales, checks and steps (it cannot drive a closure): the closure runs once here, or,
        for optimisers that evaluate it themselves (sam, rsam), they hand the final base update
        to ``scaler.step`` of their base optimiser."""
        if self.scaler.is_enabled():
            if getattr(self.optimizer, "needs_closure", False):
                base = self.optimizer.base
                loss = self.optimizer.step(closure, base_step=lambda: self.scaler.step(base))
            else:
                loss = closure()
                self.scaler.step(self.optimizer)
            self.scaler.update()
            return loss
        return self.optimizer.step(closure)

    def train_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """One optimisation step through the closure protocol; returns detached statistics
        (at least ``loss``: the loss at the current weights, or at the perturbed ones for rsam)."""
        loss = self.optimizer_step(self.make_closure(batch))
        return {"loss": loss}

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "loss": self.loss.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.loss.load_state_dict(state["loss"], strict=False)  # buffers may be None before DRW

    @property
    def bare_model(self) -> nn.Module:
        return unwrap(self.model)


def build_method(name: str, ctx: MethodContext, params: Dict[str, Any]) -> Method:
    return METHODS.build(name, ctx, key_prefix="method.", **params)
