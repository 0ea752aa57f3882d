"""Equilibrium loss, EBL (Feng, Zhong, Huang, "Exploring Classification Equilibrium in Long-Tailed
Object Detection", ICCV 2021; LOCE), adapted to image classification.

Running mean classification score per class (detached softmax, one update per training forward,
for every class c in the batch; alpha = ``momentum``, init 0.01)::

    s_c <- alpha^{n_c} s_c + (1 - alpha^{n_c}) mean_{i: y_i = c} softmax(z_i)_c
    L = CE(z + log s, y)        (P_y = s_y e^{z_y} / sum_j s_j e^{z_j}; inference: raw z)

Shapes: logits [B, C], targets [B] -> scalar; ``class_scores`` float32 [C] (a persistent buffer).
Order, DDP and the classification reading: docs/methods/equilibrium.md.
"""

from __future__ import annotations

from typing import Annotated, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field

from longtail.core.distributed import DistInfo, all_reduce_sum
from longtail.core.errors import ConfigError
from longtail.losses.base import LOSSES, Beta, Epoch, LongtailLoss, check_number

Momentum = Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)]
Score = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]

#: log s is taken of max(s, SCORE_FLOOR): a softmax that underflows to 0 cannot make a logit -inf
SCORE_FLOOR = 1e-12


def _process_group() -> DistInfo:
    """The torchrun world this process belongs to (one process: rank 0 of 1)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())
    return DistInfo()


@LOSSES.register("ebl")
class EquilibriumLoss(LongtailLoss):
    """EBL on logits [B, C] float and targets [B] int64 -> scalar.

    ``class_scores`` (float32 [C], persistent: it is saved with the method's loss state and
    restored on resume) is updated *before* the loss of the same forward is computed, as the
    reference does, and only when ``self.training`` and gradients are enabled. Under DDP the
    per-class sums and counts are all-reduced (``sync_scores``) so every rank holds the same s.
    Reduction: plain mean, or the weighted-mean convention when DRW weights are active.
    """

    registry_name = "ebl"
    needs_class_counts = True

    class_scores: torch.Tensor

    def __init__(
        self,
        class_counts: Optional[Sequence[float]] = None,
        momentum: Momentum = 0.9,
        init_score: Score = 0.01,
        sync_scores: bool = True,
        drw_epoch: Optional[Epoch] = None,
        drw_beta: Beta = 0.9999,
    ):
        super().__init__(class_counts, drw_epoch=drw_epoch, drw_beta=drw_beta)
        self.momentum = check_number(momentum, "loss.momentum", minimum=0.0)
        if self.momentum >= 1.0:
            raise ConfigError(
                f"'loss.momentum' must be in [0, 1) (the reference's alpha is 0.9), got {momentum!r}."
            )
        self.init_score = check_number(init_score, "loss.init_score", minimum=0.0, strict=True)
        if self.init_score > 1.0:
            raise ConfigError(
                f"'loss.init_score' is a softmax score: it must be in (0, 1], got {init_score!r}."
            )
        self.sync_scores = bool(sync_scores)
        self._score_weights: Optional[torch.Tensor] = None
        assert self.num_classes is not None  # needs_class_counts: the base refused None
        self.register_buffer(
            "class_scores",
            torch.full((self.num_classes,), self.init_score, dtype=torch.float32),
            persistent=True,
        )

    # -- the running scores --------------------------------------------------------------------
    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        score_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """logits [B, C], targets [B] -> scalar; ``score_weights`` [B] (default: ones) are the
        instances each sample counts as in the update of s (MFS: 1/k for each of the k memory
        features of a class drawn in a step, which together count as one, as the reference)."""
        self._score_weights = score_weights
        try:
            return super().forward(logits, targets)
        finally:
            self._score_weights = None

    @torch.no_grad()
    def update_scores(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        score_weights: Optional[torch.Tensor] = None,
    ) -> None:
        """One momentum update of ``class_scores`` from a batch: logits [B, C], targets [B],
        ``score_weights`` [B] (default ones): n_c = sum of the weights of class c, p_bar_c their
        weighted mean of softmax(z)_c."""
        num_classes = self.class_scores.shape[0]
        probs = logits.detach().float().softmax(dim=1)
        own = probs.gather(1, targets.view(-1, 1)).squeeze(1).double()  # softmax(z_i)_{y_i}
        w = (
            torch.ones_like(own)
            if score_weights is None
            else score_weights.detach().to(own.device, torch.float64).reshape(-1)
        )
        if w.shape != own.shape:
            raise ValueError(f"score_weights must have shape [{own.numel()}], got {list(w.shape)}")
        stats = torch.zeros(2, num_classes, dtype=torch.float64, device=logits.device)
        stats[0].index_add_(0, targets, w * own)
        stats[1].index_add_(0, targets, w)
        info = _process_group()
        if self.sync_scores and info.enabled:
            all_reduce_sum(stats, info)
        sums, counts = stats[0], stats[1]
        keep = torch.pow(self.momentum, counts)  # alpha^{n_c}: 1 for a class not in the batch
        mean = sums / torch.where(counts > 0, counts, torch.ones_like(counts))
        s = self.class_scores.double()
        self.class_scores.copy_((keep * s + (1.0 - keep) * mean).to(self.class_scores.dtype))

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.update_scores(logits, targets, self._score_weights)
        log_s = self.class_scores.clamp_min(SCORE_FLOOR).log().to(logits.dtype)
        return F.cross_entropy(logits + log_s, targets, weight=self.weight)

    def extra_repr(self) -> str:
        return (
            f"momentum={self.momentum}, init_score={self.init_score}, "
            f"sync_scores={self.sync_scores}, " + super().extra_repr()
        )


__all__ = ["EquilibriumLoss", "SCORE_FLOOR"]
