"""Training strategies ("methods"): what one step, epoch or stage computes.

A method owns its loss, its model changes (``setup_model``) and any extra state (teacher, feature
queue, meta set); the step mechanics (AMP, GradScaler, clipping, the closure SAM/RSAM need, DDP
weighting) are the :class:`~longtail.optim.wrapper.OptimWrapper` the engine builds and hands to
:meth:`Method.attach`. The trainer only calls the hooks below, so adding a method never touches it.

Lifecycle: ``__init__(ctx, **options)`` (calls ``setup_model``) -> the engine moves the model to
the device and builds the optimiser over ``trainable_parameters()`` -> ``attach(optim,
train_model)`` -> per epoch ``on_epoch_start`` / ``train_step`` per batch / ``on_epoch_end`` ->
``on_train_end`` -> evaluation (``eval_logits_fn``) -> ``extra_metrics`` / ``save_artifacts``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from longtail.core.distributed import DistInfo
from longtail.core.facts import RunFacts
from longtail.core.registry import Registry
from longtail.data.loader import Batch
from longtail.optim.wrapper import AMP_DTYPES, OptimWrapper

METHODS = Registry("method")


@dataclass
class MethodContext:
    """What every method may use. ``model`` is the bare (unwrapped) model."""

    cfg: Any  # the validated Config
    model: nn.Module
    loss: nn.Module
    class_counts: List[int]
    device: torch.device
    dist: DistInfo = field(default_factory=DistInfo)
    train_labels: Optional[torch.Tensor] = None  # int64 [N] labels of the training set
    data: Any = None  # the DataBundle (for methods that need val / meta sets)
    facts: RunFacts = field(default_factory=RunFacts)


class Method:
    """Base class: a plain supervised step, ``loss(model(x), y)``.

    Subclasses override :meth:`setup_model` (load/freeze/replace parts before the model is moved
    and optimised), :meth:`trainable_parameters`, :meth:`compute_loss` or :meth:`train_step`,
    and the epoch hooks.
    """

    def __init__(self, ctx: MethodContext):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.device = ctx.device
        self.loss = ctx.loss.to(ctx.device)
        self.setup_model(ctx.model)
        self.model: nn.Module = ctx.model  # bare model: eval, checkpoints
        self.train_model: nn.Module = ctx.model  # what the step runs (DDP / compiled)
        self._optim: Optional[OptimWrapper] = None

    def attach(self, optim: OptimWrapper, train_model: nn.Module) -> None:
        """Receive the step wrapper and the model the step runs (set by the engine)."""
        self._optim = optim
        self.train_model = train_model

    # -- hooks -------------------------------------------------------------------------------
    def setup_model(self, model: nn.Module) -> None:
        """Change the model before it is moved, wrapped and optimised (default: nothing)."""

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def on_epoch_start(self, epoch: int) -> None:
        if hasattr(self.loss, "set_epoch"):
            self.loss.set_epoch(epoch)

    def on_epoch_end(self, epoch: int) -> Dict[str, float]:
        """Extra per-epoch statistics for history.jsonl."""
        return {}

    def on_train_end(self) -> None:
        """After the last epoch, before the final evaluation (e.g. pick a tau on val)."""

    def eval_logits_fn(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """A post-processing of the model's outputs at evaluation; by default the loss's
        ``logit_scale`` (a cosine loss's scale: calibration on the logits it trains with);
        None: raw. Post-hoc methods override it."""
        scale = float(getattr(self.loss, "logit_scale", 1.0))
        if scale == 1.0:
            return None
        return lambda logits: logits * scale

    def extra_metrics(self) -> Dict[str, Any]:
        """Method-specific entries for metrics.json (e.g. the tau chosen on val)."""
        return {}

    def logit_scale(self) -> float:
        """The scale evaluation applies to the model's outputs (see :meth:`eval_logits_fn`)."""
        return float(getattr(self.loss, "logit_scale", 1.0))

    def save_artifacts(self, run_dir: Path) -> None:
        """Write method-specific files into the finished run folder (rank 0, before metrics.json;
        e.g. MFM's ``modulator.safetensors``). Default: nothing."""

    # -- the step ----------------------------------------------------------------------------
    @property
    def optim(self) -> OptimWrapper:
        """The step wrapper (optimiser, AMP, clipping, closure protocol)."""
        if self._optim is None:
            raise RuntimeError(
                f"{type(self).__name__} has no optimiser yet: the engine attaches "
                f"one (Method.attach) after building the method."
            )
        return self._optim

    def autocast(self):
        """The forward context of the run's precision (also before an optimiser is attached)."""
        if self._optim is not None:
            return self._optim.autocast()
        amp = AMP_DTYPES.get(self.cfg.train.amp)
        return torch.autocast(self.device.type, dtype=amp, enabled=amp is not None)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        with self.autocast():
            out = self.train_model(batch.images)
        return self.loss(out.logits.float(), batch.labels)

    def train_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        """One optimisation step; returns detached statistics (at least ``loss``: the loss at the
        current weights, or at the perturbed ones for rsam)."""
        return {"loss": self.optim.update(self.compute_loss, batch)}

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"loss": self.loss.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.loss.load_state_dict(state["loss"], strict=False)  # buffers may be None before DRW


def build_method(name: str, ctx: MethodContext, params: Dict[str, Any]) -> Method:
    return METHODS.build(name, ctx, key_prefix="method.", **params)
