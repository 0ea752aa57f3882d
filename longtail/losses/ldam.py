"""LDAM: label-distribution-aware margin loss (Cao, Wei, Gaidon, Arechiga, Ma; NeurIPS 2019).
Formula: m_c = C' / n_c^{1/4} with max_c m_c = max_margin;  L = CE(s * (cos - m_y * onehot(y)), y)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from longtail.losses.base import LOSSES, Beta, Epoch, LongtailLoss, Positive, check_number


@LOSSES.register("ldam")
class LDAMLoss(LongtailLoss):
    """LDAM on cosine logits [B, C] float in [-1, 1] (normalised head) and targets [B] int64 -> scalar.

    Margins ``margins`` (buffer, float32 [C]): ``n_c^{-1/4}`` rescaled so the rarest class gets
    ``max_margin``. The margin is subtracted from the target cosine before scaling by ``scale``.
    Reduction: PyTorch weighted-mean convention ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` when class
    weights are active (DRW), plain mean otherwise — as the LDAM-DRW reference.
    LDAM-DRW = ``create("ldam", class_counts=n, drw_epoch=160)``.
    """

    registry_name = "ldam"
    requires_normalized_head = True
    needs_class_counts = True

    margins: torch.Tensor

    def __init__(
        self,
        class_counts: Optional[Sequence[float]] = None,
        max_margin: Positive = 0.5,
        scale: Positive = 30.0,
        drw_epoch: Optional[Epoch] = None,
        drw_beta: Beta = 0.9999,
    ):
        super().__init__(class_counts, drw_epoch=drw_epoch, drw_beta=drw_beta)
        self.max_margin = check_number(max_margin, "loss.max_margin", minimum=0.0)
        self.scale = check_number(scale, "loss.scale", minimum=0.0, strict=True)
        assert self.counts is not None  # needs_class_counts: the base refused None
        m = self.counts**-0.25
        m = m * (self.max_margin / m.max())
        self.register_buffer("margins", torch.tensor(m, dtype=torch.float32), persistent=False)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
        adjusted = logits - self.margins[targets].unsqueeze(1) * onehot
        return F.cross_entropy(self.scale * adjusted, targets, weight=self.weight)

    def extra_repr(self) -> str:
        return f"max_margin={self.max_margin}, scale={self.scale}, " + super().extra_repr()
