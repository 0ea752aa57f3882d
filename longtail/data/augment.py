"""Batched image augmentation on whole uint8 tensors (no per-image Python loop).

RandomCrop(size, padding=p, fill 0) + RandomHorizontalFlip + Normalize, as torchvision applies
per image in the CIFAR reference recipe, done with two gathers on the device holding the batch.
Nothing here reads a device tensor back to the host, so a batch is augmented without a sync.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch


class AugmentParams(NamedTuple):
    """Per-sample random choices. offsets: int64 [B, 2] (dy, dx) in [0, 2p]; flips: bool [B]."""

    offsets: torch.Tensor
    flips: torch.Tensor


def sample_params(n: int, padding: int, flip: bool, generator: torch.Generator) -> AugmentParams:
    """Draw crop offsets and flips for ``n`` samples from ``generator`` (on the CPU)."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = (torch.rand(n, generator=generator) < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    return AugmentParams(offsets, flips)


def random_crop_flip(
    images: torch.Tensor, params: AugmentParams, padding: int, flip: bool = True
) -> torch.Tensor:
    """Crop each image at its offset from a zero-padded copy, then flip where asked.

    images: [B, C, H, W] (any dtype) -> [B, C, H, W], same dtype and device. ``flip=False``
    skips the flip (``params.flips`` must then be all False); the params are best already on
    the images' device (else each call copies them there).
    """
    b, c, h, w = images.shape
    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
        offsets = params.offsets.to(images.device)
        rows = offsets[:, 0:1] + torch.arange(h, device=images.device)  # [B, H]
        cols = offsets[:, 1:2] + torch.arange(w, device=images.device)  # [B, W]
        x = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * padding))
        images = x.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    if flip:
        # always the select (never `if flips.any()`, which would wait for the device)
        flips = params.flips.to(images.device)
        images = torch.where(flips[:, None, None, None], images.flip(3), images)
    return images


class Normalizer:
    """:func:`normalize` with its per-channel constants (255 mean, 255 std) made once on
    ``device``: calling it on a batch copies nothing to the device."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: Union[torch.device, str] = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.dtype = dtype
        self.mean = torch.tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=dtype, device=device).view(1, -1, 1, 1) * 255.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(self.dtype) - self.mean) / self.std


def normalize(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 [B, C, H, W] in 0..255 -> float [B, C, H, W], (x/255 - mean) / std per channel
    (the constants are made anew on each call: a :class:`Normalizer` makes them once)."""
    return Normalizer(mean, std, images.device, dtype)(images)
