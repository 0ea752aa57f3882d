"""EfficientNet-Lite0 (Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", ICML 2019; the
"Lite" variant of the TensorFlow TPU repository, 2020: no squeeze-and-excitation, ReLU6 instead
of swish, stem and head fixed at 32 / 1280 channels).

A 3x3/2 conv stem, 16 MBConv blocks in 7 stages (expand 1x1 + ReLU6, k x k depthwise + ReLU6,
linear 1x1 project; the shortcut where stride 1 and in == out), a 1x1 conv to 1280 + BN + ReLU6,
global average pooling. Parameter and buffer names are lukemelas' EfficientNet-PyTorch
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` / ``_bn0`` / ``_depthwise_conv`` / ``_bn1``
/ ``_project_conv`` / ``_bn2``, ``_conv_head``, ``_bn1``) without ``_fc``; the tensors are
timm's ``efficientnet_lite0`` in the same order and shapes. Every conv is bias-free, followed by
an affine BN with TensorFlow's eps 1e-3 and momentum 0.01 (= 1 - 0.99).

Padding (``padding``): ``"same"`` is TensorFlow's SAME (lukemelas' Conv2dStaticSamePadding,
computed here from each input's size: the stride-2 convs pad 0 before / 1 after on an even
size), ``"symmetric"`` PyTorch's k // 2 on both sides (timm's ``efficientnet_lite0``). The two
differ in the five stride-2 convs only. The default is ``"same"``: the checkpoint
``efficientnet-lite0-57934424.pth`` is lukemelas-layout TF-ported weights, and on real images it
predicts with more confidence with SAME padding (docs/models.md, "MobileNetV2 and
EfficientNet-Lite0"). Shapes: x [B, in_chans, H, W] -> forward_features [B, 1280].
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.core.errors import ConfigError
from longtail.models.pretrained import check_common, load_pretrained
from longtail.models.registry import BACKBONES

_KEY = "model.backbone_params."
# kernel k, stride s of the first block, expand ratio e, output channels c, blocks n
# (EfficientNet-B0's stages; Lite0 has B0's width and depth coefficients 1.0, 1.0)
LITE0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
                (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))  # fmt: skip
PADDINGS = ("same", "symmetric")
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's 1e-3 and decay 0.99
CLASSIFIER_PREFIXES = ("_fc.",)
STEM_KEY = "_conv_stem.weight"


class Conv2dPad(nn.Conv2d):
    """A bias-free conv with TensorFlow SAME padding (``same=True``: total padding
    max((ceil(n / s) - 1) * s + k - n, 0), the odd pixel after) or PyTorch's symmetric k // 2."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        same: bool = True,
    ):
        super().__init__(
            in_planes,
            out_planes,
            kernel_size,
            stride,
            padding=0 if same else kernel_size // 2,
            groups=groups,
            bias=False,
        )
        self.same = same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            pads = []
            for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            if any(pads):
                x = F.pad(x, pads)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Lite MBConv: [1x1 expand + BN + ReLU6] -> k x k depthwise (the stride) + BN + ReLU6 ->
    1x1 project + BN, plus the input (after drop-path) where stride 1 and in == out."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        same: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        hidden = in_planes * expand_ratio
        self.stride = stride
        self.in_channels, self.out_channels = in_planes, out_planes
        self.has_skip = stride == 1 and in_planes == out_planes
        self.drop_path = drop_path
        self.expand_ratio = expand_ratio
        if expand_ratio != 1:
            self._expand_conv = Conv2dPad(in_planes, hidden, 1, same=same)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = Conv2dPad(hidden, hidden, kernel_size, stride, hidden, same)
        self._bn1 = _bn(hidden)
        self._project_conv = Conv2dPad(hidden, out_planes, 1, same=same)
        self._bn2 = _bn(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand_ratio != 1:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if not self.has_skip:
            return out
        if self.training and self.drop_path > 0:  # stochastic depth, per sample (lukemelas')
            keep = 1.0 - self.drop_path
            mask = torch.rand(out.shape[0], 1, 1, 1, dtype=out.dtype, device=out.device) < keep
            out = out * mask.to(out.dtype) / keep
        return out + x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone without the classifier (the long-tail head follows).

    Args:
        in_chans: input channels (3; 1 for grey images).
        padding: ``"same"`` (TensorFlow SAME, the TF-ported checkpoint's) or ``"symmetric"``.
        drop_path_rate: stochastic depth of the last block (block i: rate * i / 16; 0: off).
    Attributes: ``num_features`` (1280), ``stages`` (the last block at each output stride 2-32)
    and their channels ``stage_channels`` ([16, 24, 40, 112, 320]).
    """

    def __init__(
        self,
        in_chans: int = 3,
        padding: str = "same",
        drop_path_rate: float = 0.0,
        arch: str = "efficientnet_lite0",
    ):
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        self.arch = arch
        self.padding = padding
        same = padding == "same"
        self._conv_stem = Conv2dPad(in_chans, 32, 3, 2, same=same)
        self._bn0 = _bn(32)
        specs = []
        in_planes = 32
        for k, s, e, c, n in LITE0_STAGES:
            for i in range(n):
                specs.append((in_planes, c, k, s if i == 0 else 1, e))
                in_planes = c
        self._blocks = nn.ModuleList(
            MBConvBlock(*spec, same=same, drop_path=drop_path_rate * i / len(specs))
            for i, spec in enumerate(specs)
        )
        self._conv_head = Conv2dPad(in_planes, 1280, 1, same=same)
        self._bn1 = _bn(1280)
        self.num_features = 1280
        # the last block before each stride-2 block, and the last block
        self._stage_ends = tuple(
            i for i in range(len(specs)) if i == len(specs) - 1 or specs[i + 1][3] != 1
        )
        self.stage_channels = [specs[i][1] for i in self._stage_ends]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self) -> List[nn.Module]:
        """The block that ends each output stride 2, 4, 8, 16, 32 (``_blocks[0, 2, 4, 10,
        15]``): a forward hook on one sees (and may replace) that stage's output."""
        return [self._blocks[i] for i in self._stage_ends]

    def blocks(self) -> List[nn.Module]:
        """The MBConv blocks whose input and output shapes are equal (stride 1, in == out: the
        ones with a shortcut), in order: 9 of the 16."""
        return [b for b in self._blocks if isinstance(b, MBConvBlock) and b.has_skip]

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> the last feature map before pooling [B, 1280, H/32, W/32]."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> pooled features [B, num_features]."""
        return F.adaptive_avg_pool2d(self.forward_map(x), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


@BACKBONES.register("efficientnet_lite0")
def efficientnet_lite0(
    in_chans: int = 3,
    pretrained: Optional[Union[str, os.PathLike]] = None,
    padding: str = "same",
    drop_path_rate: float = 0.0,
) -> EfficientNetLite:
    """EfficientNet-Lite0 (3.37M parameters), 1280-d features; lukemelas' names, so
    ``pretrained`` may be ``efficientnet-lite0-57934424.pth`` (``_fc.*`` dropped). ``padding``:
    ``same`` (TensorFlow's, the TF-ported weights') or ``symmetric`` (timm's)."""
    check_common(in_chans, pretrained)
    if padding not in PADDINGS:
        raise ConfigError(
            f"'{_KEY}padding' must be one of {', '.join(PADDINGS)} (same: TensorFlow SAME, "
            f"the TF-ported checkpoint's; symmetric: PyTorch k//2, timm's), got {padding!r}."
        )
    if (
        isinstance(drop_path_rate, bool)
        or not isinstance(drop_path_rate, (int, float))
        or not 0 <= drop_path_rate < 1
    ):
        raise ConfigError(
            f"'{_KEY}drop_path_rate' must be a number in [0, 1) (0: off; lukemelas trains "
            f"with 0.2), got {drop_path_rate!r}."
        )
    model = EfficientNetLite(in_chans, padding, float(drop_path_rate))
    if pretrained is not None:
        load_pretrained(
            model, pretrained, classifier_prefixes=CLASSIFIER_PREFIXES, stem_key=STEM_KEY
        )
    return model
