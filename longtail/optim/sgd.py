"""SGD with momentum (Nesterov optional); weight decay on every trainable parameter, as the
CIFAR-LT references (LDAM-DRW) apply it."""

from __future__ import annotations

import torch

from longtail.optim.base import OptimInfo, Options, register_optimizer


class SGDOptions(Options):
    momentum: float = 0.9
    nesterov: bool = False


def build_sgd(params, cfg, options: SGDOptions, facts) -> torch.optim.Optimizer:
    """SGD with momentum (Nesterov optional), weight decay on every trainable parameter."""
    return torch.optim.SGD(
        list(params),
        lr=cfg.lr,
        momentum=options.momentum,
        nesterov=options.nesterov,
        weight_decay=cfg.weight_decay,
    )


SGD_INFO = register_optimizer(OptimInfo("sgd", build_sgd, SGDOptions))
