"""The margin network g of PML (Deng et al., "PML: Progressive Margin Loss for Long-tailed Age
Classification", CVPR 2021): a small 1-D CNN that reads per-class statistics with the C classes as
input channels and returns one value per class.

    [C, L] -> conv1d(C, w, k7, s2) BN ReLU -> maxpool(3, 2) conv(w, w, 3) BN ReLU
           -> [conv(., 2., 3, s2) conv(2., 2., 3) BN ReLU] x 3 (w, 2w, 4w, 8w channels)
           -> global average pool -> Linear(8w, C) -> [C]

``w = 64`` is the reference's (64 ... 512 channels). Inputs shorter than ``MIN_LENGTH`` are
zero-padded on the right (five stride-2 stages leave at least 2 positions, so BatchNorm in training
mode has more than one value per channel). Used by :mod:`longtail.methods.pml`; docs/methods/pml.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

#: the shortest input length whose last stage still has 2 positions (ceil(L / 32) >= 2)
MIN_LENGTH = 33


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    """A stride-2 conv in place of pooling, a conv, BN, ReLU (the reference's stages 2-4)."""
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel_size=3, stride=2, padding=1),
        nn.Conv1d(c_out, c_out, kernel_size=3, stride=1, padding=1),
        nn.BatchNorm1d(c_out),
        nn.ReLU(inplace=True),
    )


class MarginNet(nn.Module):
    """g: per-class statistics [C, L] (or [N, C, L]) -> one value per class [C] (or [N, C])."""

    def __init__(self, num_classes: int, width: int = 64):
        super().__init__()
        if num_classes < 1 or width < 1:
            raise ValueError(f"MarginNet needs num_classes, width >= 1, got {num_classes}, {width}")
        self.num_classes, self.width = int(num_classes), int(width)
        w = self.width
        self.stem = nn.Sequential(
            nn.Conv1d(num_classes, w, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm1d(w),
            nn.ReLU(inplace=True),
        )
        self.layer1 = nn.Sequential(
            nn.MaxPool1d(kernel_size=3, stride=2, padding=1),
            nn.Conv1d(w, w, kernel_size=3, stride=1, padding=1),
            nn.BatchNorm1d(w),
            nn.ReLU(inplace=True),
        )
        self.layer2 = _stage(w, 2 * w)
        self.layer3 = _stage(2 * w, 4 * w)
        self.layer4 = _stage(4 * w, 8 * w)
        self.fc = nn.Linear(8 * w, num_classes)
        # the reference's initialisation: kaiming-normal (fan_out) convolutions, BN 1 / 0,
        # xavier-normal linear layer with a zero bias
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0.0)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.constant_(m.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = x.dim() == 2
        if single:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[1] != self.num_classes:
            raise ValueError(
                f"MarginNet expects [C, L] or [N, C, L] with C = {self.num_classes}, "
                f"got {tuple(x.shape)}"
            )
        if x.shape[-1] < MIN_LENGTH:
            x = F.pad(x, (0, MIN_LENGTH - x.shape[-1]))
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        out = self.fc(x.mean(dim=-1))
        return out[0] if single else out


__all__ = ["MarginNet", "MIN_LENGTH"]
