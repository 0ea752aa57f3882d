"""The classifier assembled from parts: backbone -> neck -> head, returning a ModelOutput record.

Methods swap the head, insert a neck before it, or freeze the backbone without the trainer
knowing; losses read ``logits`` and methods may read ``features`` and ``extras``.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelOutput(NamedTuple):
    """What a forward pass returns.

    logits:   [B, C] class scores (cosines for a normalised head with scale 1).
    features: [B, D] classifier input (pooled backbone features after the neck).
    extras:   method-specific outputs (per-expert logits, whitening statistics, ...).
    """

    logits: torch.Tensor
    features: torch.Tensor
    extras: Dict[str, Any] = {}


class Classifier(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        head: nn.Module,
        input_size: Optional[int] = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.input_size = input_size  # model.input_size: inputs resized to it (bilinear)

    def resize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images resized (bilinear) to ``input_size`` when it is set and they differ."""
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size,) * 2:
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> [B, D] classifier input."""
        x = self.resize_input(x)
        # torch types Module.__getattr__ as Tensor | Module, but forward_features is a method of
        # every backbone (the backbone contract), never a parameter or buffer
        return self.neck(self.backbone.forward_features(x))  # type: ignore[operator]

    def forward(self, x: torch.Tensor) -> ModelOutput:
        features = self.forward_features(x)
        return ModelOutput(self.head(features), features, {})

    def freeze_backbone(self) -> None:
        """Stop gradients and BN statistic updates in the backbone (decoupled training)."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        self._backbone_frozen = True

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if getattr(self, "_backbone_frozen", False):
            self.backbone.eval()
        return self
