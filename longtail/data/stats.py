"""``longtail data stats`` / ``split`` / ``check``: class statistics, split export, image check.

Statistics of a long-tailed profile need only the official per-class counts (no download);
the exported split lists the selected training images as ``index label`` lines. File datasets
(ImageNet-LT, Places-LT, iNaturalist-2018, ``folder:PATH``; :mod:`longtail.data.files`) are
counted from their split files or folder scan, and ``check`` opens every listed image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from longtail.core.errors import DataError
from longtail.data.files import (
    FOLDER_PREFIX,
    CheckReport,
    FileImageSet,
    check_files,
    file_dataset_spec,
    listing_stats,
    load_file_split,
    longtail_subset,
    read_folder_split,
    scan_folder,
)
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


# ------------------------------------------------------------------------ file datasets (files.py)
def file_listings(
    dataset: str,
    splits: Optional[List[str]] = None,
    *,
    data_root: Optional[str] = None,
    split_dir: Optional[str] = None,
    split_file: Optional[str] = None,
) -> List[Tuple[str, FileImageSet]]:
    """(label, listing) of each split of a file dataset, for the CLI.

    A registered name reads ``split_dir`` (default ``data_root``; one of them is required, the
    environment's data root is the small datasets' and is not used), ``splits`` default all (a
    file two splits share, read once). ``folder:PATH``: one listing, the scan of PATH or
    ``split_file``; ``splits`` / ``data_root`` / ``split_dir`` do not apply.
    """
    name = dataset.strip()
    if name.startswith(FOLDER_PREFIX):
        folder = name[len(FOLDER_PREFIX) :]
        if not folder:
            raise DataError(f"{dataset!r}: give the folder, e.g. {FOLDER_PREFIX}/data/flowers.")
        if splits or data_root or split_dir:
            raise DataError(
                f"{dataset} is one listing (the class folders under {folder}, or --split-file); "
                f"--split, --data-root and --split-dir apply to imagenet-lt, places-lt and "
                f"inat2018 only. Drop them."
            )
        data = scan_folder(folder) if split_file is None else read_folder_split(folder, split_file)
        return [(dataset if split_file is None else f"{dataset} ({split_file})", data)]
    if split_file is not None:
        raise DataError(
            f"--split-file is for {FOLDER_PREFIX}PATH datasets; {dataset} reads its published "
            f"split files from --split-dir."
        )
    spec = file_dataset_spec(name)
    if data_root is None and split_dir is None:
        first = next(iter(spec.split_files.values()))
        raise DataError(
            f"{spec.title} needs its split files: give --split-dir DIR (the folder holding "
            f"{first} and the others) or --data-root DIR (the image root, when they lie there)."
        )
    root = Path(data_root if data_root is not None else str(split_dir)).expanduser()
    out: List[Tuple[str, FileImageSet]] = []
    seen: Dict[str, str] = {}
    for split in splits or list(spec.split_files):
        fname = spec.split_files.get(split)
        if fname in seen:
            continue
        data = load_file_split(spec.name, split, root, split_dir)
        seen[str(fname)] = split
        out.append((f"{spec.name} {split}", data))
    return out


def export_file_split(
    dataset: str,
    out: Path,
    *,
    split: Optional[str] = None,
    imbalance_factor: Optional[float] = None,
    profile: Optional[str] = None,
    data_root: Optional[str] = None,
    split_dir: Optional[str] = None,
    split_file: Optional[str] = None,
) -> int:
    """Write one split of a file dataset as 'relative/path label' lines (the split-file format):
    a folder's scan, or its long-tailed subset with ``imbalance_factor`` (seed 0, as
    ``folder-lt:PATH`` trains it); a benchmark's split as its published file lists it."""
    from longtail.core.io import atomic_write_text

    is_folder = dataset.strip().startswith(FOLDER_PREFIX)
    if not is_folder and (imbalance_factor is not None or profile is not None):
        raise DataError(
            f"{dataset} is long-tailed as published: --imbalance-factor / --profile apply to "
            f"{FOLDER_PREFIX}PATH datasets only."
        )
    ((_, data),) = file_listings(
        dataset,
        None if is_folder else [split or "train"],
        data_root=data_root,
        split_dir=split_dir,
        split_file=split_file,
    )
    if is_folder and imbalance_factor is not None:
        data = longtail_subset(data, imbalance_factor, profile or "exp")
    atomic_write_text(
        out, "".join(f"{data.paths[i]} {int(data.labels[i])}\n" for i in range(len(data)))
    )
    return len(data)


def file_dataset_stats(
    dataset: str,
    split: Optional[str] = None,
    *,
    data_root: Optional[str] = None,
    split_dir: Optional[str] = None,
    split_file: Optional[str] = None,
    imbalance_factor: Optional[float] = None,
    profile: Optional[str] = None,
) -> Dict[str, Any]:
    """:func:`longtail.data.files.listing_stats` of one split (default ``train``), plus
    ``dataset``, ``split`` and ``source`` (the file read). ``imbalance_factor`` / ``profile``
    (``folder:PATH`` only): the stats of its long-tailed subset
    (:func:`longtail.data.files.longtail_subset`, seed 0)."""
    folder = dataset.strip().startswith(FOLDER_PREFIX)
    lt = imbalance_factor is not None or profile is not None
    if lt and not folder:
        raise DataError(
            f"--imbalance-factor / --profile build a long-tailed subset of cifar10, cifar100, "
            f"mnist, fashion-mnist or {FOLDER_PREFIX}PATH; {dataset} is long-tailed as "
            f"published. Drop them."
        )
    splits = None if folder and split is None else [split or "train"]
    ((label, data),) = file_listings(
        dataset, splits, data_root=data_root, split_dir=split_dir, split_file=split_file
    )
    if lt:
        data = longtail_subset(
            data, 100.0 if imbalance_factor is None else imbalance_factor, profile or "exp"
        )
    return {
        "dataset": dataset,
        "split": None if folder else (split or "train"),
        "source": data.source,
        **listing_stats(data),
    }


def check_dataset(
    dataset: str,
    splits: Optional[List[str]] = None,
    *,
    data_root: Optional[str] = None,
    split_dir: Optional[str] = None,
    split_file: Optional[str] = None,
    workers: Optional[int] = None,
    decode: bool = True,
    progress=None,
) -> List[Tuple[str, CheckReport]]:
    """:func:`longtail.data.files.check_files` on every listing of :func:`file_listings`; the
    image root (``data_root``) is required for a registered dataset. ``progress(label, total)``
    returns the per-chunk callback of one listing (or None)."""
    if not dataset.strip().startswith(FOLDER_PREFIX) and data_root is None:
        raise DataError(
            f"data check {dataset} opens the images: give --data-root DIR, the folder the split "
            f"files' paths are relative to (and --split-dir if the split files lie elsewhere)."
        )
    out = []
    for label, data in file_listings(
        dataset, splits, data_root=data_root, split_dir=split_dir, split_file=split_file
    ):
        tick = progress(label, len(data)) if progress is not None else None
        out.append((label, check_files(data, workers=workers, decode=decode, progress=tick)))
    return out
