"""Loss family of longtail: CE, focal, class-balanced, LDAM, logit adjustment / Balanced Softmax, GCL (+ DRW for all).
Formula per family in each module; shared: class-balanced weights w_c = (1 - beta)/(1 - beta^{n_c}), sum_c w_c = C."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch.nn as nn

from longtail.core.registry import import_submodules
from longtail.losses.base import LOSSES, LongtailLoss, class_balanced_weights
from longtail.losses.ce import CrossEntropyLoss
from longtail.losses.class_balanced import ClassBalancedLoss
from longtail.losses.focal import FocalLoss
from longtail.losses.gcl import GCLLoss
from longtail.losses.ldam import LDAMLoss
from longtail.losses.logit_adjusted import (
    BalancedSoftmaxLoss,
    LogitAdjustedLoss,
    posthoc_adjust,
    select_tau,
)

import_submodules(__name__, __path__)  # every module registers its losses: a new loss is a file


def create(name: str, class_counts: Optional[Sequence[float]] = None, **params: Any) -> nn.Module:
    """Build the loss registered as ``name`` with ``params``; ``class_counts`` goes to every builder.

    Every loss has ``set_epoch(e)`` (0-based), ``requires_normalized_head`` and the DRW options
    ``drw_epoch`` / ``drw_beta``. An unknown option raises ConfigError naming ``loss.<option>``;
    a loss that needs ``class_counts`` raises ConfigError when it is missing.
    """
    return LOSSES.build(name, class_counts=class_counts, key_prefix="loss.", **params)


__all__ = [
    "LOSSES",
    "create",
    "class_balanced_weights",
    "posthoc_adjust",
    "select_tau",
    "LongtailLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "ClassBalancedLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "BalancedSoftmaxLoss",
    "GCLLoss",
]
