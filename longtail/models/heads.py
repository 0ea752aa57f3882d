"""Classifier heads: linear and cosine (normalised) classifiers.

Linear: z = W f + b. Cosine (NormedLinear of LDAM-DRW / cosine classifiers): z_c = s * <f/|f|, w_c/|w_c|>.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.models.registry import HEADS


@HEADS.register("linear")
class LinearHead(nn.Linear):
    """Shapes: [B, D] -> [B, C]."""

    normalized = False

    def __init__(self, in_features: int, num_classes: int, bias: bool = True):
        super().__init__(in_features, num_classes, bias=bias)
        nn.init.kaiming_normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


@HEADS.register("cosine")
class CosineHead(nn.Module):
    """Cosine similarity between normalised features and normalised class weights, times ``scale``.

    With ``scale=1`` the output is the raw cosine in [-1, 1], the input LDAM and GCL expect
    (they apply their own scale). Shapes: [B, D] -> [B, C].
    """

    normalized = True

    def __init__(self, in_features: int, num_classes: int, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)
        w = torch.empty(num_classes, in_features).uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5)
        self.weight = nn.Parameter(w)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))
