"""Metrics from sums: a confusion matrix and calibration bins accumulated over batches, from
which top-1, many / medium / few-shot accuracy (> 100, 20-100, < 20 training images), per-class
accuracy, ECE (15 equal-width bins, Guo et al. 2017) and NLL follow. Sums all-reduce exactly, so
DDP ranks evaluating their shards give the single-process numbers."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from longtail.core.distributed import DistInfo, all_reduce_sum


def shot_groups(counts: Sequence[int], many: int = 100, few: int = 20) -> dict[str, list[int]]:
    """Class ids by training count: many ``> many``, medium ``few..many`` inclusive, few ``< few``."""
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(counts):
        groups["many" if n > many else "few" if n < few else "medium"].append(c)
    return groups


class MetricAccumulator:
    """Accumulates a confusion matrix and calibration bins over batches.

    Args:
        num_classes: C.
        num_bins: equal-width confidence bins for ECE (15, as in Guo et al. 2017).
    """

    def __init__(self, num_classes: int, num_bins: int = 15):
        self.num_classes, self.num_bins = num_classes, num_bins
        # the confusion matrix only where it is small (iNaturalist's 8,142 classes: 530 MB);
        # per class: images, top-1 and top-5 hits, from which every reported number follows
        c = num_classes if num_classes <= CONFUSION_MAX_CLASSES else 0
        self.confusion = torch.zeros(c, c, dtype=torch.float64)
        self.per_class = torch.zeros(3, num_classes, dtype=torch.float64)  # n, top-1, top-5
        self.bins = torch.zeros(3, num_bins, dtype=torch.float64)  # count, sum conf, sum correct
        self.nll_sum = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """logits [B, C] (any float), labels [B] int64."""
        logits, labels = logits.detach().float().cpu(), labels.detach().cpu()
        prob = logits.softmax(dim=1)
        conf, pred = prob.max(dim=1)
        c = self.num_classes
        if self.confusion.numel():
            self.confusion += torch.bincount(labels * c + pred, minlength=c * c).view(c, c).double()
        top5 = (logits.topk(min(5, c), dim=1).indices == labels[:, None]).any(dim=1).double()
        self.per_class[0] += torch.bincount(labels, minlength=c).double()
        self.per_class[1] += torch.bincount(labels, weights=(pred == labels).double(), minlength=c)
        self.per_class[2] += torch.bincount(labels, weights=top5, minlength=c)
        bin_idx = torch.clamp((conf * self.num_bins).ceil().long() - 1, 0, self.num_bins - 1)
        correct = (pred == labels).double()
        self.bins[0] += torch.bincount(bin_idx, minlength=self.num_bins).double()
        self.bins[1] += torch.bincount(bin_idx, weights=conf.double(), minlength=self.num_bins)
        self.bins[2] += torch.bincount(bin_idx, weights=correct, minlength=self.num_bins)
        self.nll_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").double()

    def reduce(self, info: DistInfo) -> "MetricAccumulator":
        for t in (self.confusion, self.per_class, self.bins, self.nll_sum):
            all_reduce_sum(t, info)
        return self

    def compute(self, class_counts: Sequence[int]) -> Dict[str, Any]:
        return metrics_from_sums(
            self.confusion if self.confusion.numel() else None,
            self.bins,
            float(self.nll_sum),
            class_counts,
            per_class=self.per_class,
        )


CONFUSION_MAX_CLASSES = 1000  # beyond: per-class sums only (no C x C matrix in metrics.json)


def _pct(num: float, den: float) -> Optional[float]:
    return None if den == 0 else 100.0 * num / den


def metrics_from_sums(
    confusion: Optional[torch.Tensor],
    bins: torch.Tensor,
    nll_sum: float,
    class_counts: Sequence[int],
    per_class: Optional[torch.Tensor] = None,
) -> Dict[str, Any]:
    """All reported metrics from a [C, C] confusion matrix (rows: true class; None beyond
    CONFUSION_MAX_CLASSES classes) and/or per-class sums [3, C] (images, top-1 hits, top-5 hits),
    and the ECE bins.

    Group accuracies (many > 100, medium 20-100, few < 20 training images) are the mean of the
    per-class accuracies of the group's classes that have test images; None for an empty group.
    top5: with fewer than 5 classes, top-C (every prediction is right).
    """
    if per_class is None:  # from the confusion matrix alone: no top-5
        assert confusion is not None
        per_class = torch.stack([confusion.sum(dim=1), confusion.diagonal(), confusion.diagonal()])
        top5_known = False
    else:
        top5_known = True
    per_class_n, hits, hits5 = per_class
    total = float(per_class_n.sum())
    per_class_acc = [_pct(float(hits[c]), float(per_class_n[c])) for c in range(len(per_class_n))]
    groups = shot_groups(class_counts)
    out: Dict[str, Any] = {"top1": _pct(float(hits.sum()), total)}
    out["top5"] = _pct(float(hits5.sum()), total) if top5_known else None
    for name in ("many", "medium", "few"):
        accs = [a for a in (per_class_acc[c] for c in groups[name]) if a is not None]
        out[name] = sum(accs) / len(accs) if accs else None
    present = [a for a in per_class_acc if a is not None]
    out["mean_class_acc"] = sum(present) / len(present) if present else None
    out["per_class"] = per_class_acc
    out["per_class_count"] = [int(n) for n in per_class_n.tolist()]
    count, conf_sum, correct_sum = bins
    out["ece"] = 100.0 * float((conf_sum - correct_sum).abs().sum()) / total if total else None
    out["nll"] = nll_sum / total if total else None
    out["num_samples"] = int(total)
    out["confusion"] = None if confusion is None else confusion.long().tolist()
    out["groups"] = groups
    return out
