"""Optimisers and learning-rate schedules."""

from __future__ import annotations

import inspect
from typing import Iterable

import torch

from longtail.optim.schedules import SCHEDULES, Schedule, build_schedule
from longtail.core.registry import Registry

OPTIMIZERS = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def sgd(params: Iterable[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    """SGD with momentum; weight decay on every trainable parameter (as the CIFAR-LT references)."""
    return torch.optim.SGD(list(params), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def build_optimizer(cfg, params: Iterable[torch.nn.Parameter], **facts) -> torch.optim.Optimizer:
    """Optimizer named by ``optim.name``; every param group remembers its base lr as ``base_lr``.

    ``facts``: run facts a builder may ask for by name (``seed``, ``drw_epoch`` for rsam); each is
    passed only to builders whose signature has it.
    """
    builder = OPTIMIZERS.get(cfg.name)
    accepts = inspect.signature(builder).parameters
    optimizer = builder(params, cfg, **{k: v for k, v in facts.items() if k in accepts})
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr to base_lr * factor; returns the first group's lr."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]


from longtail.optim import sam as _sam  # noqa: E402,F401  (registers sam, rsam)

__all__ = ["OPTIMIZERS", "SCHEDULES", "Schedule", "build_optimizer", "build_schedule", "set_lr"]
