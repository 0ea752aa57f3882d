"""Small helpers on ``nn.Module`` trees shared by several layers."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from longtail.core.errors import LongtailError


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Leave BatchNorm running statistics (and num_batches_tracked) of ``model`` as they were:
    a forward in training mode inside the block normalises with batch statistics but moves no
    running statistic (e.g. SAM's second pass, a loss probe)."""
    saved = [
        (buf, buf.detach().clone())
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buf is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, old in saved:
                buf.copy_(old)


def load_fitting_state(module: nn.Module, state: dict, source: str) -> None:
    """``module.load_state_dict(state)`` after checking that the tensors fit: a LongtailError
    that names the missing, unexpected and mis-shaped keys (a few of each) and ``source``."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        k
        for k in set(own) & set(state)
        if tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} not in this model (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} of another shape (e.g. {k}: saved "
                f"{list(state[k].shape)}, this model {list(own[k].shape)})"
            )
        raise LongtailError(
            f"The tensors of {source} do not fit this run's model: "
            f"{'; '.join(parts)}. It was written for another model or config: "
            f"use the config it was trained with."
        )
    module.load_state_dict(state)
