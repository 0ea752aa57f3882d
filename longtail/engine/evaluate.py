"""Evaluation: top-1, many/medium/few-shot and per-class accuracy, ECE (15 bins), confusion matrix.

Every metric is computed from sums (confusion counts, per-bin confidence/accuracy sums), so
DDP ranks evaluate their shards and one all-reduce gives exactly the single-process numbers.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from longtail.core.distributed import DistInfo
from longtail.core.metrics import MetricAccumulator
from longtail.data.loader import eval_batches


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_counts: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    device: torch.device,
    batch_size: int = 512,
    info: DistInfo = DistInfo(),
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    logits_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Dict[str, Any]:
    """Evaluate ``model`` (in eval mode) on a whole image set; every rank gets the full metrics.

    images: uint8 [N, C, H, W]; labels: int64 [N]. ``logits_fn`` post-processes logits (post-hoc
    adjustment). Returns the dict of :func:`metrics_from_sums`.
    """
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(len(class_counts))
    for batch in eval_batches(
        images, labels, batch_size, mean, std, device, info.rank, info.world_size, channels_last
    ):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(batch.images).logits.float()
        if logits_fn is not None:
            logits = logits_fn(logits)
        acc.update(logits, batch.labels)
    model.train(was_training)
    return acc.reduce(info).compute(class_counts)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    device: torch.device,
    batch_size: int = 512,
) -> torch.Tensor:
    """float [N, C] logits of a whole image set on one process (for tuning on val)."""
    was_training = model.training
    model.eval()
    labels = torch.zeros(len(images), dtype=torch.long)
    out = [
        model(b.images).logits.float().cpu()
        for b in eval_batches(images, labels, batch_size, mean, std, device)
    ]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def fmt_pct(value: Optional[float]) -> str:
    return (
        "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"
    )
