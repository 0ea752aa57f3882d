"""``longtail data stats`` and ``longtail data split``: class statistics and split export.

Statistics of a long-tailed profile need only the official per-class counts (no download);
the exported split lists the selected training images as ``index label`` lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from longtail.core.errors import DataError
from longtail.data.longtail import class_stats, img_num_per_cls, longtail_indices

# Official training images per class.
OFFICIAL_TRAIN_COUNTS: Dict[str, List[int]] = {
    "cifar10": [5000] * 10,
    "cifar100": [500] * 100,
    "mnist": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    "fashion-mnist": [6000] * 10,
}


def _parse(name: str):
    base, lt = (name[:-3], True) if name.endswith("-lt") else (name, False)
    if base not in OFFICIAL_TRAIN_COUNTS:
        valid = ", ".join(f"{n}, {n}-lt" for n in OFFICIAL_TRAIN_COUNTS)
        raise DataError(f"Unknown dataset {name!r}. Valid names: {valid}.")
    return base, lt


def subset_counts(name: str, imbalance_factor: float = 100.0, profile: str = "exp") -> List[int]:
    base, lt = _parse(name)
    official = OFFICIAL_TRAIN_COUNTS[base]
    if not lt:
        return list(official)
    return img_num_per_cls(min(official), len(official), imbalance_factor, profile)


def dataset_stats(
    name: str,
    imbalance_factor: float = 100.0,
    profile: str = "exp",
    data_root: Optional[str] = None,
) -> Dict[str, Any]:
    """num_classes, counts, total, imbalance_factor, groups (many/medium/few class ids)."""
    stats = class_stats(subset_counts(name, imbalance_factor, profile))
    return {"dataset": name, **stats}


def export_split(
    name: str,
    out: Path,
    imbalance_factor: float = 100.0,
    profile: str = "exp",
    data_root: Optional[str] = None,
) -> int:
    """Write the training subset as 'index label' lines (index into the official training set)."""
    # imported here, not at the top: `longtail data stats` needs no torch (a second faster)
    from longtail.core.io import atomic_write_text
    from longtail.data.build import load_split
    from longtail.data.paths import resolve_data_root

    base, lt = _parse(name)
    train = load_split(base, "train", resolve_data_root(data_root))
    labels = train.labels.numpy()
    if lt:
        idx = longtail_indices(labels, subset_counts(name, imbalance_factor, profile), seed=0)
    else:
        idx = np.arange(len(labels))
    atomic_write_text(out, "".join(f"{int(i)} {int(labels[i])}\n" for i in idx))
    return len(idx)
