"""Long-tailed subsets of LDAM-DRW (Cao et al., 2019, ``imbalance_cifar.py``), held-out splits, shot groups.

exp: n_c = int(n_max * (1/IF) ** (c / (C - 1))); step: n_max, then int(n_max * (1/IF)) for the last C - C//2.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from longtail.core.errors import DataError
from longtail.core.metrics import shot_groups

PROFILES = ("exp", "step")


def check_imbalance(imbalance_factor: float, profile: str) -> None:
    """DataError naming ``data.imbalance_factor`` / ``data.profile`` when they are invalid."""
    if not (
        isinstance(imbalance_factor, (int, float))
        and math.isfinite(imbalance_factor)
        and imbalance_factor >= 1
    ):
        raise DataError(
            f"data.imbalance_factor is {imbalance_factor!r}, but it must be a number >= 1 (the ratio of "
            f"the largest to the smallest class; 1 = balanced, 100 = the usual CIFAR-LT setting). "
            f"Set data.imbalance_factor to e.g. 100."
        )
    if profile not in PROFILES:
        raise DataError(
            f"data.profile is {profile!r}, but it must be one of {', '.join(PROFILES)}. "
            f"Set data.profile to 'exp' (the usual long-tailed profile) or 'step'."
        )


def img_num_per_cls(
    n_max: int, num_classes: int, imbalance_factor: float, profile: str = "exp"
) -> list[int]:
    """Images per class, head first, with the reference's float order.

    Args:
        n_max: images of the largest class. The reference uses ``len(data) / C`` (5000 for CIFAR-10,
            500 for CIFAR-100); :func:`longtail.data.build_data` passes the smallest per-class count
            available (the same for CIFAR and Fashion-MNIST, 5421 for MNIST) so every class can supply it.
        num_classes: C.
        imbalance_factor: IF = n_max / n_min >= 1 (1 = balanced).
        profile: ``"exp"`` or ``"step"``.

    Returns:
        C counts. exp: ``int(n_max * (1/IF) ** (c / (C - 1)))``; step: first C//2 classes ``int(n_max)``,
        the remaining C - C//2 ``int(n_max * (1/IF))`` (the reference drops the last class when C is odd).
    """
    check_imbalance(imbalance_factor, profile)
    imb = 1.0 / imbalance_factor
    if profile == "exp":
        if num_classes == 1:
            return [int(n_max)]
        return [int(n_max * (imb ** (c / (num_classes - 1.0)))) for c in range(num_classes)]
    head = num_classes // 2
    return [int(n_max)] * head + [int(n_max * imb)] * (num_classes - head)


def longtail_indices(labels: np.ndarray, counts: Sequence[int], seed: int = 0) -> np.ndarray:
    """Select ``counts[c]`` images of every class, exactly like the reference.

    ``rng = np.random.RandomState(seed)`` (the stream of ``np.random.seed(seed)``); for each class c in
    order: ``idx = np.where(labels == c)[0]; rng.shuffle(idx); keep idx[:counts[c]]``.

    Args:
        labels: int [N], the official split's labels.
        counts: length C, images to keep per class.
    Returns:
        int64 [sum(counts)]: positions into ``labels``, grouped by class in class order.
    """
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    chosen = []
    for c, n_c in enumerate(counts):
        idx = np.where(labels == c)[0]
        if n_c > len(idx):
            raise DataError(
                f"Class {c} has only {len(idx)} training images but the long-tailed profile "
                f"asks for {n_c}; lower data.max_per_class or check the dataset files."
            )
        rng.shuffle(idx)
        chosen.append(idx[:n_c])
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)


def heldout_indices(
    labels: np.ndarray, exclude: np.ndarray, per_class: int, seed: int = 1
) -> np.ndarray:
    """Up to ``per_class`` images per class among those not in ``exclude`` (a balanced held-out split).

    Uses its own ``np.random.RandomState(seed)``: for each class c in order, shuffle the class's
    positions not in ``exclude`` (ascending) and keep the first ``per_class``. Classes with fewer spare
    images get fewer (or none). Carve further sets by passing ``exclude = subset ∪ val``.

    Args:
        labels: int [N], the official split's labels.
        exclude: int [M], positions into ``labels`` that must not be chosen.
    Returns:
        int64 [K]: positions into ``labels``, grouped by class in class order; disjoint from ``exclude``.
    """
    labels = np.asarray(labels)
    if per_class < 0:
        raise DataError(f"data.val_per_class is {per_class}, but it must be >= 0.")
    taken = np.zeros(len(labels), dtype=bool)
    taken[np.asarray(exclude, dtype=np.int64)] = True
    rng = np.random.RandomState(seed)
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero((labels == c) & ~taken)
        rng.shuffle(idx)
        chosen.append(idx[:per_class])
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Positions of the first ``per_class`` images of every class in file order -> int64 [K], ascending."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(labels)) - starts  # rank of each image within its class, file order
    return np.sort(order[rank < per_class]).astype(np.int64)


def class_stats(counts: Sequence[int]) -> dict:
    """Summary of a training set's class counts.

    Returns:
        ``num_classes``, ``counts`` (list), ``total``, ``imbalance_factor`` (max / min; ``inf`` if a
        class is empty) and ``groups`` (:func:`shot_groups`).
    """
    counts = [int(n) for n in counts]
    smallest = min(counts) if counts else 0
    ratio = max(counts) / smallest if smallest > 0 else float("inf")
    return {
        "num_classes": len(counts),
        "counts": counts,
        "total": sum(counts),
        "imbalance_factor": ratio,
        "groups": shot_groups(counts),
    }
