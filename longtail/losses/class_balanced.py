"""Class-balanced loss by effective number of samples (Cui et al., CVPR 2019), softmax CE or focal base.
Formula: w_c = (1 - beta) / (1 - beta^{n_c}) normalised to sum C;  L = CE(z, y; w) or Focal(z, y; w, gamma)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from longtail.core.errors import ConfigError
from longtail.losses.base import LOSSES, LongtailLoss, check_number, class_balanced_weights, resolve_beta
from longtail.losses.focal import focal_from_ce


@LOSSES.register("cb")
class ClassBalancedLoss(LongtailLoss):
    """Class-balanced CE / focal on logits [B, C] float and targets [B] int64 -> scalar.

    * ``base="ce"``: weighted-mean convention ``sum_i w_{y_i} l_i / sum_i w_{y_i}``
      (``F.cross_entropy(weight=w)``, as LDAM-DRW's ``Reweight`` rule).
    * ``base="focal"``: LDAM-DRW focal form (see :class:`~longtail.losses.focal.FocalLoss`):
      per-sample weighted CE, modulated by ``(1 - exp(-ce_i))^gamma``, plain mean over the batch.
      ``gamma`` defaults to 1.0 and is only accepted with ``base="focal"``.

    The weights are active from epoch 0. With ``drw_epoch`` set they are deferred instead: no
    weights before ``drw_epoch``, the same ``beta`` weights from then on (``drw_beta`` may be given
    but must then equal ``beta``).
    """

    registry_name = "cb"
    needs_class_counts = True

    def __init__(self, class_counts: Optional[Sequence[float]] = None, beta: float = 0.9999, base: str = "ce",
                 gamma: Optional[float] = None, drw_epoch: Optional[int] = None,
                 drw_beta: Optional[float] = None):
        if base not in ("ce", "focal"):
            raise ConfigError(f"'loss.base' must be 'ce' or 'focal', got {base!r}.")
        if base == "ce" and gamma is not None and gamma != 0:
            raise ConfigError("'loss.gamma' only applies with 'loss.base: focal' (got base 'ce').")
        beta = resolve_beta(beta, drw_beta, 0.9999, drw_epoch, "cb")
        own = None if class_counts is None else class_balanced_weights(class_counts, beta)
        super().__init__(class_counts, drw_epoch=drw_epoch, drw_beta=beta, own_weight=own)
        self.beta = beta
        self.base = base
        self.gamma = 0.0 if base == "ce" else check_number(1.0 if gamma is None else gamma, "loss.gamma",
                                                           minimum=0.0)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.base == "ce":
            return F.cross_entropy(logits, targets, weight=self.weight)
        ce = F.cross_entropy(logits, targets, weight=self.weight, reduction="none")
        return focal_from_ce(ce, self.gamma)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, base={self.base!r}, gamma={self.gamma}, " + super().extra_repr()
