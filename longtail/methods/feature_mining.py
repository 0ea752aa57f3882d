"""Feature Mining (Xie, Cheng, Wang, Liu, Deng, Liu, arXiv 2107.08421; Applied Sciences 12(7):3318,
2022): feature segmentation + feature reusing, parameter-free. No public code; beyond the abstract
every choice is [PROPOSED] (docs/methods/feature_mining.md). Per training step, F [B, C, H, W] the
backbone's last feature map (``forward_map``), M [B, H, W] a random binary mask per sample::

    f = GAP(F),  f_k = sum_hw(F * M_k) / |M_k|   (M_1 = M, M_2 = 1 - M; ``rescale: false``: / H W)
    L = l(h(f), y) + weight * [l(h(f_1), y) + l(h(f_2), y)] / 2

h = the model's own neck and head (the three rows in one call), l = the run's loss (any). M:
``bernoulli`` (M_hw ~ Bernoulli(ratio)) or ``rectangle`` (an axis-aligned box of ~ratio H W
positions); neither part is ever empty. Inference is the model's plain forward.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Annotated, Any, Dict, Iterator, Literal, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from longtail.core.distributed import all_reduce_sum
from longtail.core.errors import ConfigError
from longtail.data.loader import Batch
from longtail.methods.base import METHODS, Method, MethodContext

MASKS = ("bernoulli", "rectangle")


def rectangle_size(height: int, width: int, ratio: float) -> Tuple[int, int]:
    """(h, w) of the ``rectangle`` mask on an H x W map: h = round(H sqrt(ratio)), w the width
    closest to ratio H W / h; at least one position inside and one outside (H W >= 2)."""
    h = min(max(round(height * math.sqrt(ratio)), 1), height)
    w = min(max(round(ratio * height * width / h), 1), width)
    if h * w == height * width:  # the box would cover the whole map: one row or column less
        if w > 1:
            w -= 1
        else:
            h -= 1
    return h, w


def draw_masks(
    kind: str, ratio: float, batch: int, height: int, width: int, device: torch.device
) -> torch.Tensor:
    """Boolean masks [batch, H, W] (True: part 1, False: part 2) from torch's global RNG on
    ``device``; each has at least one True and one False position (needs H W >= 2)."""
    n = height * width
    if n < 2:
        raise ConfigError(
            f"method.name=feature_mining divides the backbone's last feature map into two "
            f"parts, but it is {height}x{width} here: the input is too small for this backbone. "
            f"Set a larger model.input_size (or train another backbone)."
        )
    if kind == "rectangle":
        h, w = rectangle_size(height, width, ratio)
        top = torch.randint(0, height - h + 1, (batch, 1, 1), device=device)
        left = torch.randint(0, width - w + 1, (batch, 1, 1), device=device)
        rows = torch.arange(height, device=device).view(1, height, 1)
        cols = torch.arange(width, device=device).view(1, 1, width)
        return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    u = torch.rand(batch, n, device=device)
    mask = u < ratio
    # a draw with an empty part (probability ratio^n + (1 - ratio)^n) gets the position most
    # likely to be in it moved over: the least u into part 1, the largest u into part 2
    count = mask.sum(1, keepdim=True)
    low, high = u.argmin(1, keepdim=True), u.argmax(1, keepdim=True)
    mask = mask.scatter(1, low, mask.gather(1, low) | (count == 0))
    mask = mask.scatter(1, high, mask.gather(1, high) & (count < n))
    return mask.view(batch, height, width)


def pool_parts(
    fmap: torch.Tensor, mask: torch.Tensor, rescale: bool = True
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(GAP(F), pooled part 1, pooled part 2), each [B, C], of F [B, C, H, W] and a boolean mask
    [B, H, W]: part k's GAP of F * M_k, times H W / |M_k| when ``rescale`` (its own mean)."""
    whole = F.adaptive_avg_pool2d(fmap, 1).flatten(1)  # exactly the backbone's forward_features
    m1 = mask.unsqueeze(1).to(fmap.dtype)
    m2 = 1 - m1
    part1 = (fmap * m1).mean((2, 3))
    part2 = (fmap * m2).mean((2, 3))
    if rescale:
        n = mask.shape[-2] * mask.shape[-1]
        count1 = mask.flatten(1).sum(1, keepdim=True).clamp_min(1)
        count2 = (n - count1).clamp_min(1)
        part1 = part1 * (n / count1).to(part1.dtype)
        part2 = part2 * (n / count2).to(part2.dtype)
    return whole, part1, part2


