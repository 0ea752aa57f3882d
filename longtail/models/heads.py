"""Classifier heads: linear, cosine (normalised), LWS-scaled linear and nearest-class-mean classifiers.

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


@HEADS.register("lws")
class LWSHead(LinearHead):
    """Linear head with learnable per-class scales (LWS, Kang et al. ICLR 2020):
    z_c = f_c * (w_c^T x + b_c), ``scales`` f initialised to 1 (so it starts as the linear head).

    Parameters ``weight`` [C, D], ``bias`` [C] (as :class:`LinearHead`) and ``scales`` [C].
    Shapes: [B, D] -> [B, C].
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True):
        super().__init__(in_features, num_classes, bias=bias)
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features) * self.scales


@HEADS.register("ncm")
class NCMHead(nn.Module):
    """Nearest class mean with cosine similarity: z_c = scale * <f/|f|, m_c/|m_c|>.

    ``means`` [C, D] is a (saved) buffer, zero until a method fills it (the ``ncm`` method writes
    the means of the L2-normalised training features); a zero mean scores 0. No parameters.
    Shapes: [B, D] -> [B, C].
    """

    normalized = True

    means: torch.Tensor

    def __init__(self, in_features: int, num_classes: int, scale: float = 1.0):
        super().__init__()
        self.scale = float(scale)
        self.register_buffer("means", torch.zeros(num_classes, in_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        means = F.normalize(self.means.to(features.dtype), dim=1)
        return self.scale * F.linear(F.normalize(features, dim=1), means)
