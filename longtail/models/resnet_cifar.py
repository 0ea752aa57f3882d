"""CIFAR ResNet-32 (He et al., CVPR 2016, §4.2) as used by LDAM-DRW and most CIFAR-LT papers.

3 stages of n=5 basic blocks with 16/32/64 channels, option-A (zero-padding) shortcuts,
global average pooling: ~0.46M parameters; ``forward_features`` returns the pooled [B, 64] vector.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.models.registry import BACKBONES


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by 2 and zero-pad the channel dimension."""

    def __init__(self, pad_channels: int):
        super().__init__()
        self.pad = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet for 32x32 inputs (also works on 28x28 MNIST-style inputs).

    Args:
        depth: 6n+2 (32 -> n=5).
        in_chans: input channels (3 for CIFAR, 1 for MNIST/Fashion-MNIST).
        widths: channels of the three stages.
    Shapes: x [B, in_chans, H, W] -> forward_features [B, widths[-1]].
    """

    def __init__(self, depth: int = 32, in_chans: int = 3, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_planes = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, w, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.num_features = widths[-1]
        self.stage_channels = list(widths)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> the last feature map before pooling [B, num_features, H', W']."""
        x = self.forward_stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> pooled features [B, num_features]."""
        return F.adaptive_avg_pool2d(self.forward_map(x), 1).flatten(1)

    def pop_last_stage(self) -> nn.Module:
        """Detach the last stage and return it (multi-expert models copy it per expert):
        afterwards ``forward_map`` ends one stage earlier, at ``stage_channels[-2]`` channels."""
        last = self.stages[-1]
        self.stages[-1] = nn.Identity()
        self.num_features = self.stage_channels[-2]
        return last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


@BACKBONES.register("resnet32")
def resnet32(in_chans: int = 3, widths: Sequence[int] = (16, 32, 64)) -> ResNetCifar:
    return ResNetCifar(32, in_chans=in_chans, widths=list(widths))


@BACKBONES.register("resnet20")
def resnet20(in_chans: int = 3, widths: Sequence[int] = (16, 32, 64)) -> ResNetCifar:
    return ResNetCifar(20, in_chans=in_chans, widths=list(widths))


@BACKBONES.register("resnet8")
def resnet8(in_chans: int = 3, widths: Sequence[int] = (16, 32, 64)) -> ResNetCifar:
    """A tiny variant for fast tests."""
    return ResNetCifar(8, in_chans=in_chans, widths=list(widths))
