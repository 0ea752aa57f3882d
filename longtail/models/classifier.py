"""The classifier assembled from parts: backbone -> neck -> head, returning a ModelOutput record.

Methods swap the head, insert a neck before it, or freeze the backbone without the trainer
knowing; losses read ``logits`` and methods may read ``features`` and ``extras``.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple

import torch
import torch.nn as nn

from longtail.models.registry import BACKBONES, HEADS, NECKS


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
    def __init__(self, backbone: nn.Module, neck: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> [B, D] classifier input."""
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


def build_model(cfg, num_classes: int, in_chans: int) -> Classifier:
    """Build a Classifier from a ``ModelConfig``; unknown options raise ConfigError by key."""
    backbone_params = {"in_chans": in_chans, **cfg.backbone_params}
    backbone = BACKBONES.build(cfg.backbone, key_prefix="model.backbone_params.", **backbone_params)
    dim = backbone.num_features
    neck = NECKS.build(cfg.neck, dim, key_prefix="model.neck_params.", **cfg.neck_params)
    dim = getattr(neck, "out_features", dim)
    head = HEADS.build(
        cfg.head, dim, num_classes, key_prefix="model.head_params.", **cfg.head_params
    )
    return Classifier(backbone, neck, head)
