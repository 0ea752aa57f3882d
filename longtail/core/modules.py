"""Small helpers on ``nn.Module`` trees shared by several layers."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn


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
