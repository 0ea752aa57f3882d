"""Evaluation: top-1, many/medium/few-shot and per-class accuracy, ECE (15 bins), confusion matrix.

Every metric is computed from sums (confusion counts, per-bin confidence/accuracy sums), so
DDP ranks evaluate their shards and one all-reduce gives exactly the single-process numbers.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from longtail.data.loader import eval_batches
from longtail.data.longtail import shot_groups
from longtail.engine.distributed import DistInfo, all_reduce_sum


class MetricAccumulator:
    """Accumulates a confusion matrix and calibration bins over batches.

    Args:
        num_classes: C.
        num_bins: equal-width confidence bins for ECE (15, as in Guo et al. 2017).
    """

    def __init__(self, num_classes: int, num_bins: int = 15):
        self.num_classes, self.num_bins = num_classes, num_bins
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        self.bins = torch.zeros(3, num_bins, dtype=torch.float64)  # count, sum conf, sum correct
        self.nll_sum = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """logits [B, C] (any float), labels [B] int64."""
        logits, labels = logits.detach().float().cpu(), labels.detach().cpu()
        prob = logits.softmax(dim=1)
        conf, pred = prob.max(dim=1)
        c = self.num_classes
        self.confusion += torch.bincount(labels * c + pred, minlength=c * c).view(c, c).double()
        bin_idx = torch.clamp((conf * self.num_bins).ceil().long() - 1, 0, self.num_bins - 1)
        correct = (pred == labels).double()
        self.bins[0] += torch.bincount(bin_idx, minlength=self.num_bins).double()
        self.bins[1] += torch.bincount(bin_idx, weights=conf.double(), minlength=self.num_bins)
        self.bins[2] += torch.bincount(bin_idx, weights=correct, minlength=self.num_bins)
        self.nll_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").double()

    def reduce(self, info: DistInfo) -> "MetricAccumulator":
        for t in (self.confusion, self.bins, self.nll_sum):
            all_reduce_sum(t, info)
        return self

    def compute(self, class_counts: Sequence[int]) -> Dict[str, Any]:
        return metrics_from_sums(self.confusion, self.bins, float(self.nll_sum), class_counts)


def _pct(num: float, den: float) -> Optional[float]:
    return None if den == 0 else 100.0 * num / den


def metrics_from_sums(confusion: torch.Tensor, bins: torch.Tensor, nll_sum: float,
                      class_counts: Sequence[int]) -> Dict[str, Any]:
    """All reported metrics from a [C, C] confusion matrix (rows: true class) and ECE bins.

    Group accuracies (many > 100, medium 20-100, few < 20 training images) are the mean of the
    per-class accuracies of the group's classes that have test images; None for an empty group.
    """
    total = float(confusion.sum())
    per_class_n = confusion.sum(dim=1)
    per_class = [_pct(float(confusion[c, c]), float(per_class_n[c])) for c in range(len(per_class_n))]
    groups = shot_groups(class_counts)
    out: Dict[str, Any] = {"top1": _pct(float(confusion.trace()), total)}
    for name in ("many", "medium", "few"):
        accs = [per_class[c] for c in groups[name] if per_class[c] is not None]
        out[name] = sum(accs) / len(accs) if accs else None
    present = [a for a in per_class if a is not None]
    out["mean_class_acc"] = sum(present) / len(present) if present else None
    out["per_class"] = per_class
    count, conf_sum, correct_sum = bins
    out["ece"] = 100.0 * float((conf_sum - correct_sum).abs().sum()) / total if total else None
    out["nll"] = nll_sum / total if total else None
    out["num_samples"] = int(total)
    out["confusion"] = confusion.long().tolist()
    out["groups"] = groups
    return out


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             class_counts: Sequence[int], mean: Sequence[float], std: Sequence[float], *,
             device: torch.device, batch_size: int = 512, info: DistInfo = DistInfo(),
             amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
             logits_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, Any]:
    """Evaluate ``model`` (in eval mode) on a whole image set; every rank gets the full metrics.

    images: uint8 [N, C, H, W]; labels: int64 [N]. ``logits_fn`` post-processes logits (post-hoc
    adjustment). Returns the dict of :func:`metrics_from_sums`.
    """
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(len(class_counts))
    for batch in eval_batches(images, labels, batch_size, mean, std, device, info.rank,
                              info.world_size, channels_last):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(batch.images).logits.float()
        if logits_fn is not None:
            logits = logits_fn(logits)
        acc.update(logits, batch.labels)
    model.train(was_training)
    return acc.reduce(info).compute(class_counts)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, mean: Sequence[float],
                   std: Sequence[float], *, device: torch.device,
                   batch_size: int = 512) -> torch.Tensor:
    """float [N, C] logits of a whole image set on one process (for tuning on val)."""
    was_training = model.training
    model.eval()
    labels = torch.zeros(len(images), dtype=torch.long)
    out = [model(b.images).logits.float().cpu()
           for b in eval_batches(images, labels, batch_size, mean, std, device)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def fmt_pct(value: Optional[float]) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"
