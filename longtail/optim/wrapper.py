"""One step mechanism for every method (mmengine's ``OptimWrapper.update_params`` is the model).

``OptimWrapper.update(loss_fn, batch)`` runs one optimisation step from a function that computes
the loss of a batch at the current weights: zero the gradients, loss, backward with the DDP share
weight and the fp16 loss scale, gradient clipping, and the optimiser's step. With
``train.accumulate_steps = k`` the batch is cut into k micro-batches whose weighted losses are
back-propagated one by one (DDP's ``no_sync`` on all but the last, clipping after the last), so
a step on a batch that does not fit in memory equals the step on the whole batch (up to float
rounding; BatchNorm normalises each micro-batch with its own statistics). Optimisers that evaluate the closure
themselves (``OptimInfo.needs_closure``: sam at w and w + e, rsam at a perturbed point) get it as a
closure; under fp16 GradScaler unscales, checks and steps the base update once per step
(``step(closure, base_step=scaler.step)``). BatchNorm running statistics move on the first
closure evaluation of a step only. Callbacks in ``after_first_backward`` see each step's loss
(detached, at the current weights) after its first backward and before the update: a learned
lr schedule (the MLR-SNet hook) sets the step's lr there.

The engine builds the wrapper (optimiser, AMP, clipping) and hands it to the method; the method
only computes losses. ``autocast()`` is the forward context of the run's precision.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, cast

import torch
import torch.nn as nn

from longtail.core.errors import ConfigError
from longtail.core.modules import frozen_running_stats

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _ClosureStepOptimizer(Protocol):
    """What ``needs_closure`` promises of an optimiser (sam, rsam): ``step`` evaluates the
    closure itself and makes the final update with ``base_step(base_optimizer)``."""

    def step(
        self, closure: Callable[[], torch.Tensor], base_step: Callable[[torch.optim.Optimizer], Any]
    ) -> torch.Tensor: ...


class OptimWrapper:
    """The optimiser of a run with its step mechanics.

    Args:
        optimizer: the built optimiser (its groups carry ``base_lr``).
        needs_closure: the optimiser's ``step(closure, base_step)`` evaluates the closure itself.
        device_type: "cpu" / "cuda" (autocast and GradScaler).
        amp: None / "none", "bf16" or "fp16".
        grad_clip: max global gradient norm (None: no clipping).
        model: the bare model, whose BatchNorm statistics repeated closure calls must not move.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        needs_closure: bool = False,
        device_type: str = "cpu",
        amp: Optional[str] = None,
        grad_clip: Optional[float] = None,
        model: Optional[nn.Module] = None,
        accumulate_steps: int = 1,
        train_model: Optional[nn.Module] = None,
    ):
        if amp not in (None, "none", *AMP_DTYPES):
            raise ConfigError(
                f"OptimWrapper: amp={amp!r} is not a precision; train.amp=auto is resolved to "
                f"none or bf16 when the run is built (engine.trainer.resolve_precision)."
            )
        if int(accumulate_steps) < 1:
            raise ConfigError(f"train.accumulate_steps must be >= 1, got {accumulate_steps!r}.")
        self.optimizer = optimizer
        self.needs_closure = bool(needs_closure)
        self.device_type = device_type
        self.amp_dtype = AMP_DTYPES.get(amp or "none")
        self.scaler = torch.amp.GradScaler(device_type, enabled=(amp == "fp16"))
        self.grad_clip = grad_clip
        self.model = model
        self.grad_scale = 1.0  # this rank's share of the global batch x world size (DDP)
        self.accumulate_steps = int(accumulate_steps)
        self.train_model = train_model  # the DDP-wrapped model: no_sync between micro-batches
        self.after_first_backward: List[Callable[[Any, torch.Tensor], None]] = []

    # -- settings ----------------------------------------------------------------------------
    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def params(self) -> List[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def set_lr(self, factor: float) -> float:
        """Every group's lr = its base_lr x factor; returns the first group's lr."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return self.optimizer.param_groups[0]["lr"]

    def set_epoch(self, epoch: int) -> None:
        """Tell an epoch-aware optimiser (rsam's noise decay) the 0-based epoch."""
        if hasattr(self.optimizer, "set_epoch"):
            self.optimizer.set_epoch(epoch)

    def set_batch_share(self, weight: float) -> None:
        """DDP averages gradients over ranks: weight this rank's loss by ``weight`` (its share of
        the global batch x world size; 1.0 unless a short last batch is split unevenly)."""
        self.grad_scale = float(weight)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            self.device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        )

    # -- the step ----------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, clip: bool = True) -> None:
        """Backward of one loss: DDP share weighting, fp16 loss scaling, gradient clipping
        (``clip``: after the last micro-batch of a step only)."""
        if self.grad_scale != 1.0:
            loss = loss * self.grad_scale
        self.scaler.scale(loss).backward()
        if self.grad_clip and clip:
            # fp16: cut the scaled gradients at clip x scale (the same cut as clip on unscaled
            # ones) and leave the one unscale + inf check of the step to scaler.step, which a
            # step with several closures (sam) could not call unscale_ before; 1.0 without fp16
            scale = float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0
            torch.nn.utils.clip_grad_norm_(self.params(), self.grad_clip * scale)

    def micro_batches(self, batch: Any) -> List[Tuple[Any, float]]:
        """``batch`` cut into ``accumulate_steps`` contiguous micro-batches (fields sliced along
        dim 0), each with its share of the batch; ``[(batch, 1.0)]`` without accumulation."""
        if self.accumulate_steps == 1 or batch is None:
            return [(batch, 1.0)]
        n = len(batch[0])
        bounds = [n * i // self.accumulate_steps for i in range(self.accumulate_steps + 1)]
        return [
            (type(batch)(*(t[a:b] for t in batch)), (b - a) / n)
            for a, b in zip(bounds, bounds[1:])
            if b > a
        ]

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients on the last micro-batch's backward only."""
        no_sync = getattr(self.train_model, "no_sync", None)
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    def closure(
        self, loss_fn: Callable[[Any], torch.Tensor], batch: Any = None
    ) -> Callable[[], torch.Tensor]:
        """PyTorch's closure: zero the gradients, ``loss_fn(micro-batch)`` and backward for each
        micro-batch (weighted by its share; DDP synchronises on the last), clip; returns the
        detached loss of the whole batch. Later calls within the step keep BatchNorm statistics;
        the first one reports the loss to ``after_first_backward``."""
        calls = 0

        def closure() -> torch.Tensor:
            nonlocal calls
            again = calls > 0
            calls += 1
            parts = self.micro_batches(batch)
            with (
                frozen_running_stats(self.model)
                if again and self.model is not None
                else contextlib.nullcontext()
            ):
                self.optimizer.zero_grad(set_to_none=True)
                if len(parts) == 1:
                    loss = loss_fn(batch)
                    self.backward(loss)
                    loss = loss.detach()
                else:
                    loss = torch.zeros(())
                    for i, (part, share) in enumerate(parts):
                        last = i == len(parts) - 1
                        with self._sync(last):
                            part_loss = loss_fn(part)
                            self.backward(part_loss * share, clip=last)
                        loss = loss.to(part_loss.device) + part_loss.detach() * share
            if not again:
                for callback in self.after_first_backward:
                    callback(batch, loss)
            return loss

        return closure

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``optimizer.step(closure)``, with GradScaler's unscale / inf check / update under fp16;
        returns the closure's (first) loss."""
        if self.scaler.is_enabled():
            if self.needs_closure:
                optimizer = cast(_ClosureStepOptimizer, self.optimizer)  # needs_closure: sam, rsam
                loss = optimizer.step(closure, base_step=self.scaler.step)
            else:
                loss = closure()
                self.scaler.step(self.optimizer)
            self.scaler.update()
            return loss
        # torch types a closure as returning float; it returns the loss tensor, and so does step
        return self.optimizer.step(closure)  # type: ignore[arg-type, return-value]

    def update(self, loss_fn: Callable[[Any], torch.Tensor], batch: Any = None) -> torch.Tensor:
        """One optimisation step on ``batch``: ``loss_fn(batch)`` is the loss at the current
        weights (called once per micro-batch with gradient accumulation)."""
        return self.step(self.closure(loss_fn, batch))

    def step_with_loss(self, loss: torch.Tensor) -> None:
        """Backward + step for a loss computed outside a closure (one gradient at the current
        weights); optimisers that evaluate the closure themselves cannot take this."""
        if self.needs_closure or self.accumulate_steps > 1:
            raise ConfigError(
                "This method computes its loss outside the step closure, which the chosen "
                "optim.name (or train.accumulate_steps > 1) needs. Use optim.name=sgd with "
                "train.accumulate_steps=1, or step through OptimWrapper.update(loss_fn, batch)."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


__all__: Sequence[str] = ("OptimWrapper", "AMP_DTYPES")
