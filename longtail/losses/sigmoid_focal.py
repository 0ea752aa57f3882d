"""Sigmoid focal loss (Lin et al., ICCV 2017) in the form of the class-balanced loss code
(Cui et al., CVPR 2019): one binary problem per class on logits z [B, C], targets y [B].
Formula: p = sigmoid(z), t = onehot(y), p_t = p if t else 1 - p,
l_ic = -(1 - p_t)^gamma log p_t;  L = sum_i w_{y_i} sum_c l_ic / B  (w = 1 without class weights)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from longtail.losses.base import LOSSES, Beta, Epoch, LongtailLoss, NonNegative, check_number


@LOSSES.register("sigmoid_focal")
class SigmoidFocalLoss(LongtailLoss):
    """Sigmoid (one-vs-all) focal loss on logits [B, C] float and targets [B] int64 -> scalar.

    As Cui et al.'s ``focal_loss``: the binary cross-entropy of every class, modulated by
    ``(1 - p_t)^gamma``; a sample's class weight ``w_{y_i}`` (set by ``cb`` or DRW) multiplies all
    of its C terms; the sum is divided by the batch size (not by the sum of weights). ``gamma = 0``
    is the sigmoid cross-entropy. Class-balanced sigmoid focal loss: ``loss.name: cb`` with
    ``loss.base: sigmoid_focal``.
    """

    registry_name = "sigmoid_focal"

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
        onehot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        if self.gamma:
            # log(1 - p_t) = logsigmoid(-z) for t = 1, logsigmoid(z) for t = 0
            bce = torch.exp(self.gamma * F.logsigmoid(logits * (1 - 2 * onehot))) * bce
        per_sample = bce.sum(dim=1)
        if self.weight is not None:
            per_sample = per_sample * self.weight.to(per_sample.dtype)[targets]
        return per_sample.sum() / len(targets)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, " + super().extra_repr()
