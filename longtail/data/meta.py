"""A small balanced *meta set* carved from the training split, and a loader that cycles through it.

``data.meta_per_class: k`` puts k images of every class in ``DataBundle.meta``, from the official
training split, disjoint from the training subset and ``val``. ``data.meta_from``: ``unused``
(default, our choice: the LDAM-DRW subset is kept and a class short of spare images borrows from
it, ``DataBundle.meta_borrowed``) or ``before_subset`` (the Meta-Weight-Net protocol).
:class:`MetaLoader` serves meta batches that are a pure function of ``(seed, step)``.
Details, seeds and reasons: docs/methods/meta.md.
"""

from __future__ import annotations

import warnings
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from longtail.core.errors import DataError
from longtail.data.augment import AugmentParams, normalize, random_crop_flip, sample_params
from longtail.data.loader import Batch
from longtail.data.longtail import heldout_indices, longtail_indices

META_FROM = ("unused", "before_subset")
META_SEED_OFFSET = 2  # val uses subset_seed + 1, the meta set subset_seed + 2


def check_meta_options(meta_per_class: int, meta_from: str) -> None:
    if (
        not isinstance(meta_per_class, (int, np.integer))
        or isinstance(meta_per_class, bool)
        or meta_per_class < 0
    ):
        raise DataError(
            f"data.meta_per_class is {meta_per_class!r}, but it must be an integer >= 0 "
            f"(0 = no meta set; 10 = the MW-Net / MFM protocol)."
        )
    if meta_from not in META_FROM:
        raise DataError(
            f"data.meta_from is {meta_from!r}, but it must be one of {', '.join(META_FROM)}."
        )


def meta_before_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """``data.meta_from=before_subset``: ``per_class`` images of every class from the whole split.

    Returns int64 [C * per_class] positions into ``labels`` (grouped by class, class order).
    DataError if a class has fewer than ``per_class + 1`` images (nothing would be left to train).
    """
    labels = np.asarray(labels)
    chosen = heldout_indices(labels, np.zeros(0, dtype=np.int64), per_class, seed=seed)
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    total = np.bincount(labels, minlength=num_classes)
    short = [c for c in range(num_classes) if total[c] <= per_class]
    if short:
        raise DataError(
            f"data.meta_per_class={per_class} with data.meta_from=before_subset leaves no "
            f"training image for class(es) {short} (they have {total[short].tolist()}). "
            f"Lower data.meta_per_class."
        )
    return chosen


def longtail_from_pool(
    labels: np.ndarray, pool: np.ndarray, counts: Sequence[int], seed: int
) -> np.ndarray:
    """:func:`longtail_indices` restricted to the positions ``pool`` (ascending) -> positions into
    ``labels``: per class, the ``pool`` positions of the class in ascending order, shuffled with
    ``RandomState(seed)`` in class order, the first ``counts[c]`` kept."""
    pool = np.sort(np.asarray(pool, dtype=np.int64))
    return pool[longtail_indices(np.asarray(labels)[pool], counts, seed)]


def meta_from_unused(
    labels: np.ndarray, subset: np.ndarray, val: Optional[np.ndarray], per_class: int, seed: int
) -> Tuple[np.ndarray, np.ndarray]:
    """``data.meta_from=unused``: ``per_class`` images of every class not in ``subset ∪ val``,
    topped up from ``subset`` where a class has too few spare images.

    Args:
        labels: int [N] labels of the official training split.
        subset: int [M] positions of the training subset (grouped by class, in its order).
        val: int [V] positions of the val split, or None.
    Returns:
        (meta, borrowed): int64 positions into ``labels``. ``meta`` holds ``per_class`` images of
        every class (grouped by class, class order: the spare ones first, then the borrowed ones);
        ``borrowed`` (a subset of ``meta``) are the positions taken from ``subset``: for a class
        short of ``s`` images, its last ``s`` images in ``subset`` order. DataError if a class
        would keep no training image.
    """
    labels = np.asarray(labels)
    subset = np.asarray(subset, dtype=np.int64)
    exclude = subset if val is None else np.concatenate([subset, np.asarray(val, dtype=np.int64)])
    spare = heldout_indices(labels, exclude, per_class, seed=seed)
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    meta, borrowed, starved = [], [], []
    for c in range(num_classes):
        mine = spare[labels[spare] == c]
        missing = per_class - len(mine)
        if missing > 0:
            in_subset = subset[labels[subset] == c]
            if len(in_subset) <= missing:
                starved.append((c, len(mine), len(in_subset)))
                continue
            take = in_subset[len(in_subset) - missing :]
            borrowed.append(take)
            mine = np.concatenate([mine, take])
        meta.append(mine)
    if starved:
        listed = ", ".join(f"class {c} ({s} spare, {n} in training)" for c, s, n in starved)
        raise DataError(
            f"data.meta_per_class={per_class}: {listed} cannot give {per_class} meta images "
            f"and keep a training image. Lower data.meta_per_class or data.val_per_class."
        )

    def cat(parts):
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    return cat(meta), cat(borrowed)


