"""Learning-rate schedules: a multiplier of the base lr as a pure function of (epoch, step), so
resume is exact. A schedule states its options (the extra keys of the ``schedule`` section).

step: linear warm-up lr*e/W for epochs e<=W (1-based, per epoch as in LDAM-DRW), then lr*gamma^k
after the k-th milestone; cosine: per-step warm-up then min_lr + (lr-min_lr)(1+cos(pi t))/2;
constant: warm-up then lr. A learned schedule (MLR-SNet) is a training hook, not a schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Type, cast

from pydantic import Field

from longtail.core.registry import Registry
from longtail.optim.base import Options, parse_options


class Schedule:
    """factor(epoch, step, steps_per_epoch) -> multiplier of the base lr. ``epoch`` is 0-based."""

    def factor(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class ScheduleInfo:
    """``build(epochs, warmup_epochs, options, base_lr)`` -> Schedule."""

    name: str
    build: Callable[..., Schedule]
    options_model: Type[Options]

    def check_options(self, options: Dict[str, Any], where: str) -> None:
        parse_options(self.options_model, options, where)


SCHEDULES = Registry("schedule")


class StepSchedule(Schedule):
    """The LDAM-DRW CIFAR recipe: e = epoch + 1; lr*e/W while e <= W; lr*gamma^(#milestones < e).

    Defaults give lr x1 up to epoch 160, x0.01 for 161-180, x1e-4 after 180 (1-based epochs).
    """

    def __init__(
        self, epochs: int, warmup_epochs: float = 5, milestones=(160, 180), gamma: float = 0.01
    ):
        self.warmup = warmup_epochs
        self.milestones = sorted(milestones)
        self.gamma = gamma

    def factor(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        e = epoch + 1
        if self.warmup and e <= self.warmup:
            return e / self.warmup
        return self.gamma ** sum(e > m for m in self.milestones)


class CosineSchedule(Schedule):
    """Per-step linear warm-up over ``warmup_epochs`` then cosine decay to ``min_ratio``."""

    def __init__(self, epochs: int, warmup_epochs: float = 0, min_ratio: float = 0.0):
        self.epochs, self.warmup, self.min_ratio = epochs, warmup_epochs, min_ratio

    def factor(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        t = epoch + step / max(steps_per_epoch, 1)
        if self.warmup and t < self.warmup:
            return (t + 1.0 / max(steps_per_epoch, 1)) / self.warmup
        span = max(self.epochs - self.warmup, 1e-12)
        progress = min(max((t - self.warmup) / span, 0.0), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ConstantSchedule(Schedule):
    def __init__(self, epochs: int, warmup_epochs: float = 0):
        self.warmup = warmup_epochs

    def factor(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        e = epoch + 1
        return e / self.warmup if self.warmup and e <= self.warmup else 1.0


class StepOptions(Options):
    milestones: List[int] = Field(default_factory=lambda: [160, 180])
    gamma: float = Field(0.01, gt=0.0)  # factor at each milestone (0.01, then 1e-4)


class CosineOptions(Options):
    min_lr: float = Field(0.0, ge=0.0)  # the floor (absolute lr)


class NoOptions(Options):
    pass


def _step(epochs, warmup, o: StepOptions, base_lr) -> Schedule:
    """Per-epoch warm-up, then lr x gamma at each milestone (the LDAM-DRW CIFAR recipe)."""
    return StepSchedule(epochs, warmup, o.milestones, o.gamma)


def _cosine(epochs, warmup, o: CosineOptions, base_lr) -> Schedule:
    """Per-step warm-up, then a cosine decay to min_lr."""
    return CosineSchedule(epochs, warmup, o.min_lr / base_lr if base_lr else 0.0)


def _constant(epochs, warmup, o: NoOptions, base_lr) -> Schedule:
    """Per-epoch warm-up, then the base lr."""
    return ConstantSchedule(epochs, warmup)


for _info in (
    ScheduleInfo("step", _step, StepOptions),
    ScheduleInfo("cosine", _cosine, CosineOptions),
    ScheduleInfo("constant", _constant, NoOptions),
):
    # Registry types entries as callables (core/registry.py); SCHEDULES holds ScheduleInfo records
    SCHEDULES.register(_info.name)(_info)  # type: ignore[arg-type]


def build_schedule(cfg, epochs: int, base_lr: float) -> Schedule:
    """The schedule of a ``schedule`` section for a run of ``epochs`` epochs."""
    info = cast(ScheduleInfo, SCHEDULES.get(cfg.name))  # only ScheduleInfo records are registered
    options = parse_options(info.options_model, cfg.params(), "schedule")
    return info.build(epochs, cfg.warmup_epochs, options, base_lr)
