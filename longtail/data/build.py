"""build_data: train (full or long-tailed) / balanced held-out val / official test for a dataset name.

``-lt`` names take the LDAM-DRW subset; val uses training images the subset leaves unused; test is the official split.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from longtail.core.errors import DataError
from longtail.core.registry import Registry
from longtail.data import cifar, idx
from longtail.data import meta as meta_set
from longtail.data.longtail import (
    check_imbalance,
    first_per_class,
    heldout_indices,
    img_num_per_cls,
    longtail_indices,
)

DATASET_NAMES = ["cifar10", "cifar100", "mnist", "fashion-mnist"]  # each also with a "-lt" suffix
SPLITS = ("train", "test")

# per-channel normalisation in [0, 1] units (CIFAR: the LDAM-DRW values, used for CIFAR-10 and -100)
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}

# name -> loader(split, root, download) -> (images uint8 [N, C, H, W], labels int64 [N], classes)
DATASETS = Registry("dataset")
for _key in cifar.SPECS:
    DATASETS.register(_key)(partial(cifar.load_cifar, _key))
for _key in idx.SPECS:
    DATASETS.register(_key)(partial(idx.load_idx_dataset, _key))


@dataclass
class ImageSet:
    """Images of one split with their labels and their positions in the official split."""

    images: torch.Tensor  # uint8 [N, C, H, W], contiguous
    labels: torch.Tensor  # int64 [N]
    indices: np.ndarray  # int64 [N]: index of each image into the official split it came from
    classes: list[str]  # class names, length num_classes

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, positions: np.ndarray) -> "ImageSet":
        """The images at ``positions`` (int [K], into this set) -> a new ImageSet of K images."""
        pos = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        return ImageSet(
            images=self.images[pos].contiguous(),
            labels=self.labels[pos].contiguous(),
            indices=self.indices[pos.numpy()],
            classes=list(self.classes),
        )


@dataclass
class DataBundle:
    """Everything a training run needs to know about its data."""

    name: str  # e.g. "cifar10-lt"
    train: ImageSet
    val: ImageSet | None  # balanced held-out split; None if val_per_class == 0 or nothing is spare
    test: ImageSet
    class_counts: list[int]  # training images per class (of `train`)
    mean: tuple[float, ...]  # normalisation per channel, in [0, 1] units
    std: tuple[float, ...]
    in_channels: int
    image_size: int
    meta: ImageSet | None = None  # balanced meta set (data.meta_per_class); longtail.data.meta
    meta_borrowed: list[int] | None = (
        None  # per class: meta images taken out of the training subset
    )
    # data.exclude_classes, resolved: these classes' images were removed from `train` only (the
    # residual set); `class_counts` still holds their counts (shot groups, losses), val/test all
    excluded_classes: tuple[int, ...] = ()


def _all_names() -> str:
    return ", ".join(n + suffix for n in DATASET_NAMES for suffix in ("", "-lt"))


def parse_name(dataset: str) -> tuple[str, bool]:
    """``"cifar10-lt"`` -> ``("cifar10", True)``; DataError listing the valid names otherwise."""
    name = str(dataset).strip().lower()
    base, lt = (name[:-3], True) if name.endswith("-lt") else (name, False)
    if base not in DATASET_NAMES:
        raise DataError(f"Unknown dataset {dataset!r} (data.dataset). Valid names: {_all_names()}.")
    return base, lt


def load_split(name: str, split: str, root: Path | str, download: bool = True) -> ImageSet:
    """The full official ``split`` ("train" | "test") of ``name`` (no ``-lt``); indices = arange(N)."""
    if name not in DATASET_NAMES:
        raise DataError(
            f"Unknown dataset {name!r} for load_split. Valid names: {', '.join(DATASET_NAMES)}."
        )
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r} for {name}: use 'train' or 'test'.")
    images, labels, classes = DATASETS.get(name)(split, Path(root).expanduser(), download)
    return ImageSet(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        indices=np.arange(len(labels), dtype=np.int64),
        classes=classes,
    )


def _check_options(
    max_per_class: int | None, max_test_per_class: int | None, val_per_class: int
) -> None:
    for key, value in (
        ("data.max_per_class", max_per_class),
        ("data.max_test_per_class", max_test_per_class),
    ):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise DataError(
                f"{key} is {value!r}, but it must be a positive integer or null (no cap)."
            )
    if not isinstance(val_per_class, (int, np.integer)) or val_per_class < 0:
        raise DataError(
            f"data.val_per_class is {val_per_class!r}, but it must be an integer >= 0 "
            f"(0 = no validation split)."
        )


def build_data(
    dataset: str,
    root: Path | str,
    *,
    imbalance_factor: float = 100.0,
    profile: str = "exp",
    seed: int = 0,
    max_per_class: int | None = None,
    max_test_per_class: int | None = None,
    val_per_class: int = 200,
    download: bool = True,
    meta_per_class: int = 0,
    meta_from: str = "unused",
    exclude_classes: str | list[int] | None = None,
) -> DataBundle:
    """Build train / val / test for ``dataset`` (one of :data:`DATASET_NAMES`, optionally ``-lt``).

    train: for ``-lt`` names the LDAM-DRW subset with ``n_max = min(images per class)`` (5000 / 500 for
    CIFAR-10 / -100 as in the reference, 5421 for MNIST), selected with ``seed``; otherwise the full
    training split. ``max_per_class`` caps every class count (a debug option; without ``-lt`` the capped
    images are drawn with the same per-class shuffle). val: up to ``val_per_class`` unused training
    images per class, drawn with seed ``seed + 1``. test: the official test split, the first
    ``max_test_per_class`` images of each class in file order if set. meta: ``meta_per_class``
    images per class, never in train / val / test, carved as ``meta_from`` says (``unused`` |
    ``before_subset``; see :mod:`longtail.data.meta`, which also says what happens to a class
    without spare images). ``exclude_classes`` (``"largest"`` or class ids, see
    :func:`resolve_exclude_classes`) then removes those classes' images from train only: val, test
    and ``class_counts`` are those of the whole subset (the residual set of the three-stage
    strategy; a loss that masks those classes needs no prior for them).
    """
    base, lt = parse_name(dataset)
    check_imbalance(imbalance_factor, profile)
    _check_options(max_per_class, max_test_per_class, val_per_class)
    meta_set.check_meta_options(meta_per_class, meta_from)
    full = load_split(base, "train", root, download)
    test = load_split(base, "test", root, download)

    labels = full.labels.numpy()
    num_classes = full.num_classes
    available = np.bincount(labels, minlength=num_classes)
    meta_first = None  # meta_from=before_subset: the meta images leave the pool before the subset
    if meta_per_class > 0 and meta_from == "before_subset":
        meta_first = meta_set.meta_before_subset(
            labels, meta_per_class, seed + meta_set.META_SEED_OFFSET
        )
        available = available - np.bincount(labels[meta_first], minlength=num_classes)
    if lt:
        counts = img_num_per_cls(int(available.min()), num_classes, imbalance_factor, profile)
    else:
        counts = [int(n) for n in available]
    if max_per_class is not None:
        counts = [min(n, max_per_class) for n in counts]
    if meta_first is not None:
        pool = np.setdiff1d(np.arange(len(labels)), meta_first)
        train = full.subset(meta_set.longtail_from_pool(labels, pool, counts, seed))
    elif lt or max_per_class is not None:
        train = full.subset(longtail_indices(labels, counts, seed))
    else:
        train = full

    val = None
    if val_per_class > 0:
        taken = train.indices if meta_first is None else np.concatenate([train.indices, meta_first])
        spare = heldout_indices(labels, taken, val_per_class, seed=seed + 1)
        val = full.subset(spare) if len(spare) else None
    meta, meta_borrowed = None, None
    if meta_per_class > 0:
        if meta_first is not None:
            meta_pos, borrowed = meta_first, np.zeros(0, dtype=np.int64)
        else:
            meta_pos, borrowed = meta_set.meta_from_unused(
                labels,
                train.indices,
                None if val is None else val.indices,
                meta_per_class,
                seed + meta_set.META_SEED_OFFSET,
            )
        meta = full.subset(meta_pos)
        meta_borrowed = np.bincount(labels[borrowed], minlength=num_classes).tolist()
        if len(borrowed):
            train = train.subset(np.flatnonzero(~np.isin(train.indices, borrowed)))
            meta_set.warn_borrowed(f"{base}-lt" if lt else base, meta_per_class, meta_borrowed)
    if max_test_per_class is not None:
        test = test.subset(first_per_class(test.labels.numpy(), max_test_per_class))

    mean, std = NORMALIZATION[base]
    class_counts = np.bincount(train.labels.numpy(), minlength=num_classes).tolist()
    excluded = resolve_exclude_classes(exclude_classes, class_counts)
    if excluded:  # the residual set: after val / meta were drawn, so those stay as without it
        train = train.subset(np.flatnonzero(~np.isin(train.labels.numpy(), excluded)))
    return DataBundle(
        name=f"{base}-lt" if lt else base,
        train=train,
        val=val,
        test=test,
        class_counts=class_counts,
        mean=mean,
        std=std,
        in_channels=int(full.images.shape[1]),
        image_size=int(full.images.shape[-1]),
        meta=meta,
        meta_borrowed=meta_borrowed,
        excluded_classes=tuple(excluded),
    )


def resolve_exclude_classes(spec: str | list[int] | None, class_counts: list[int]) -> list[int]:
    """``data.exclude_classes`` as sorted class ids: ``"largest"`` = argmax n_c (the lowest id on a
    tie; class 0 of a CIFAR-LT subset), a list = those ids, None = none. DataError if an id is out
    of range or nothing would be left to train on."""
    if spec is None:
        return []
    num_classes = len(class_counts)
    if spec == "largest":
        ids = [int(np.argmax(class_counts))]
    elif isinstance(spec, (list, tuple)) and all(
        isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in spec
    ):
        ids = sorted({int(c) for c in spec})
        bad = [c for c in ids if not 0 <= c < num_classes]
        if bad:
            raise DataError(
                f"data.exclude_classes names class {bad[0]}, but the dataset has classes "
                f"0..{num_classes - 1}. Use ids in that range, 'largest' or null."
            )
    else:
        raise DataError(
            f"data.exclude_classes is {spec!r}; use 'largest', a list of class ids "
            f"(e.g. [0, 1]) or null."
        )
    if not any(n for c, n in enumerate(class_counts) if c not in ids):
        raise DataError(
            f"data.exclude_classes={spec!r} removes every training image; keep at least one class."
        )
    return ids