@METHODS.register("feature_mining")
class FeatureMining(Method):
    """Feature segmentation + feature reusing; see docs/methods/feature_mining.md."""

    def __init__(
        self,
        ctx: MethodContext,
        mask: Literal["bernoulli", "rectangle"] = "bernoulli",
        ratio: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5,
        weight: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 1.0,
        rescale: bool = True,
    ):
        if mask not in MASKS:
            raise ConfigError(f"method.mask={mask!r}: use one of {', '.join(MASKS)}.")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ConfigError(
                f"method.ratio={ratio!r} must lie in (0, 1): the share of the feature map "
                f"that goes to part 1 (0.5: two halves)."
            )
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise ConfigError(
                f"method.weight={weight!r} must be a finite number >= 0 (the weight of the "
                f"mean of the two parts' losses; 0 trains the plain loss)."
            )
        self.mask_kind, self.ratio, self.weight = mask, float(ratio), float(weight)
        self.rescale = bool(rescale)
        super().__init__(ctx)  # calls setup_model (checks the backbone)
        self.last_mask: Optional[torch.Tensor] = None  # the latest step's masks [B, H, W]
        self._sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # whole, parts, n

    # -- model -------------------------------------------------------------------------------
    def setup_model(self, model: nn.Module) -> None:
        backbone = getattr(model, "backbone", None)
        if not callable(getattr(backbone, "forward_map", None)):
            raise ConfigError(
                f"method.name=feature_mining divides the last convolutional feature map, and "
                f"the backbone {type(backbone).__name__} has none (no forward_map: a "
                f"transformer pools tokens). Train it with a CNN backbone (model.backbone="
                f"resnet32, resnet50, mobilenet_v2, ...), or choose another method."
            )
        neck = getattr(model, "neck", None)
        if isinstance(neck, nn.Module) and any(True for _ in neck.buffers()):
            warnings.warn(
                f"model.neck={type(neck).__name__} keeps running statistics: under "
                f"feature_mining it sees the whole features and both parts in one batch of "
                f"3 x the batch size (docs/methods/feature_mining.md).",
                stacklevel=2,
            )

    def _mined_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's ``forward_features`` during a training forward: [3B, C] rows
        (whole, part 1, part 2) of one ``forward_map`` pass."""
        fmap = self._backbone.forward_map(x)
        b, _, h, w = fmap.shape
        mask = draw_masks(self.mask_kind, self.ratio, b, h, w, fmap.device)
        self.last_mask = mask
        return torch.cat(pool_parts(fmap, mask, self.rescale))

    @contextlib.contextmanager
    def mining(self) -> Iterator[None]:
        """Within: the model's forward returns the logits of [whole; part 1; part 2] (3B rows).

        The backbone's ``forward_features`` is shadowed on the instance, so the classifier's own
        forward (its input resize, the neck, the head; DDP and compile wrappers) runs unchanged.
        """
        backbone = self._backbone
        object.__setattr__(backbone, "forward_features", self._mined_features)
        try:
            yield
        finally:
            object.__delattr__(backbone, "forward_features")

    @property
    def _backbone(self) -> Any:
        """The model's backbone (a CNN with ``forward_map``, checked in :meth:`setup_model`)."""
        return self.model.backbone

    # -- the step ----------------------------------------------------------------------------
    def compute_loss(self, batch: Batch) -> torch.Tensor:
        labels = batch.labels
        n = labels.shape[0]
        with self.autocast(), self.mining():
            out = self.train_model(batch.images)
        logits = out.logits.float()
        if logits.shape[0] != 3 * n:
            raise ConfigError(
                f"method.name=feature_mining expected {3 * n} rows of logits (whole, part 1, "
                f"part 2 of {n} images) and got {logits.shape[0]}: the model does not pool "
                f"through backbone.forward_features. Use a Classifier with a CNN backbone."
            )
        whole, part1, part2 = logits.split(n)
        loss_whole = self.loss(whole, labels)
        loss_parts = (self.loss(part1, labels) + self.loss(part2, labels)) / 2
        with torch.no_grad():
            rows = self._sums.new_full((), float(n))  # image-weighted, as the epoch's loss
            self._sums += torch.stack(
                [loss_whole.double() * rows, loss_parts.double() * rows, rows]
            )
        return loss_whole + self.weight * loss_parts

    # -- hooks -------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self._sums.zero_()

    def on_epoch_end(self, epoch: int) -> Dict[str, float]:
        sums = self._sums.cpu()
        all_reduce_sum(sums, self.ctx.dist)
        if float(sums[2]) == 0:
            return {}
        return {
            "fm_whole_loss": float(sums[0] / sums[2]),
            "fm_part_loss": float(sums[1] / sums[2]),
        }

    def extra_metrics(self) -> Dict[str, Any]:
        mask = self.last_mask
        return {
            "feature_mining": {
                "mask": self.mask_kind,
                "ratio": self.ratio,
                "weight": self.weight,
                "rescale": self.rescale,
                "map_size": None if mask is None else list(mask.shape[-2:]),
            }
        }
