"""ALA: adaptive logit adjustment loss (Zhao, Chen, Tan, Huang, Zhu; AAAI 2022, arXiv 2104.06094).
Formula: DF_i = (1 - cos_{i,y_i}) / 2 (detached), QF_c = ln 2 / ln(n_c / n_min + 1);
L = CE(s * (cos - DF_i QF_{y_i} onehot(y_i)), y). Discussion: docs/methods/experts.md."""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from longtail.core.errors import ConfigError
from longtail.losses.base import LOSSES, Beta, Epoch, LongtailLoss, Positive, check_number


def quantity_factors(counts: np.ndarray, quantity: str = "log") -> np.ndarray:
    """QF_c (float64 [C]): ``log``: ln 2 / ln(n_c / n_min + 1) (1 for the rarest class);
    ``inverse_log``: 1 / ln(n_c / n_min + 1) (the same up to the factor ln 2)."""
    base = 1.0 / np.log(counts / counts.min() + 1.0)
    return base * (math.log(2.0) if quantity == "log" else 1.0)


@LOSSES.register("ala")
class ALALoss(LongtailLoss):
    """ALA on cosine logits [B, C] float in [-1, 1] (normalised head) and targets [B] int64 -> scalar.

    Only the target logit is adjusted: ``z_{i,y} = s (cos_{i,y} - DF_i QF_y)``, the others are
    ``s cos_{i,c}``. ``DF_i`` is detached (a per-sample weight of the margin, no gradient path of
    its own). ``qf`` (buffer, float32 [C]) holds QF. Reduction: as LDAM, the plain mean, or the
    weighted mean ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` while DRW weights are active.
    """

    registry_name = "ala"
    requires_normalized_head = True
    needs_class_counts = True

    qf: torch.Tensor

    def __init__(
        self,
        class_counts: Optional[Sequence[float]] = None,
        scale: Positive = 30.0,
        quantity: Literal["log", "inverse_log"] = "log",
        drw_epoch: Optional[Epoch] = None,
        drw_beta: Beta = 0.9999,
    ):
        super().__init__(class_counts, drw_epoch=drw_epoch, drw_beta=drw_beta)
        self.scale = check_number(scale, "loss.scale", minimum=0.0, strict=True)
        if quantity not in ("log", "inverse_log"):
            raise ConfigError(
                f"'loss.quantity' must be log (ln 2 / ln(n_c/n_min + 1)) or inverse_log "
                f"(1 / ln(n_c/n_min + 1)), got {quantity!r}."
            )
        self.quantity = quantity
        assert self.counts is not None  # needs_class_counts: the base refused None
        qf = quantity_factors(self.counts, quantity)
        self.register_buffer("qf", torch.tensor(qf, dtype=torch.float32), persistent=False)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cos_y = logits.gather(1, targets[:, None]).squeeze(1)
        difficulty = ((1.0 - cos_y) / 2.0).detach()
        shift = difficulty * self.qf[targets]
        onehot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
        adjusted = logits - shift[:, None] * onehot
        return F.cross_entropy(self.scale * adjusted, targets, weight=self.weight)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, quantity={self.quantity}, " + super().extra_repr()
