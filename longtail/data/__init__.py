"""Data layer: CIFAR-10/100 (pickled archives), MNIST / Fashion-MNIST (idx), long-tailed subsets (LDAM-DRW).

exp profile: n_c = int(n_max * (1/IF) ** (c / (C - 1))); see :mod:`longtail.data.longtail` and :func:`build_data`.
"""

from longtail.data.build import DATASET_NAMES, DataBundle, ImageSet, build_data, load_split
from longtail.data.longtail import (
    class_stats,
    heldout_indices,
    img_num_per_cls,
    longtail_indices,
    shot_groups,
)
from longtail.data.paths import resolve_data_root

__all__ = [
    "DATASET_NAMES",
    "DataBundle",
    "ImageSet",
    "build_data",
    "load_split",
    "class_stats",
    "heldout_indices",
    "img_num_per_cls",
    "longtail_indices",
    "shot_groups",
    "resolve_data_root",
]
