"""ImageNet ResNets: ResNet-18/34/50/101/152 (He et al., CVPR 2016), ResNeXt-50 32x4d (Xie et al.,
CVPR 2017) and ResNet-10 (BasicBlock [1, 1, 1, 1], Kang et al., ICLR 2020, for ImageNet-LT).

7x7/2 stem + 3x3/2 max-pool, four stages (64-512 planes, strides 4-32), 1x1 conv + BN projection
shortcuts where the shape changes, the stride of a bottleneck in its 3x3 conv (torchvision's
"v1.5"). Parameter and buffer names are torchvision's (``conv1``, ``layer1.0.bn1``,
``layer2.0.downsample.0``, ...) without ``fc``: :func:`load_pretrained` reads a torchvision / timm
checkpoint by path. Shapes: x [B, in_chans, H, W] -> forward_features [B, 512] (BasicBlock) or
[B, 2048] (bottleneck), layer4 at H/32 x W/32.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.core.errors import ConfigError
from longtail.models.pretrained import (  # noqa: F401 (re-exported: the loaders' old home)
    SUFFIXES,
    check_common,
    load_pretrained,
    read_state_dict,
    strip_prefixes,
)
from longtail.models.registry import BACKBONES

_KEY = "model.backbone_params."
_PLANES = (64, 128, 256, 512)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride, 1, groups=groups, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)


def _projection(in_planes: int, out_planes: int, stride: int) -> Optional[nn.Sequential]:
    """The shortcut's 1x1 conv + BN (``downsample.0`` / ``.1``) where the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(_conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-10/18/34): relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))."""

    expansion = 1

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64
    ):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock has no groups or width factor (use Bottleneck)")
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _projection(in_planes, planes, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (the stride; ``groups`` for ResNeXt), 1x1 expand x4 (ResNet-50 and up)."""

    expansion = 4

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64
    ):
        super().__init__()
        width = int(planes * base_width / 64) * groups  # ResNeXt-50 32x4d: 2x planes
        out_planes = planes * self.expansion
        self.conv1 = _conv1x1(in_planes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(in_planes, out_planes, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


Block = Union[Type[BasicBlock], Type[Bottleneck]]

# name -> (block, blocks per stage, groups, width per group)
ARCHITECTURES: Dict[str, Tuple[Block, Tuple[int, int, int, int], int, int]] = {
    "resnet10": (BasicBlock, (1, 1, 1, 1), 1, 64),
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 1, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 1, 64),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), 32, 4),
}


class ResNet(nn.Module):
    """An ImageNet ResNet / ResNeXt backbone (no classifier: the long-tail head follows).

    Args:
        block: BasicBlock or Bottleneck.
        layers: blocks in each of the four stages.
        in_chans: input channels (3; 1 for grey images).
        groups, width_per_group: ResNeXt cardinality and width (1, 64: a ResNet).
        zero_init_residual: start each block's last BN at gamma 0 (each block starts as its
            shortcut; Goyal et al. 2017).
        arch: the name the errors of :func:`load_pretrained` give.
    Attributes: ``num_features`` (512 / 2048), ``stages`` (layer1..layer4) and their output
    channels ``stage_channels``.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        in_chans: int = 3,
        groups: int = 1,
        width_per_group: int = 64,
        zero_init_residual: bool = False,
        arch: str = "resnet",
    ):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts, got {list(layers)}")
        self.arch = arch
        self.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, in_planes = [], 64
        for i, (planes, n) in enumerate(zip(_PLANES, layers)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_planes, planes, stride, groups, width_per_group))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.stage_channels = [p * block.expansion for p in _PLANES]
        self.num_features = self.stage_channels[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    @property
    def stages(self) -> List[nn.Module]:
        """The four stages (layer1..layer4), e.g. for feature modulation's hooks."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def blocks(self) -> List[nn.Module]:
        """The residual blocks whose input and output shapes are equal (no projection shortcut):
        where a parallel adapter fits (model.tuning=adapter)."""
        return [
            b
            for stage in self.stages
            for b in stage.children()
            if getattr(b, "downsample", 0) is None
        ]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> [B, 64, H/4, W/4]."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> the last feature map before pooling [B, num_features, H/32, W/32]."""
        x = self.forward_stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> pooled features [B, num_features]."""
        return F.adaptive_avg_pool2d(self.forward_map(x), 1).flatten(1)

    def pop_last_stage(self) -> nn.Module:
        """Detach ``layer4`` and return it (multi-expert models copy it per expert): afterwards
        ``forward_map`` ends at ``layer3`` (``stage_channels[-2]`` channels)."""
        last = self.layer4
        self.layer4 = nn.Identity()  # type: ignore[assignment]  # a stage no more
        self.num_features = self.stage_channels[-2]
        return last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def resnet(
    arch: str,
    in_chans: int = 3,
    zero_init_residual: bool = False,
    pretrained: Optional[Union[str, os.PathLike]] = None,
) -> ResNet:
    """Build the ImageNet ResNet ``arch`` (a key of ARCHITECTURES), with ``pretrained`` weights
    (a path, see :func:`load_pretrained`) if given; ConfigError names a bad option."""
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"Unknown ImageNet ResNet {arch!r}. Available: {', '.join(ARCHITECTURES)}."
        )
    check_common(in_chans, pretrained)
    if not isinstance(zero_init_residual, bool):
        raise ConfigError(
            f"'{_KEY}zero_init_residual' must be true or false, got {zero_init_residual!r}."
        )
    block, layers, groups, width = ARCHITECTURES[arch]
    model = ResNet(block, layers, in_chans, groups, width, zero_init_residual, arch=arch)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


# ------------------------------------------------------------------------------------------
# the registered backbones (options: model.backbone_params.<name>)


@BACKBONES.register("resnet10")
def resnet10(
    in_chans: int = 3, zero_init_residual: bool = False, pretrained: Optional[str] = None
) -> ResNet:
    """ResNet-10: BasicBlock [1, 1, 1, 1], 512-d features (the decoupling paper's ImageNet-LT net)."""
    return resnet("resnet10", in_chans, zero_init_residual, pretrained)


@BACKBONES.register("resnet18")
def resnet18(
    in_chans: int = 3, zero_init_residual: bool = False, pretrained: Optional[str] = None
) -> ResNet:
    """ResNet-18: BasicBlock [2, 2, 2, 2], 512-d features."""
    return resnet("resnet18", in_chans, zero_init_residual, pretrained)


@BACKBONES.register("resnet34")
def resnet34(
    in_chans: int = 3, zero_init_residual: bool = False, pretrained: Optional[str] = None
) -> ResNet:
    """ResNet-34: BasicBlock [3, 4, 6, 3], 512-d features."""
    return resnet("resnet34", in_chans, zero_init_residual, pretrained)


@BACKBONES.register("resnet50")
def resnet50(
    in_chans: int = 3, zero_init_residual: bool = False, pretrained: Optional[str] = None
) -> ResNet:
    """ResNet-50: Bottleneck [3, 4, 6, 3], 2048-d features (torchvision / timm names)."""
    return resnet("resnet50", in_chans, zero_init_residual, pretrained)


@BACKBONES.register("resnet101")
def resnet101(
    in_chans: int = 3, zero_init_residual: bool = False, pretrained: Optional[str] = None
) -> ResNet:
    """ResNet-101: Bottleneck [3, 4, 23, 3], 2048-d features."""
    return resnet("resnet101", in_chans, zero_init_residual, pretrained)


@BACKBONES.register("resnet152")
def resnet152(
    in_chans: int = 3, zero_init_residual: bool = False, pretrained: Optional[str] = None
) -> ResNet:
    """ResNet-152: Bottleneck [3, 8, 36, 3], 2048-d features."""
    return resnet("resnet152", in_chans, zero_init_residual, pretrained)


@BACKBONES.register("resnext50_32x4d")
def resnext50_32x4d(
    in_chans: int = 3, zero_init_residual: bool = False, pretrained: Optional[str] = None
) -> ResNet:
    """ResNeXt-50 32x4d: Bottleneck [3, 4, 6, 3], 32 groups of width 4, 2048-d features."""
    return resnet("resnext50_32x4d", in_chans, zero_init_residual, pretrained)
