"""Batch iterators over images held as one uint8 tensor on the training device.

Training: sampler order -> this rank's slice of each global batch -> gather -> batched augment.
Augmentation choices are drawn per global position from (seed, epoch), so a sample gets the same
crop and flip whether it is trained by one process or by rank r of N, and resume is exact.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Sequence, cast

import numpy as np
import torch

from longtail.data.augment import AugmentParams, Normalizer, random_crop_flip, sample_params
from longtail.data.samplers import BaseSampler
from longtail.data.stream import FileBatches


class Batch(NamedTuple):
    """images: float [B, C, H, W] normalised; labels: int64 [B]; indices: int64 [B] positions
    into the training set (for methods that track per-sample state)."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, epoch, stream, 0xA06]).generate_state(1)[0]))
    return g


class TrainLoader:
    """Iterates over one epoch of augmented training batches for this rank.

    Args:
        images: uint8 [N, C, H, W] (moved to ``device`` once), or None with ``files``;
        labels: int64 [N]. sampler: gives the global order of an epoch; batch_size: the global
        batch. files: the images on disk (:class:`~longtail.data.stream.FileBatches`), decoded by
        worker processes batch by batch in this epoch's order; the device augmentation
        (crop / flip) and normalisation are then the same as for an in-memory set.
    """

    def __init__(
        self,
        images: Optional[torch.Tensor | FileBatches],
        labels: torch.Tensor,
        sampler: BaseSampler,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        device: torch.device,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        padding: int = 4,
        flip: bool = True,
        drop_last: bool = False,
        channels_last: bool = False,
        files: Optional[FileBatches] = None,
    ):
        if isinstance(images, FileBatches):  # a set on disk: its decoder stands for its images
            images, files = None, images
        if (images is None) == (files is None):
            raise ValueError("TrainLoader takes images (in memory) or files (on disk), not both.")
        if batch_size % world_size:
            raise ValueError(
                f"train.batch_size={batch_size} must be divisible by the number of "
                f"processes ({world_size})."
            )
        self.images = None if images is None else images.to(device)
        self.files = files
        self.labels = labels.to(device)
        self.sampler = sampler
        self.batch_size = batch_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.normalizer = Normalizer(self.mean, self.std, device)  # made once, on the device
        self.device = device
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.padding, self.flip, self.drop_last = padding, flip, drop_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        """Steps per epoch (the same on every rank)."""
        return self.sampler.num_batches(self.batch_size, self.drop_last)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        order = torch.as_tensor(self.sampler.global_order(epoch), dtype=torch.long)
        params = sample_params(len(order), self.padding, self.flip, _generator(self.seed, epoch, 1))
        batches = self.sampler.rank_positions(
            order.numpy(), self.batch_size, self.rank, self.world_size, self.drop_last
        )
        # the epoch's indices and augmentation choices in this rank's batch order, moved to the
        # device in one copy each: a batch is then slices of them (no copy, no sync per step)
        pos = torch.from_numpy(np.concatenate(batches) if batches else np.zeros(0, np.int64))
        idx_all = order[pos].to(self.device, non_blocking=True)
        offsets_all = params.offsets[pos].to(self.device, non_blocking=True)
        flips_all = params.flips[pos].to(self.device, non_blocking=True)
        decoded = (
            None
            if self.files is None
            else self.files.batches(epoch, [order.numpy()[b] for b in batches], batches)
        )
        start = 0
        for size in (len(b) for b in batches):
            idx = idx_all[start : start + size]
            aug = AugmentParams(offsets_all[start : start + size], flips_all[start : start + size])
            start += size
            if decoded is None:
                assert self.images is not None  # one of the two, checked in __init__
                x = self.images.index_select(0, idx)
            else:
                x = next(decoded).to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:  # a worker transform may hand over normalised floats
                x = random_crop_flip(x, aug, self.padding, flip=self.flip)
                x = self.normalizer(x)
            yield Batch(
                x.contiguous(memory_format=self.memory_format),
                self.labels.index_select(0, idx),
                idx,
            )


def eval_batches(
    images: torch.Tensor | FileBatches,
    labels: torch.Tensor,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = False,
) -> Iterator[Batch]:
    """This rank's contiguous shard of an evaluation set, in order, normalised, not augmented
    (``images``: uint8 [N, C, H, W], or the FileBatches of a set on disk, decoded by its workers
    with its evaluation transform, if any)."""
    n = len(labels)
    lo, hi = (n * rank) // world_size, (n * (rank + 1)) // world_size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    norm = Normalizer(mean, std, device)
    shards = [np.arange(a, min(a + batch_size, hi)) for a in range(lo, hi, batch_size)]
    decoded = images.batches(0, shards, shards) if isinstance(images, FileBatches) else None
    for idx in shards:
        start, stop = int(idx[0]), int(idx[-1]) + 1
        x = next(decoded) if decoded is not None else cast(torch.Tensor, images)[start:stop]
        x = x.to(device, non_blocking=True)
        x = norm(x) if x.dtype == torch.uint8 else x  # a worker transform may normalise itself
        idx_t = torch.arange(start, stop, device=device)
        yield Batch(x.contiguous(memory_format=fmt), labels[start:stop].to(device), idx_t)
