"""Classifier heads: linear, cosine (normalised), LWS-scaled linear and nearest-class-mean classifiers.

Linear: z = W f + b. Cosine (NormedLinear of LDAM-DRW / cosine classifiers): z_c = s * <f/|f|, w_c/|w_c|>.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.core.errors import ConfigError
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
    """Nearest class mean. ``metric: cosine`` (default): z_c = scale * <f/|f|, m_c/|m_c|>;
    ``metric: euclidean`` with ``center: true`` is the decoupling code's default
    (facebookresearch/classifier-balancing ``KNNClassifier``, cl2n + l2): x = (f - mu)/|f - mu|,
    z_c = -scale * |x - m_c|^2 with m_c the (unnormalised) class means of those x.

    ``means`` [C, D] and ``feature_mean`` [D] (mu, used when ``center``) are saved buffers, zero
    until a method fills them (the ``ncm`` method); a zero mean scores 0 under cosine. No
    parameters. Shapes: [B, D] -> [B, C].
    """

    normalized = True

    means: torch.Tensor
    feature_mean: torch.Tensor

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        scale: float = 1.0,
        metric: str = "cosine",
        center: bool = False,
    ):
        super().__init__()
        if metric not in ("cosine", "euclidean"):
            raise ConfigError(f"model.head_params.metric={metric!r}: use cosine or euclidean.")
        self.scale, self.metric, self.center = float(scale), metric, bool(center)
        self.register_buffer("means", torch.zeros(num_classes, in_features))
        self.register_buffer("feature_mean", torch.zeros(in_features))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The features the class means are taken of: centred (``center``), L2-normalised."""
        if self.center:
            features = features - self.feature_mean.to(features.dtype)
        return F.normalize(features, dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.embed(features)
        means = self.means.to(features.dtype)
        if self.metric == "cosine":
            return self.scale * F.linear(x, F.normalize(means, dim=1))
        sq = (x * x).sum(1, keepdim=True) + (means * means).sum(1)[None, :] - 2 * x @ means.T
        return -self.scale * sq
