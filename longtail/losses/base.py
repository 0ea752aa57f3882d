"""Class-balanced weights (Cui et al., CVPR 2019) and deferred re-weighting (DRW; Cao et al., NeurIPS 2019).
Formula: w_c = (1 - beta) / (1 - beta^{n_c}), scaled to sum_c w_c = C; DRW applies them once epoch >= drw_epoch."""

from __future__ import annotations

import contextlib
import math
from typing import Annotated, Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from pydantic import Field

from longtail.core.errors import ConfigError
from longtail.core.registry import Registry

# option types with their ranges: the config check validates ``loss.*`` values against them
# (pydantic, from the builders' signatures) before anything is built
Epoch = Annotated[int, Field(ge=0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]

#: Registry of every loss family; build one with :func:`longtail.losses.create`.
LOSSES = Registry("loss")


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def as_class_counts(class_counts: Any, key: str = "loss.class_counts") -> np.ndarray:
    """Validate ``class_counts`` (list / tuple / numpy array / tensor) -> float64 numpy array [C].

    Every count must be finite and > 0 (a class with no training image has no prior, no margin
    and an infinite effective-number weight).
    """
    if class_counts is None:
        raise ConfigError(f"'{key}' is missing: give the number of training images per class.")
    if isinstance(class_counts, torch.Tensor):
        class_counts = class_counts.detach().cpu().numpy()
    try:
        counts = np.asarray(class_counts, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"'{key}' must be a list of per-class image counts, got {class_counts!r}."
        ) from exc
    if counts.ndim != 1 or counts.size == 0:
        raise ConfigError(
            f"'{key}' must be a non-empty 1-D list of per-class image counts, "
            f"got shape {tuple(counts.shape)}."
        )
    if not np.all(np.isfinite(counts)) or np.any(counts <= 0):
        bad = [i for i, n in enumerate(counts) if not (math.isfinite(n) and n > 0)]
        raise ConfigError(
            f"'{key}' must be positive for every class; classes {bad[:10]} have "
            f"count <= 0 or non-finite. Drop empty classes or fix the dataset split."
        )
    return counts


def check_beta(beta: Any, key: str) -> float:
    if (
        isinstance(beta, bool)
        or not isinstance(beta, (int, float))
        or not (0.0 <= float(beta) < 1.0)
    ):
        raise ConfigError(f"'{key}' must be a number in [0, 1), got {beta!r}.")
    return float(beta)


def check_number(
    value: Any, key: str, *, minimum: Optional[float] = None, strict: bool = False
) -> float:
    """A finite real number, optionally ``>= minimum`` (``> minimum`` when ``strict``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(float(value))
    ):
        raise ConfigError(f"'{key}' must be a finite number, got {value!r}.")
    value = float(value)
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ConfigError(f"'{key}' must be {'>' if strict else '>='} {minimum}, got {value!r}.")
    return value


def check_epoch(epoch: Any, key: str) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or int(epoch) < 0:
        raise ConfigError(f"'{key}' must be a non-negative integer (0-based epoch), got {epoch!r}.")
    return int(epoch)


# --------------------------------------------------------------------------------------------
# class-balanced (effective-number) weights
# --------------------------------------------------------------------------------------------


def class_balanced_weights(
    class_counts: Union[Sequence[float], np.ndarray], beta: float = 0.9999
) -> torch.Tensor:
    """Effective-number class weights of Cui et al. (CVPR 2019), docs/index.md.

    ``w_c = (1 - beta) / (1 - beta ** n_c)``, then ``w <- w * C / sum(w)`` so the weights sum to C.
    ``beta = 0`` gives all-ones weights (no re-weighting); ``beta -> 1`` tends to ``1 / n_c``.
    Computed in float64, returned as a float32 tensor of shape [C] on the CPU.
    """
    counts = as_class_counts(class_counts)
    beta = check_beta(beta, "loss.beta")
    effective_num = (
        -np.expm1(counts * np.log(beta)) if beta > 0 else np.ones_like(counts)
    )  # 1 - beta^n
    weights = (1.0 - beta) / effective_num
    weights = weights * (counts.size / weights.sum())
    return torch.tensor(weights, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------


def _fp32_context(device_type: str):
    """Disable autocast for ``device_type`` so the loss runs in float32."""
    available = getattr(getattr(torch, "amp", None), "is_autocast_available", None)
    try:
        if available is None or available(device_type):
            return torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, ValueError):  # pragma: no cover - exotic device types
        pass
    return contextlib.nullcontext()


class LongtailLoss(nn.Module):
    """Base class: validated class counts, the class-weight buffer and deferred re-weighting.

    Every loss in :mod:`longtail.losses` derives from it. It owns

    * the validated ``class_counts`` (n_c, one positive number per class; ``self.counts``),
    * the class-weight mechanism: a registered buffer ``weight`` (float32 [C] or ``None``) that
      the subclasses pass to ``F.cross_entropy(weight=...)``,
    * deferred re-weighting (DRW): ``drw_epoch=None|int`` and ``drw_beta`` are options of every
      loss; :meth:`set_epoch` switches ``weight`` on once ``epoch >= drw_epoch``,
    * the float32 guarantee: logits are cast to float32 and autocast is disabled in ``forward``.

    Epochs are 0-based. The LDAM-DRW reference computes ``idx = epoch // 160`` on 0-based epochs,
    so its CB weights are active from epoch index 160 onward: ``drw_epoch=160`` reproduces it.
    GNM-PT's GCL tests ``epoch > reweight_epoch`` with ``reweight_epoch=59``: that is ``drw_epoch=60``.

    Subclasses implement ``_loss(logits, targets)`` on float32 logits [B, C] and int64 targets [B]
    and pass ``self.weight`` (float32 [C] or ``None``) to ``F.cross_entropy``.

    Weight schedule (``own_weight`` is the loss's static weights: ``None`` except for ``cb``):

    ========================  ======================  ===============================
    ``drw_epoch``             epoch < drw_epoch       epoch >= drw_epoch
    ========================  ======================  ===============================
    ``None``                  ``own_weight``          ``own_weight``
    int                       ``None``                ``own_weight`` if set, else
                                                      ``class_balanced_weights(n, drw_beta)``
    ========================  ======================  ===============================

    Buffers are registered non-persistent: ``.to(device)`` moves them, but they are rebuilt from
    ``class_counts`` at construction and never enter a ``state_dict`` (so a checkpoint saved before
    and one saved after ``drw_epoch`` load into the same fresh loss). Call :meth:`set_epoch` after
    resuming.
    """

    #: True for losses that expect cosine logits in [-1, 1] from a normalised (cosine) head.
    requires_normalized_head: bool = False

    @property
    def logit_scale(self) -> float:
        """The factor that turns the model's outputs into the logits this loss trains with (its
        softmax): 1 for plain logits; a cosine loss's ``scale`` (LDAM 30, GCL 25). Evaluation
        multiplies by it, so calibration (ECE, NLL) is measured on those logits."""
        return float(getattr(self, "scale", 1.0)) if self.requires_normalized_head else 1.0

    #: True for losses that cannot be computed without the per-class counts.
    needs_class_counts: bool = False

    weight: Optional[torch.Tensor]
    static_weight: Optional[torch.Tensor]
    drw_weight: Optional[torch.Tensor]

    def __init__(
        self,
        class_counts: Optional[Sequence[float]] = None,
        *,
        drw_epoch: Optional[int] = None,
        drw_beta: float = 0.9999,
        own_weight: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        name = getattr(self, "registry_name", type(self).__name__)
        if class_counts is None and (self.needs_class_counts or drw_epoch is not None):
            why = (
                "it is computed from them"
                if self.needs_class_counts
                else "DRW (loss.drw_epoch) needs them"
            )
            raise ConfigError(
                f"loss {name!r} needs 'loss.class_counts' (the number of training images "
                f"per class) because {why}."
            )
        self.counts: Optional[np.ndarray] = (
            None if class_counts is None else as_class_counts(class_counts)
        )
        self.num_classes: Optional[int] = None if self.counts is None else int(self.counts.size)
        self.drw_epoch: Optional[int] = (
            None if drw_epoch is None else check_epoch(drw_epoch, "loss.drw_epoch")
        )
        self.drw_beta: float = check_beta(drw_beta, "loss.drw_beta")

        if self.drw_epoch is None:
            static, deferred = own_weight, None
        else:
            static = None
            assert self.counts is not None  # DRW without class_counts was refused above
            deferred = (
                own_weight
                if own_weight is not None
                else class_balanced_weights(self.counts, self.drw_beta)
            )
        self.register_buffer("weight", None, persistent=False)
        self.register_buffer("static_weight", _as_f32(static), persistent=False)
        self.register_buffer("drw_weight", _as_f32(deferred), persistent=False)
        self.epoch = 0
        self.set_epoch(0)

    # -- DRW -----------------------------------------------------------------------------------
    @property
    def drw_active(self) -> bool:
        """True once ``set_epoch(e)`` was called with ``e >= drw_epoch``."""
        return self.drw_epoch is not None and self.epoch >= self.drw_epoch

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss the 0-based index of the epoch about to start (no-op if nothing changes)."""
        self.epoch = check_epoch(epoch, "epoch")
        self.weight = self.drw_weight if self.drw_active else self.static_weight

    # -- forward -------------------------------------------------------------------------------
    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """logits [B, C] float (any dtype; computed in float32), targets [B] int64 -> scalar."""
        if logits.dim() != 2:
            raise ValueError(f"logits must have shape [B, C], got {tuple(logits.shape)}")
        if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
            raise ValueError(
                f"targets must have shape [B] = [{logits.shape[0]}], got {tuple(targets.shape)}"
            )
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ConfigError(
                f"The model outputs {logits.shape[1]} classes but 'loss.class_counts' has "
                f"{self.num_classes} entries; they must match."
            )
        with _fp32_context(logits.device.type):
            return self._loss(logits.float(), targets.long())

    def _loss(
        self, logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def extra_repr(self) -> str:
        parts = [f"num_classes={self.num_classes}"]
        if self.drw_epoch is not None:
            parts.append(f"drw_epoch={self.drw_epoch}, drw_beta={self.drw_beta}")
        return ", ".join(parts)


def _as_f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else torch.as_tensor(t, dtype=torch.float32).clone()


def resolve_beta(
    beta: Optional[float],
    drw_beta: Optional[float],
    default: float,
    drw_epoch: Optional[int],
    name: str,
) -> float:
    """For losses with their own ``beta`` (cb, gcl): ``drw_beta`` may repeat it but not contradict it."""
    if (
        beta is not None
        and drw_beta is not None
        and drw_epoch is not None
        and float(beta) != float(drw_beta)
    ):
        raise ConfigError(
            f"loss {name!r} uses 'loss.beta' for its class weights (also under DRW); "
            f"'loss.drw_beta'={drw_beta!r} contradicts 'loss.beta'={beta!r}. Set only 'loss.beta'."
        )
    chosen = beta if beta is not None else (drw_beta if drw_beta is not None else default)
    return check_beta(chosen, "loss.beta")


__all__ = ["LOSSES", "LongtailLoss", "class_balanced_weights", "as_class_counts"]
