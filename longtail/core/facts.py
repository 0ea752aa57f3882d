"""Run facts: what every component builder may read about the run it is built for.

A component takes what it needs from one :class:`RunFacts` (a sampler its batch size, a
progressive sampler the number of epochs, RSAM the seed and the loss's re-weighting epoch), so
nothing that builds components has to know which component wants which fact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass(frozen=True)
class RunFacts:
    seed: int = 0
    epochs: int = 1  # train.epochs
    batch_size: int = 128  # global batch
    class_counts: List[int] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    loss: Optional[Any] = None  # the built loss module (e.g. its drw_epoch), once known

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)
