"""Optimisers (registered with their options), learning-rate schedules, the step wrapper and the
bi-level meta step."""

from longtail.core.registry import import_submodules
from longtail.optim.base import (
    OPTIMIZERS,
    OptimInfo,
    Options,
    build_optimizer,
    optim_info,
    param_groups,
    parse_options,
    register_optimizer,
    set_lr,
)
from longtail.optim.schedules import SCHEDULES, Schedule, ScheduleInfo, build_schedule
from longtail.optim.wrapper import AMP_DTYPES, OptimWrapper

import_submodules(__name__, __path__)  # every module registers its optimisers: a new one is a file

__all__ = [
    "OPTIMIZERS",
    "OptimInfo",
    "Options",
    "build_optimizer",
    "optim_info",
    "param_groups",
    "parse_options",
    "register_optimizer",
    "set_lr",
    "SCHEDULES",
    "Schedule",
    "ScheduleInfo",
    "build_schedule",
    "OptimWrapper",
    "AMP_DTYPES",
]
