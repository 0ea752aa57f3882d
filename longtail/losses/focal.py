"""Focal loss (Lin et al., ICCV 2017) in the softmax form of the LDAM-DRW code (Cao et al., NeurIPS 2019).
Formula: ce_i = -w_{y_i} log softmax(z_i)_{y_i};  l_i = (1 - exp(-ce_i))^gamma * ce_i;  L = mean_i l_i."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from longtail.losses.base import LOSSES, Beta, Epoch, LongtailLoss, NonNegative, check_number


def focal_from_ce(ce: torch.Tensor, gamma: float) -> torch.Tensor:
    """``mean((1 - exp(-ce))**gamma * ce)`` for per-sample (possibly weighted) CE values ``ce`` [B].

    ``1 - exp(-ce)`` is computed as ``-expm1(-ce)`` and floored at the smallest normal float so the
    gradient stays finite when ``ce == 0`` and ``0 < gamma < 1`` (the value is unchanged).
    """
    if gamma == 0:
        return ce.mean()
    one_minus_p = (-torch.expm1(-ce)).clamp_min(torch.finfo(ce.dtype).tiny)
    return (one_minus_p**gamma * ce).mean()


@LOSSES.register("focal")
class FocalLoss(LongtailLoss):
    """Softmax focal loss on logits [B, C] float and targets [B] int64 -> scalar.

    Follows the LDAM-DRW reference (``FocalLoss``): the per-sample CE is computed *with* the class
    weight, ``ce_i = w_{y_i} * (-log p_{i,y_i})``; the modulating factor uses ``exp(-ce_i)`` (which
    equals p_{i,y_i} only when unweighted); the batch is reduced by a plain ``mean`` over samples,
    NOT the weighted-mean convention of ``F.cross_entropy(weight=...)``. ``gamma = 0`` is plain
    (weighted, plain-mean) CE. ``gamma = 1`` is the LDAM-DRW CIFAR default.
    """

    registry_name = "focal"

    def __init__(
        self,
        class_counts: Optional[Sequence[float]] = None,
        gamma: NonNegative = 1.0,
        drw_epoch: Optional[Epoch] = None,
        drw_beta: Beta = 0.9999,
    ):
        super().__init__(class_counts, drw_epoch=drw_epoch, drw_beta=drw_beta)
        self.gamma = check_number(gamma, "loss.gamma", minimum=0.0)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, targets, weight=self.weight, reduction="none")
        return focal_from_ce(ce, self.gamma)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, " + super().extra_repr()
