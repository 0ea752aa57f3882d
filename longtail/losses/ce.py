"""Cross-entropy, the instance-balanced baseline (docs/methods/losses.md).
Formula: L = -log softmax(z)_y, batch mean; with class weights (DRW) sum_i w_{y_i} l_i / sum_i w_{y_i}."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from longtail.losses.base import LOSSES, LongtailLoss


@LOSSES.register("ce")
class CrossEntropyLoss(LongtailLoss):
    """Softmax cross-entropy on logits [B, C] float and targets [B] int64 -> scalar.

    Reduction: plain batch mean without class weights; with class weights (only under DRW) the
    PyTorch weighted-mean convention ``sum_i w_{y_i} l_i / sum_i w_{y_i}``, as the LDAM-DRW
    reference does. ``class_counts`` is needed only when ``drw_epoch`` is set.
    """

    registry_name = "ce"

    def __init__(
        self,
        class_counts: Optional[Sequence[float]] = None,
        drw_epoch: Optional[int] = None,
        drw_beta: float = 0.9999,
    ):
        super().__init__(class_counts, drw_epoch=drw_epoch, drw_beta=drw_beta)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, weight=self.weight)
