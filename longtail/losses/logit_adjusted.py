"""Logit adjustment (Menon et al., ICLR 2021) and Balanced Softmax (Ren et al., NeurIPS 2020).
Formula: L = CE(z + tau log pi, y), pi_c = n_c / sum n; Balanced Softmax CE(z + log n, y); post-hoc z - tau log pi."""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple, Union, overload

import numpy as np
import torch
import torch.nn.functional as F

from longtail.core.errors import ConfigError
from longtail.losses.base import (
    LOSSES,
    Beta,
    Epoch,
    Finite,
    LongtailLoss,
    as_class_counts,
    check_number,
)

ArrayLike = Union[torch.Tensor, np.ndarray]


def log_prior(class_counts: Union[Sequence[float], np.ndarray]) -> np.ndarray:
    """``log(n_c / sum_j n_j)`` in float64, shape [C]."""
    counts = as_class_counts(class_counts)
    return np.log(counts) - np.log(counts.sum())


@LOSSES.register("logit_adjusted")
class LogitAdjustedLoss(LongtailLoss):
    """Logit-adjusted softmax CE on logits [B, C] float and targets [B] int64 -> scalar.

    ``CE(z + tau * log pi, y)``; ``tau = 0`` is plain CE. Buffer ``log_prior`` (float32 [C]).
    Reduction: plain mean, or the weighted-mean convention when DRW weights are active.
    Predict with the raw logits z (the adjustment is a training-time device).
    """

    registry_name = "logit_adjusted"
    needs_class_counts = True

    log_prior: torch.Tensor

    def __init__(
        self,
        class_counts: Optional[Sequence[float]] = None,
        tau: Finite = 1.0,
        drw_epoch: Optional[Epoch] = None,
        drw_beta: Beta = 0.9999,
    ):
        super().__init__(class_counts, drw_epoch=drw_epoch, drw_beta=drw_beta)
        self.tau = check_number(tau, "loss.tau")
        assert self.counts is not None  # needs_class_counts: the base refused None
        self.register_buffer(
            "log_prior", torch.tensor(log_prior(self.counts), dtype=torch.float32), persistent=False
        )

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.tau * self.log_prior, targets, weight=self.weight)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, " + super().extra_repr()


@LOSSES.register("balanced_softmax")
class BalancedSoftmaxLoss(LongtailLoss):
    """Balanced Softmax on logits [B, C] float and targets [B] int64 -> scalar: ``CE(z + log n, y)``.

    Equal to ``logit_adjusted`` with ``tau = 1``: ``log pi = log n - log N`` differs by a constant
    shift, which softmax ignores. Buffer ``log_counts`` (float32 [C]). Reduction as for CE.
    """

    registry_name = "balanced_softmax"
    needs_class_counts = True

    log_counts: torch.Tensor

    def __init__(
        self,
        class_counts: Optional[Sequence[float]] = None,
        drw_epoch: Optional[Epoch] = None,
        drw_beta: Beta = 0.9999,
    ):
        super().__init__(class_counts, drw_epoch=drw_epoch, drw_beta=drw_beta)
        assert self.counts is not None  # needs_class_counts: the base refused None
        self.register_buffer(
            "log_counts", torch.tensor(np.log(self.counts), dtype=torch.float32), persistent=False
        )

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.log_counts, targets, weight=self.weight)


@overload
def posthoc_adjust(
    logits: torch.Tensor, class_counts: Sequence[float], tau: float = ...
) -> torch.Tensor: ...
@overload
def posthoc_adjust(
    logits: np.ndarray, class_counts: Sequence[float], tau: float = ...
) -> np.ndarray: ...


def posthoc_adjust(logits: ArrayLike, class_counts: Sequence[float], tau: float = 1.0) -> ArrayLike:
    """Evaluation-time logit adjustment: ``logits - tau * log(prior)``, prior pi_c = n_c / sum n.

    ``logits`` [..., C] as a torch tensor (returned as float32 on the same device) or a numpy
    array (returned as float64). Predict with ``argmax`` of the result.
    """
    lp = log_prior(class_counts)
    tau = check_number(tau, "tau")
    if logits.shape[-1] != lp.size:
        raise ConfigError(
            f"logits have {logits.shape[-1]} classes but class_counts has {lp.size} entries."
        )
    if isinstance(logits, torch.Tensor):
        return logits.float() - tau * torch.as_tensor(lp, dtype=torch.float32, device=logits.device)
    return np.asarray(logits, dtype=np.float64) - tau * lp


def select_tau(
    logits_val: ArrayLike,
    labels_val: ArrayLike,
    class_counts: Sequence[float],
    taus: Optional[Iterable[float]] = None,
) -> Tuple[float, List[Tuple[float, float]]]:
    """Pick the post-hoc ``tau`` by top-1 accuracy on a validation split (never on the test set).

    ``logits_val`` [N, C], ``labels_val`` [N] (torch or numpy); ``taus`` defaults to
    ``np.arange(0, 2.01, 0.1)`` = 0.0, 0.1, ..., 2.0 (values are rounded to 10 decimals).
    Returns ``(best_tau, table)`` where ``table`` is ``[(tau, top1), ...]`` in increasing tau and
    ``top1`` is the accuracy as a fraction in [0, 1]. Ties go to the smaller tau.
    """
    if taus is None:
        taus = np.arange(0, 2.01, 0.1)
    grid = sorted({round(float(t), 10) for t in taus})
    if not grid:
        raise ConfigError("select_tau needs at least one tau value.")
    logits = torch.as_tensor(logits_val).detach().float().cpu()
    labels = torch.as_tensor(labels_val).detach().long().cpu()
    if logits.dim() != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(
            f"expected logits [N, C] and labels [N] with N > 0, got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    table: List[Tuple[float, float]] = []
    best_tau, best_acc = grid[0], -1.0
    for tau in grid:
        pred = posthoc_adjust(logits, class_counts, tau).argmax(dim=1)
        acc = (pred == labels).double().mean().item()
        table.append((tau, acc))
        if acc > best_acc:
            best_tau, best_acc = tau, acc
    return best_tau, table


__all__ = ["LogitAdjustedLoss", "BalancedSoftmaxLoss", "posthoc_adjust", "select_tau", "log_prior"]
