"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018).

A 3x3/2 conv stem (32 channels), 17 inverted residual blocks (1x1 expand + ReLU6, 3x3 depthwise
+ ReLU6, linear 1x1 project; the shortcut where stride 1 and in == out), a 1x1 conv to 1280 +
BN + ReLU6, global average pooling. Parameter and buffer names are torchvision's
``mobilenet_v2()`` (``features.0.0.weight``, ``features.2.conv.1.0.weight``, ``features.18.1.*``)
without ``classifier``: :func:`load_pretrained` reads torchvision's ImageNet checkpoint
(``mobilenet_v2-b0353104.pth``) by path. Every conv is bias-free, followed by an affine BN
(eps 1e-5, momentum 0.1). Shapes: x [B, in_chans, H, W] -> forward_features [B, 1280], the last
feature map at H/32 x W/32.
"""

from __future__ import annotations

import os
from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.core.errors import ConfigError
from longtail.models.pretrained import check_common, load_pretrained
from longtail.models.registry import BACKBONES

_KEY = "model.backbone_params."
# expand ratio t, output channels c, blocks n, stride of the first block s (the paper's Table 2)
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip
CLASSIFIER_PREFIXES = ("classifier.",)
STEM_KEY = "features.0.0.weight"


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor``, never more than 10% down (torchvision's)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class ConvBNReLU(nn.Sequential):
    """conv (bias-free) -> BN -> ReLU6, as ``.0`` / ``.1`` / ``.2`` (torchvision's
    Conv2dNormActivation)."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
    ):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(
                in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expand (if t > 1) -> 3x3 depthwise (the stride) -> linear 1x1 project + BN, plus the
    input where stride 1 and in == out (``use_res_connect``)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(in_planes * expand_ratio))
        self.stride = stride
        self.in_channels, self.out_channels = in_planes, out_planes
        self.use_res_connect = stride == 1 and in_planes == out_planes
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_planes, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_planes, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_planes),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


def _stride_changes(features: List[nn.Module], i: int) -> bool:
    """Whether features[i] is an inverted residual block after which the stride changes (or the
    last block)."""
    if not isinstance(features[i], InvertedResidual):
        return False
    nxt = features[i + 1]
    return not isinstance(nxt, InvertedResidual) or nxt.stride != 1


class MobileNetV2(nn.Module):
    """MobileNetV2 backbone without the classifier (the long-tail head follows).

    Args:
        in_chans: input channels (3; 1 for grey images).
        width_mult: channel multiplier (1.0: the ImageNet checkpoint's net); the last conv
            keeps 1280 channels for width_mult <= 1.
    Attributes: ``features`` (torchvision's 19 modules), ``num_features`` (1280), ``stages``
    (the last block at each output stride 2-32) and their channels ``stage_channels`` ([16,
    24, 32, 96, 320] at width 1.0).
    """

    def __init__(self, in_chans: int = 3, width_mult: float = 1.0, arch: str = "mobilenet_v2"):
        super().__init__()
        self.arch = arch
        in_planes = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        features: List[nn.Module] = [ConvBNReLU(in_chans, in_planes, stride=2)]
        for t, c, n, s in SETTINGS:
            out_planes = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(in_planes, out_planes, s if i == 0 else 1, t))
                in_planes = out_planes
        features.append(ConvBNReLU(in_planes, last, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.num_features = last
        # the last block at each output stride 2, 4, 8, 16, 32 (features 1, 3, 6, 13, 17)
        ends = [i for i in range(1, len(features) - 1) if _stride_changes(features, i)]
        self._stage_ends = tuple(ends)
        self.stage_channels = [features[i].out_channels for i in ends]
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self) -> List[nn.Module]:
        """The block that ends each output stride 2, 4, 8, 16, 32 (``features[1, 3, 6, 13,
        17]``): a forward hook on one sees (and may replace) that stage's output."""
        return [self.features[i] for i in self._stage_ends]

    def blocks(self) -> List[nn.Module]:
        """The inverted residual blocks whose input and output shapes are equal (stride 1,
        in == out: the ones with a shortcut), in order: 10 at width 1.0."""
        return [m for m in self.features if isinstance(m, InvertedResidual) and m.use_res_connect]

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> the last feature map before pooling [B, num_features, H/32, W/32]."""
        return self.features(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> pooled features [B, num_features]."""
        return F.adaptive_avg_pool2d(self.forward_map(x), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


@BACKBONES.register("mobilenet_v2")
def mobilenet_v2(
    in_chans: int = 3,
    pretrained: Optional[Union[str, os.PathLike]] = None,
    width_mult: float = 1.0,
) -> MobileNetV2:
    """MobileNetV2 (width 1.0: 2.22M parameters), 1280-d features; torchvision's names, so
    ``pretrained`` may be torchvision's ``mobilenet_v2-b0353104.pth`` (``classifier.*`` dropped)."""
    check_common(in_chans, pretrained)
    if (
        isinstance(width_mult, bool)
        or not isinstance(width_mult, (int, float))
        or not 0 < width_mult <= 4
    ):
        raise ConfigError(
            f"'{_KEY}width_mult' must be a number in (0, 4] (1.0: the ImageNet net), "
            f"got {width_mult!r}."
        )
    model = MobileNetV2(in_chans, float(width_mult))
    if pretrained is not None:
        load_pretrained(
            model, pretrained, classifier_prefixes=CLASSIFIER_PREFIXES, stem_key=STEM_KEY
        )
    return model
