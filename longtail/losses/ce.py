"""Cross-entropy, the instance-balanced baseline (docs/methods/losses.md).
Formula: L = -log softmax(z)_y, batch mean; with class weights (DRW) sum_i w_{y_i} l_i / sum_i w_{y_i}."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from longtail.core.errors import ConfigError
from longtail.losses.base import LOSSES, Beta, Epoch, LongtailLoss


@LOSSES.register("ce")
class CrossEntropyLoss(LongtailLoss):
    """Softmax cross-entropy on logits [B, C] float and targets [B] int64 -> scalar.

    Reduction: plain batch mean without class weights; with class weights (DRW, ``cb``)
    ``reduction: weighted_mean`` (default) is PyTorch's ``sum_i w_{y_i} l_i / sum_i w_{y_i}``, as
    the LDAM-DRW reference, and ``reduction: batch_mean`` is ``sum_i w_{y_i} l_i / B``, as Cui et
    al.'s class-balanced TF code. ``class_counts`` is needed only for weights.
    """

    registry_name = "ce"

    def __init__(
        self,
        class_counts: Optional[Sequence[float]] = None,
        drw_epoch: Optional[Epoch] = None,
        drw_beta: Beta = 0.9999,
        reduction: str = "weighted_mean",
    ):
        super().__init__(class_counts, drw_epoch=drw_epoch, drw_beta=drw_beta)
        if reduction not in ("weighted_mean", "batch_mean"):
            raise ConfigError(
                f"'loss.reduction' must be weighted_mean (PyTorch: divide by the sum of the "
                f"weights) or batch_mean (divide by the batch size), got {reduction!r}."
            )
        self.reduction = reduction

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.reduction == "weighted_mean":
            return F.cross_entropy(logits, targets, weight=self.weight)
        per_sample = F.cross_entropy(logits, targets, reduction="none")
        return (per_sample * self.weight.to(per_sample.dtype)[targets]).sum() / len(targets)