def warn_borrowed(dataset: str, per_class: int, borrowed_per_class: Sequence[int]) -> None:
    classes = [c for c, n in enumerate(borrowed_per_class) if n]
    if not classes:
        return
    shown = ", ".join(f"{c}: {borrowed_per_class[c]}" for c in classes[:12])
    more = f" and {len(classes) - 12} more classes" if len(classes) > 12 else ""
    warnings.warn(
        f"meta set of {dataset}: {len(classes)} class(es) have fewer than data.meta_per_class="
        f"{per_class} training images outside the long-tailed subset and val, so {sum(borrowed_per_class)} "
        f"meta images were taken OUT OF THE TRAINING SUBSET (class: images {shown}{more}); those "
        f"classes train on fewer images than the standard subset. Use data.meta_from=before_subset "
        f"for the MW-Net protocol (meta images removed before imbalancing).",
        UserWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------------------------------
# loader


def _meta_generator(seed: int, a: int, stream: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(
        int(np.random.SeedSequence([int(seed), int(a), int(stream), 0x3E7A]).generate_state(1)[0])
    )
    return g


class MetaLoader:
    """Endless, deterministic batches of a (small) meta set.

    The stream of meta images is perm_0 ++ perm_1 ++ ... where perm_e is a random permutation of
    the meta set drawn from ``(seed, e)``; global batch ``step`` is items ``[step*B, (step+1)*B)``
    of the stream (a batch larger than the meta set spans several permutations), so every image
    appears once per meta epoch and ``batch(step)`` depends on nothing but ``(seed, step)``.

    Args:
        images: uint8 [N, C, H, W] (moved to ``device`` once); labels: int64 [N].
        batch_size: the global meta batch (default 100, MW-Net / MFM).
        mean, std: the *training* normalisation (``DataBundle.mean`` / ``.std``).
        augment: random crop (``padding``) + flip as in training, drawn from ``(seed, step)``;
            off by default (the meta set is a clean, balanced target).
        rank, world_size: under DDP each rank gets its contiguous share of the global batch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int = 100,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        *,
        device: torch.device = torch.device("cpu"),
        seed: int = 0,
        augment: bool = False,
        padding: int = 4,
        flip: bool = True,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ):
        if len(labels) == 0:
            raise DataError(
                "The meta set is empty: set data.meta_per_class (e.g. 10) for a method "
                "that learns on a meta set."
            )
        if batch_size < world_size or batch_size < 1:
            raise ValueError(
                f"meta batch size {batch_size} must be >= the number of processes ({world_size})."
            )
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = int(batch_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.device = device
        self.seed, self.augment, self.padding, self.flip = int(seed), bool(augment), padding, flip
        self.rank, self.world_size = rank, world_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._perms: Dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        """Images in the meta set."""
        return int(self.labels.shape[0])

    def permutation(self, meta_epoch: int) -> torch.Tensor:
        """int64 [N]: the order of meta epoch ``meta_epoch`` (a few recent ones are cached)."""
        perm = self._perms.get(meta_epoch)
        if perm is None:
            perm = torch.randperm(len(self), generator=_meta_generator(self.seed, meta_epoch, 1))
            if len(self._perms) >= 4:
                self._perms.pop(min(self._perms))
            self._perms[meta_epoch] = perm
        return perm

    def positions(self, step: int) -> torch.Tensor:
        """int64 [B]: positions into the meta set of global meta batch ``step`` (all ranks)."""
        n = len(self)
        stream = torch.arange(
            step * self.batch_size, (step + 1) * self.batch_size, dtype=torch.long
        )
        epochs, offsets = stream // n, stream % n
        out = torch.empty_like(stream)
        for e in torch.unique(epochs).tolist():
            mask = epochs == e
            out[mask] = self.permutation(int(e))[offsets[mask]]
        return out

    def batch(self, step: int) -> Batch:
        """This rank's share of global meta batch ``step``: normalised (and augmented if asked)."""
        b, w, r = self.batch_size, self.world_size, self.rank
        lo, hi = (b * r) // w, (b * (r + 1)) // w
        idx = self.positions(step)[lo:hi].to(self.device)
        x = self.images.index_select(0, idx)
        if self.augment:
            params = sample_params(b, self.padding, self.flip, _meta_generator(self.seed, step, 2))
            x = random_crop_flip(
                x, AugmentParams(params.offsets[lo:hi], params.flips[lo:hi]), self.padding
            )
        x = normalize(x, self.mean, self.std).contiguous(memory_format=self.memory_format)
        return Batch(x, self.labels.index_select(0, idx), idx)

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        """``batch(start_step), batch(start_step + 1), ...`` forever."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1


def build_meta_loader(
    data,
    cfg,
    device: torch.device,
    *,
    batch_size: int = 100,
    augment: bool = False,
    rank: int = 0,
    world_size: int = 1,
    seed: Optional[int] = None,
) -> MetaLoader:
    """A :class:`MetaLoader` over ``data.meta`` (a DataBundle) with the run's normalisation, crop
    padding / flip settings (used only when ``augment``), memory format and seed (``cfg.seed``)."""
    if data.meta is None or len(data.meta) == 0:
        raise DataError(
            "This method learns on a balanced meta set, but the run has none: set "
            "data.meta_per_class (e.g. 10; data.meta_from=unused|before_subset)."
        )
    return MetaLoader(
        data.meta.images,
        data.meta.labels,
        batch_size,
        data.mean,
        data.std,
        device=device,
        seed=cfg.seed if seed is None else seed,
        augment=augment,
        padding=cfg.data.crop_padding,
        flip=cfg.data.flip,
        rank=rank,
        world_size=world_size,
        channels_last=cfg.train.channels_last,
    )
