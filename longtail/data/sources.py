"""Data bundles of image sets on disk: split-file benchmarks (ImageNet-LT, Places-LT,
iNaturalist-2018) and class-folder trees, streamed by worker processes or, when small and of one
size, decoded once into memory (the path of the built-in sets).

``build_bundle(cfg.data, root)`` is the one entry point: a built-in name goes to
:func:`longtail.data.build.build_data`, a file dataset (``imagenet-lt``, ``places-lt``,
``inat2018``, ``folder:PATH``, ``folder-lt:PATH``) is read here. A streamed set's ``images`` is a
:class:`~longtail.data.stream.FileBatches` (the decoder of its files), which the train loader and
the evaluation take in place of an in-memory tensor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import torch

from longtail.core.config import DataConfig
from longtail.core.errors import DataError
from longtail.data import files as file_sets
from longtail.data.build import DataBundle, ImageSet, build_data, resolve_exclude_classes
from longtail.data.longtail import first_per_class
from longtail.data.stream import FileBatches, decode
from longtail.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_pipeline

LT_FOLDER_PREFIX = "folder-lt:"  # a class-folder tree cut to a long-tailed subset
MEMORY_LIMIT = 2 << 30  # bytes: a set of one image size up to this is decoded once into memory


@dataclass(eq=False)
class StreamSet:
    """A split on disk: ``images`` decodes its files (a FileBatches), ``labels`` int64 [N]."""

    images: FileBatches
    labels: torch.Tensor
    indices: np.ndarray
    classes: List[str]
    listing: file_sets.FileImageSet

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def is_file_dataset(name: str) -> bool:
    return file_sets.is_file_dataset(name) or str(name).startswith(LT_FOLDER_PREFIX)


def _splits(d: DataConfig, root: Path) -> file_sets.FileSplits:
    name = d.dataset
    if name.startswith(LT_FOLDER_PREFIX) or name.startswith(file_sets.FOLDER_PREFIX):
        lt = name.startswith(LT_FOLDER_PREFIX)
        folder = Path(name.split(":", 1)[1]).expanduser()
        splits = file_sets.folder_splits(
            folder,
            split_file=d.split_file,
            val_file=d.val_file,
            test_root=d.test_root,
            val_per_class=d.val_per_class,
            seed=d.subset_seed,
            imbalance_factor=d.imbalance_factor if lt else None,
            profile=d.profile,
        )
        if d.test_file is not None:
            splits.test = file_sets.read_folder_split(folder, d.test_file, splits.train.num_classes)
            splits.test.classes = list(splits.train.classes)
        return splits
    return file_sets.load_file_splits(name, root, d.split_dir)


def _capped(listing: file_sets.FileImageSet, per_class: Optional[int]) -> file_sets.FileImageSet:
    if per_class is None:
        return listing
    return listing.subset(first_per_class(listing.labels, per_class))


def _decoder(listing: file_sets.FileImageSet, d: DataConfig, seed: int, train: bool) -> Any:
    name, params = (
        (d.transform, d.transform_params) if train else (d.eval_transform, d.eval_transform_params)
    )
    return FileBatches(
        listing.root,
        listing.paths,
        transform=None if name is None else build_pipeline(name, **params),
        seed=seed,
        draft=d.decode_draft,
        num_workers=d.num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def _in_memory(listing: file_sets.FileImageSet, d: DataConfig) -> Optional[ImageSet]:
    """The whole split decoded into one uint8 tensor, where that is what ``data.in_memory``
    asks (auto: no transform, and the first image's size x N within MEMORY_LIMIT)."""
    if d.in_memory is False or d.transform is not None or d.eval_transform is not None:
        if d.in_memory:
            raise DataError(
                "data.in_memory=true takes images of one size, untransformed: drop "
                "data.transform / data.eval_transform, or set data.in_memory=false."
            )
        return None
    if not len(listing):
        return None
    first = decode(listing.file(0))
    size = len(listing) * len(first.getbands()) * first.size[0] * first.size[1]
    if d.in_memory is None and size > MEMORY_LIMIT:
        return None
    files = FileBatches(listing.root, listing.paths, num_workers=d.num_workers)
    chunks = [np.arange(a, min(a + 512, len(listing))) for a in range(0, len(listing), 512)]
    images = torch.cat(list(files.batches(0, chunks, chunks)))
    return ImageSet(
        images=images.contiguous(),
        labels=torch.from_numpy(listing.labels.copy()),
        indices=listing.indices.copy(),
        classes=list(listing.classes),
    )


def _check_present(listing: file_sets.FileImageSet) -> None:
    """Every listed file exists (a stat each, no decoding), else a DataError naming the first
    missing ones before anything is trained or written."""
    missing = [i for i in range(len(listing)) if not listing.file(i).exists()]
    if missing:
        shown = ", ".join(
            f"{listing.paths[i]} (image {int(listing.indices[i]) + 1} of {listing.source})"
            for i in missing[:3]
        )
        raise DataError(
            f"{len(missing)} of {len(listing)} listed images are missing under {listing.root}: "
            f"{shown}{' ...' if len(missing) > 3 else ''}. Check the data root (--data-root) "
            f"and run `longtail data check` for the full list."
        )


def _split_set(
    listing: Optional[file_sets.FileImageSet], d: DataConfig, seed: int, train: bool
) -> Any:
    if listing is None:
        return None
    _check_present(listing)
    memory = _in_memory(listing, d)
    if memory is not None:
        return memory
    return StreamSet(
        images=_decoder(listing, d, seed, train),
        labels=torch.from_numpy(listing.labels.copy()),
        indices=listing.indices.copy(),
        classes=list(listing.classes),
        listing=listing,
    )


def build_bundle(d: DataConfig, root: Path | str, seed: int = 0) -> DataBundle:
    """The data of a run: a built-in dataset (in memory) or a file dataset (streamed, or decoded
    into memory when small); ``seed`` keys the per-sample augmentation of a streamed set."""
    if not is_file_dataset(d.dataset):
        bundle = build_data(
            d.dataset,
            root,
            imbalance_factor=d.imbalance_factor,
            profile=d.profile,
            seed=d.subset_seed,
            max_per_class=d.max_per_class,
            max_test_per_class=d.max_test_per_class,
            val_per_class=d.val_per_class,
            meta_per_class=d.meta_per_class,
            meta_from=d.meta_from,
            exclude_classes=d.exclude_classes,
        )
        if d.mean is not None or d.std is not None:  # e.g. a pretrained backbone's statistics
            bundle = dataclasses.replace(
                bundle,
                mean=tuple(d.mean or bundle.mean),
                std=tuple(d.std or bundle.std),
            )
        return bundle
    if d.meta_per_class:
        raise DataError(
            f"data.meta_per_class is not supported for the file dataset {d.dataset} yet: "
            f"use a built-in dataset for the meta-learning recipes."
        )
    splits = _splits(d, Path(root).expanduser())
    train = _capped(splits.train, d.max_per_class)
    if splits.test is None:
        raise DataError(
            f"{d.dataset} has no test split: give a test tree (data.test_root) or a split file."
        )
    test = _capped(splits.test, d.max_test_per_class)
    class_counts = np.bincount(train.labels, minlength=train.num_classes).tolist()
    excluded = resolve_exclude_classes(d.exclude_classes, class_counts)
    if excluded:
        train = train.subset(np.flatnonzero(~np.isin(train.labels, excluded)))
    train_set = _split_set(train, d, seed, train=True)
    test_set = _split_set(test, d, seed, train=False)
    if splits.val is test:  # iNaturalist-2018 reports on its val split: one object, one decoder
        val_set = test_set
    else:
        val_set = _split_set(splits.val, d, seed, train=False)
    if isinstance(train_set, ImageSet):
        in_channels, image_size = int(train_set.images.shape[1]), int(train_set.images.shape[-1])
    else:
        in_channels, image_size = 3, int(d.transform_params.get("size", 224))
    grey = in_channels == 1
    mean = d.mean or ((0.5,) if grey else IMAGENET_MEAN)
    std = d.std or ((0.25,) if grey else IMAGENET_STD)
    return DataBundle(
        name=splits.name,
        train=train_set,
        val=val_set,
        test=test_set,
        class_counts=class_counts,
        mean=tuple(mean),
        std=tuple(std),
        in_channels=in_channels,
        image_size=image_size,
        excluded_classes=tuple(excluded),
    )
