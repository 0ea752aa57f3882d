"""Necks: modules between the pooled backbone features and the head (identity by default).

Later methods (channel whitening, feature modulators) register here; shapes [B, D] -> [B, D].
"""

from __future__ import annotations

import torch
import torch.nn as nn

from longtail.models.registry import NECKS


@NECKS.register("identity")
class IdentityNeck(nn.Identity):
    def __init__(self, in_features: int):
        super().__init__()
        self.out_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401 - identity
        return x
