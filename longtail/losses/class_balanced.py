"""Class-balanced loss by effective number of samples (Cui et al., CVPR 2019) around any loss.
Formula: w_c = (1 - beta) / (1 - beta^{n_c}) normalised to sum C; L = base(z, y; w) with the base
loss's own weighting convention (``base: ce`` -> CE(z, y; w), ``base: focal`` -> Focal(z, y; w, gamma))."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from longtail.core.errors import ConfigError
from longtail.losses.base import LOSSES, resolve_beta


@LOSSES.register("cb")
class ClassBalancedLoss(nn.Module):
    """Class-balanced weights on a registered base loss (``loss.base``, default ``ce``); the keys
    of ``loss`` that ``cb`` does not know are the base loss's options (e.g. ``gamma``).

    Logits [B, C] float and targets [B] int64 -> scalar. The base applies the weights as it does
    for DRW: ``ce`` with the weighted-mean convention ``sum_i w_{y_i} l_i / sum_i w_{y_i}``
    (``F.cross_entropy(weight=w)``, as LDAM-DRW's ``Reweight`` rule); ``focal`` per-sample weighted
    CE modulated by ``(1 - exp(-ce_i))^gamma``, plain mean.

    The weights are active from epoch 0. With ``drw_epoch`` set they are deferred instead: no
    weights before ``drw_epoch``, the same ``beta`` weights from then on (``drw_beta`` may be given
    but must then equal ``beta``).
    """

    registry_name = "cb"
    needs_class_counts = True
    requires_normalized_head = False  # per instance: the base loss's

    def __init__(
        self,
        class_counts: Optional[Sequence[float]] = None,
        beta: float = 0.9999,
        base: str = "ce",
        drw_epoch: Optional[int] = None,
        drw_beta: Optional[float] = None,
        **base_options: Any,
    ):
        super().__init__()
        if base == self.registry_name:
            raise ConfigError(
                "'loss.base' cannot be 'cb' itself: name the loss to re-weight (e.g. ce or focal)."
            )
        if class_counts is None:
            raise ConfigError(
                "'loss.class_counts' is missing: the class-balanced weights are "
                "computed from the number of training images per class."
            )
        if base not in LOSSES:
            raise ConfigError(
                f"'loss.base' = {base!r} is not a registered loss; use one of "
                f"{', '.join(n for n in LOSSES.names() if n != self.registry_name)}."
            )
        beta = resolve_beta(beta, drw_beta, 0.9999, drw_epoch, "cb")
        # the base's own DRW switch carries the weights: from epoch 0, or from drw_epoch
        self.base_loss = LOSSES.build(
            base,
            class_counts=class_counts,
            key_prefix="loss.",
            drw_epoch=0 if drw_epoch is None else drw_epoch,
            drw_beta=beta,
            **base_options,
        )
        self.beta, self.base = beta, base
        self.drw_epoch = drw_epoch  # the run's re-weighting epoch (None: from the start)
        self.requires_normalized_head = getattr(self.base_loss, "requires_normalized_head", False)

    def __getattr__(self, name: str) -> Any:
        """The base loss's settings read through (``loss.gamma`` of a focal base)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_loss"), name)

    def set_epoch(self, epoch: int) -> None:
        self.base_loss.set_epoch(epoch)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.base_loss(logits, targets)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, base={self.base!r}, drw_epoch={self.drw_epoch}"
