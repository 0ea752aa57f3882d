"""MFM — Meta Feature Modulator (Wang, Hu, Zhu, Shu, Zhao, Meng, arXiv 2008.03428, 2020).

Per-channel scale/shift of intermediate features (:mod:`longtail.models.modulator`), meta-learned
on a small balanced meta set with the bi-level step of :mod:`longtail.optim.meta`. Everything
beyond the abstract is [PROPOSED] (our reading). Per step, α_t the optimiser's current lr::

    θ̂(φ) = θ − α_t ∇θ L_train(θ, φ);  φ ← Adam(φ, ∇φ CE_meta(θ̂(φ)));  θ ← SGD(θ, ∇θ L_train(θ, φ))

L_train (``loss.name``) is modulated; the meta CE and evaluation are not (``modulate_meta``,
``modulate_at_test``: false | true | auto). Options ``method.*``, transfer (``modulator``,
``freeze_modulator``), files and measurements: docs/methods/meta.md.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from longtail.core.distributed import all_reduce_sum
from longtail.core.errors import ConfigError
from longtail.data.loader import Batch
from longtail.data.meta import build_meta_loader
from longtail.methods.base import METHODS, Method, MethodContext
from longtail.methods.decoupled import eval_forward, require_val
from longtail.models.modulator import (
    FeatureModulator,
    StageModulation,
    build_modulator,
    load_modulator,
    save_modulator,
)
from longtail.optim.meta import (
    META_OPTIMIZERS,
    bilevel_meta_step,
    loss_closure,
    make_meta_optimizer,
)

MODULATOR_FILE = "modulator.safetensors"


@METHODS.register("mfm")
class MFM(Method):
    """Meta feature modulation; see docs/methods/meta.md for the algorithm and options."""

    def __init__(
        self,
        ctx: MethodContext,
        variant: Literal["direct", "network"] = "network",
        stages: Optional[List[int]] = None,
        hidden_ratio: Annotated[int, Field(ge=1)] = 4,
        modulate_meta: bool = False,
        modulate_at_test: Union[bool, Literal["auto"]] = False,
        meta_batch_size: Annotated[int, Field(ge=1)] = 100,
        meta_augment: bool = False,
        meta_every: Annotated[int, Field(ge=1)] = 1,
        meta_optimizer: str = "adam",
        meta_lr: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1e-3,
        meta_weight_decay: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 1e-4,
        meta_momentum: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.9,
        meta_grad_clip: Optional[Annotated[float, Field(gt=0.0)]] = None,
        inner_lr: Optional[Annotated[float, Field(ge=0.0, allow_inf_nan=False)]] = None,
        inner_weight_decay: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0,
        second_order: bool = True,
        meta_amp: bool = False,
        modulator: Optional[str] = None,
        freeze_modulator: bool = False,
    ):
        if meta_optimizer not in META_OPTIMIZERS:
            raise ConfigError(
                f"method.meta_optimizer={meta_optimizer!r}: use one of "
                f"{', '.join(META_OPTIMIZERS)}."
            )
        if not isinstance(meta_every, int) or meta_every < 1:
            raise ConfigError(f"method.meta_every={meta_every!r} must be an integer >= 1.")
        if not isinstance(meta_batch_size, int) or meta_batch_size < 1:
            raise ConfigError(
                f"method.meta_batch_size={meta_batch_size!r} must be an integer >= 1."
            )
        if modulate_at_test not in (True, False, "auto"):
            raise ConfigError(
                f"method.modulate_at_test={modulate_at_test!r}: use true, false or auto "
                f"(auto: the higher val top-1 decides at the end of training)."
            )
        if freeze_modulator and not modulator:
            raise ConfigError(
                "method.freeze_modulator=true needs method.modulator=PATH (a "
                "modulator.safetensors from a finished MFM run); a frozen new "
                "modulator is the identity and would train plain ERM."
            )
        self.variant, self.stages, self.hidden_ratio = variant, stages, hidden_ratio
        self.modulate_meta = bool(modulate_meta)
        self.deploy_auto = modulate_at_test == "auto"
        self.modulate_at_test = modulate_at_test is True  # auto: unmodulated until chosen
        self.deploy_info: Optional[Dict[str, Any]] = None
        self.meta_every, self.inner_lr = meta_every, inner_lr
        self.inner_weight_decay, self.second_order = float(inner_weight_decay), bool(second_order)
        self.meta_amp, self.meta_grad_clip = bool(meta_amp), meta_grad_clip
        self.modulator_path, self.frozen = modulator, bool(freeze_modulator)
        super().__init__(ctx)  # calls setup_model (builds self.modulator) before the optimiser

        self.modulator = self.modulator.to(self.device)
        self.modulation = StageModulation(
            self.model.backbone, self.modulator, default=self.modulate_at_test
        )
        self.meta_params = [p for p in self.modulator.parameters()]
        if self.frozen:
            for p in self.meta_params:
                p.requires_grad_(False)
            self.meta_loader, self.meta_optimizer = None, None
        else:
            data = ctx.data
            if data is None or getattr(data, "meta", None) is None or len(data.meta) == 0:
                raise ConfigError(
                    "method.name=mfm meta-learns its modulator on a balanced meta set, "
                    "but the run has none: set data.meta_per_class (e.g. 10), or train "
                    "under a saved modulator with method.modulator=PATH "
                    "method.freeze_modulator=true."
                )
            self.meta_loader = build_meta_loader(
                data,
                self.cfg,
                self.device,
                batch_size=meta_batch_size,
                augment=meta_augment,
                rank=ctx.dist.rank,
                world_size=ctx.dist.world_size,
            )
            self.meta_optimizer = make_meta_optimizer(
                self.meta_params, meta_optimizer, meta_lr, meta_weight_decay, meta_momentum
            )
        self.steps = 0  # training steps done (decides when a meta step is due)
        self.meta_steps = 0  # meta updates done (the meta batch index)
        self._meta_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._meta_count = 0

    # -- model -------------------------------------------------------------------------------
    def setup_model(self, model: nn.Module) -> None:
        backbone = model.backbone
        if self.modulator_path:
            self.modulator: FeatureModulator = load_modulator(self.modulator_path, backbone)
        else:
            self.modulator = build_modulator(backbone, self.variant, self.stages, self.hidden_ratio)

    @contextlib.contextmanager
    def _modulator_constant(self):
        """The real step: modulation applied with φ fixed (no gradient into the modulator)."""
        flags = [p.requires_grad for p in self.meta_params]
        for p in self.meta_params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, f in zip(self.meta_params, flags):
                p.requires_grad_(f)

    # -- the step ----------------------------------------------------------------------------
    def meta_step(self, batch: Batch) -> torch.Tensor:
        """Steps 1-2: update the modulator on the next meta batch; returns the meta loss."""
        meta = self.meta_loader.batch(self.meta_steps)
        model = self.model
        amp = self.optim.amp_dtype if self.meta_amp else None
        lr = self.inner_lr if self.inner_lr is not None else self.optim.lr
        train_fn = loss_closure(
            model,
            batch.images,
            batch.labels,
            self.loss,
            amp_dtype=amp,
            context=lambda: self.modulation.active(True),
        )
        meta_fn = loss_closure(
            model,
            meta.images,
            meta.labels,
            F.cross_entropy,
            amp_dtype=amp,
            context=lambda: self.modulation.active(self.modulate_meta),
        )
        stats = bilevel_meta_step(
            model,
            self.meta_params,
            self.meta_optimizer,
            train_fn,
            meta_fn,
            lr,
            weight_decay=self.inner_weight_decay,
            differentiable=self.second_order,
            info=self.ctx.dist,
            max_norm=self.meta_grad_clip,
        )
        self.meta_steps += 1
        return stats.meta_loss

    def train_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        if not self.frozen and self.steps % self.meta_every == 0:
            meta_loss = self.meta_step(batch)
            self._meta_sum += meta_loss.double()
            self._meta_count += 1
            out["meta_loss"] = meta_loss
        # step 3, the real step (the base class's closure protocol: also works with sam / rsam)
        with self.modulation.active(True), self._modulator_constant():
            loss = self.optim.update(self.compute_loss, batch)
        self.steps += 1
        out["loss"] = loss.detach()
        return out

    # -- hooks -------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self._meta_sum.zero_()
        self._meta_count = 0

    def on_epoch_end(self, epoch: int) -> Dict[str, float]:
        if self._meta_count == 0:
            return {}
        both = torch.stack(
            [self._meta_sum.cpu(), torch.tensor(float(self._meta_count), dtype=torch.float64)]
        )
        all_reduce_sum(both, self.ctx.dist)  # each rank's meta loss is on its share of the batch
        return {"meta_loss": float(both[0] / both[1])}

    def on_train_end(self) -> None:
        """``modulate_at_test: auto``: deploy the modulated network iff its val top-1 is higher."""
        if not self.deploy_auto:
            return
        val = require_val(self, "mfm with modulate_at_test=auto")
        top1 = {}
        for flag in (False, True):
            self.modulation.default = flag
            correct = sum(
                int((z.argmax(1) == y).sum())
                for _, z, y in eval_forward(self, val.images, val.labels)
            )
            top1[flag] = 100.0 * correct / len(val)
        self.modulate_at_test = top1[True] > top1[False]
        self.modulation.default = self.modulate_at_test
        self.deploy_info = {
            "deployed": "modulated" if self.modulate_at_test else "unmodulated",
            "val_top1_unmodulated": top1[False],
            "val_top1_modulated": top1[True],
        }

    def extra_metrics(self) -> Dict[str, Any]:
        data = self.ctx.data
        meta = getattr(data, "meta", None) if data is not None else None
        return {
            "mfm": {
                "variant": self.modulator.variant,
                "stages": list(self.modulator.stages),
                "frozen": self.frozen,
                "modulator": str(self.modulator_path) if self.modulator_path else None,
                "meta_images": 0 if meta is None else len(meta),
                "meta_borrowed": None if data is None else getattr(data, "meta_borrowed", None),
                "meta_steps": self.meta_steps,
                "modulate_at_test": self.modulate_at_test,
                "deploy_choice": self.deploy_info,
            }
        }

    def save_artifacts(self, run_dir: Path) -> None:
        save_modulator(Path(run_dir) / MODULATOR_FILE, self.modulator)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["mfm"] = {
            "modulator": self.modulator.state_dict(),
            "steps": self.steps,
            "meta_steps": self.meta_steps,
            "modulate_at_test": self.modulate_at_test,
            "deploy_info": self.deploy_info,
            "meta_optimizer": (
                self.meta_optimizer.state_dict() if self.meta_optimizer is not None else None
            ),
        }
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        mine = state["mfm"]
        self.modulator.load_state_dict(mine["modulator"])
        self.steps, self.meta_steps = int(mine["steps"]), int(mine["meta_steps"])
        if self.deploy_auto and "modulate_at_test" in mine:  # the choice made on val
            self.modulate_at_test = bool(mine["modulate_at_test"])
            self.modulation.default = self.modulate_at_test
            self.deploy_info = mine.get("deploy_info")
        if self.meta_optimizer is not None and mine["meta_optimizer"] is not None:
            self.meta_optimizer.load_state_dict(mine["meta_optimizer"])
