"""Learning-rate schedules as pure functions of training progress (stateless, so resume is exact).

step: linear warm-up lr*e/W for epochs e<=W (1-based, per epoch as in LDAM-DRW), then lr*gamma^k
after the k-th milestone; cosine: warm-up then min_lr + (lr-min_lr)(1+cos(pi t))/2, per step;
mlrsnet: a meta-learned lr per step from the training loss (stateful, ``longtail/optim/mlrsnet.py``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence

from longtail.core.registry import Registry

SCHEDULES = Registry("schedule")


class Schedule:
    """factor(epoch, step, steps_per_epoch) -> multiplier of the base lr. ``epoch`` is 0-based.

    The other methods are no-ops here; a schedule with state (``mlrsnet``: a learned schedule
    driven by the training loss) overrides them and the trainer calls them for every schedule:
    ``attach(run)`` once after the run is built, ``on_epoch_start`` / ``on_epoch_end`` (extra
    history entries) around each epoch, ``state_dict`` / ``load_state_dict`` with the checkpoint,
    ``extra_metrics`` for metrics.json and ``save_artifacts(run_dir)`` on rank 0 at the end.
    """

    def factor(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        raise NotImplementedError

    def attach(self, run) -> None:
        pass

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def on_epoch_end(self, epoch: int) -> Dict[str, Any]:
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def extra_metrics(self) -> Dict[str, Any]:
        return {}

    def save_artifacts(self, run_dir) -> None:
        pass


@SCHEDULES.register("step")
class StepSchedule(Schedule):
    """The LDAM-DRW CIFAR recipe: e = epoch + 1; lr*e/W while e <= W; lr*gamma^(#milestones < e).

    Defaults give lr x1 up to epoch 160, x0.01 for 161-180, x1e-4 after 180 (1-based epochs).
    """

    def __init__(self, epochs: int, warmup_epochs: float = 5, milestones: Sequence[int] = (160, 180),
                 gamma: float = 0.01):
        self.warmup = warmup_epochs
        self.milestones = sorted(milestones)
        self.gamma = gamma

    def factor(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        e = epoch + 1
        if self.warmup and e <= self.warmup:
            return e / self.warmup
        return self.gamma ** sum(e > m for m in self.milestones)


@SCHEDULES.register("cosine")
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


@SCHEDULES.register("constant")
class ConstantSchedule(Schedule):
    def __init__(self, epochs: int, warmup_epochs: float = 0):
        self.warmup = warmup_epochs

    def factor(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        e = epoch + 1
        return e / self.warmup if self.warmup and e <= self.warmup else 1.0


def build_schedule(cfg, epochs: int) -> Schedule:
    """Schedule from an ``OptimConfig``."""
    if cfg.schedule == "step":
        return StepSchedule(epochs, cfg.warmup_epochs, cfg.milestones, cfg.gamma)
    if cfg.schedule == "cosine":
        return CosineSchedule(epochs, cfg.warmup_epochs, cfg.min_lr / cfg.lr if cfg.lr else 0.0)
    if cfg.schedule == "constant":
        return ConstantSchedule(epochs, cfg.warmup_epochs)
    if cfg.schedule == "mlrsnet":
        from longtail.optim.mlrsnet import MLRSNetSchedule

        return MLRSNetSchedule(epochs, cfg.mlrsnet, weight_decay=cfg.weight_decay, base_lr=cfg.lr)
    return SCHEDULES.build(cfg.schedule, epochs)
