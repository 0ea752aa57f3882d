"""Tests for long-tailed profiles, the LDAM-DRW subset selection, held-out carving and shot groups."""

from __future__ import annotations

import numpy as np
import pytest
from reference_lt import reference_subset

from longtail.core.errors import DataError
from longtail.data import (
    class_stats,
    heldout_indices,
    img_num_per_cls,
    longtail_indices,
    shot_groups,
)
from longtail.data.longtail import first_per_class

CIFAR10_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
CIFAR10_IF50 = [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]
CIFAR10_IF10 = [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]


def fake_labels(num_classes: int, per_class: int, seed: int = 123) -> np.ndarray:
    """Labels with the real CIFAR layout: per_class of each class, in a shuffled file order."""
    return np.random.RandomState(seed).permutation(np.repeat(np.arange(num_classes), per_class))


@pytest.mark.parametrize(
    "factor, expected", [(100, CIFAR10_IF100), (50, CIFAR10_IF50), (10, CIFAR10_IF10)]
)
def test_cifar10_exp_counts(factor, expected):
    assert img_num_per_cls(5000, 10, factor, "exp") == expected


@pytest.mark.parametrize(
    "factor, total, many, medium, few",
    [(100, 10_847, 35, 35, 30), (50, 12_608, 41, 41, 18), (10, 19_573, 69, 31, 0)],
)
def test_cifar100_exp_counts(factor, total, many, medium, few):
    counts = img_num_per_cls(500, 100, factor, "exp")
    assert counts[0] == 500 and counts[-1] == 500 // factor
    assert sum(counts) == total
    groups = shot_groups(counts)
    assert (len(groups["many"]), len(groups["medium"]), len(groups["few"])) == (many, medium, few)
    assert counts == sorted(counts, reverse=True)


def test_cifar10_totals_and_groups():
    assert sum(img_num_per_cls(5000, 10, 100.0)) == 12_406
    assert sum(img_num_per_cls(5000, 10, 50.0)) == 13_996
    assert sum(img_num_per_cls(5000, 10, 10.0)) == 20_431
    assert shot_groups(CIFAR10_IF100) == {
        "many": [0, 1, 2, 3, 4, 5, 6, 7],
        "medium": [8, 9],
        "few": [],
    }


@pytest.mark.parametrize(
    "classes, n_max, factor, expected",
    [
        (10, 5000, 100, [5000] * 5 + [50] * 5),
        (10, 5000, 50, [5000] * 5 + [100] * 5),
        (10, 5000, 10, [5000] * 5 + [500] * 5),
        (100, 500, 100, [500] * 50 + [5] * 50),
        (100, 500, 50, [500] * 50 + [10] * 50),
        (100, 500, 10, [500] * 50 + [50] * 50),
        (5, 100, 10, [100, 100, 10, 10, 10]),
    ],
)
def test_step_counts(classes, n_max, factor, expected):
    assert img_num_per_cls(n_max, classes, factor, "step") == expected


def test_balanced_and_invalid_options():
    assert img_num_per_cls(5421, 10, 1.0) == [5421] * 10
    assert img_num_per_cls(5421, 10, 1.0, "step") == [5421] * 10
    with pytest.raises(DataError, match="data.imbalance_factor"):
        img_num_per_cls(5000, 10, 0.5)
    with pytest.raises(DataError, match="data.profile"):
        img_num_per_cls(5000, 10, 100, "linear")


@pytest.mark.parametrize(
    "classes, per_class, factor, seed",
    [(10, 5000, 0.01, 0), (100, 500, 0.01, 0), (10, 5000, 0.1, 3)],
)
def test_subset_matches_reference_index_for_index(classes, per_class, factor, seed):
    labels = fake_labels(classes, per_class)
    counts = img_num_per_cls(per_class, classes, 1 / factor)
    ours = longtail_indices(labels, counts, seed=seed)
    ref = reference_subset(labels, per_class, classes, factor, rand_number=seed)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref)
    assert np.bincount(labels[ours], minlength=classes).tolist() == counts
    assert len(np.unique(ours)) == len(ours)


def test_subset_depends_on_seed_and_cap():
    labels = fake_labels(10, 500)
    counts = img_num_per_cls(500, 10, 10)
    a, b = longtail_indices(labels, counts, 0), longtail_indices(labels, counts, 1)
    assert not np.array_equal(a, b)
    with pytest.raises(DataError, match="Class 0 has only 500"):
        longtail_indices(labels, [501] + counts[1:], 0)


def test_heldout_disjoint_balanced_and_general():
    labels = fake_labels(10, 5000)
    subset = longtail_indices(labels, CIFAR10_IF100, 0)
    val = heldout_indices(labels, subset, 200)
    assert not set(val.tolist()) & set(subset.tolist())
    # class 0 uses all of its 5000 images: nothing to spare; every other class gets exactly 200
    assert np.bincount(labels[val], minlength=10).tolist() == [0] + [200] * 9
    np.testing.assert_array_equal(val, heldout_indices(labels, subset, 200, seed=1))
    assert not np.array_equal(val, heldout_indices(labels, subset, 200, seed=2))
    # a further set carved with exclude = subset ∪ val is disjoint from both
    meta = heldout_indices(labels, np.concatenate([subset, val]), 10, seed=2)
    assert not set(meta.tolist()) & (set(subset.tolist()) | set(val.tolist()))
    assert np.bincount(labels[meta], minlength=10).tolist() == [0] + [10] * 9


def test_heldout_partial_classes():
    labels = np.array([0, 0, 0, 1, 1, 2])
    val = heldout_indices(labels, np.array([0, 3, 5]), 5)
    assert sorted(val.tolist()) == [1, 2, 4]


def test_first_per_class_keeps_file_order():
    labels = np.array([2, 0, 2, 1, 0, 2, 0, 1])
    np.testing.assert_array_equal(first_per_class(labels, 2), [0, 1, 2, 3, 4, 7])
    np.testing.assert_array_equal(first_per_class(labels, 1), [0, 1, 3])


def test_shot_group_boundaries():
    groups = shot_groups([101, 100, 20, 19, 0, 5000])
    assert groups == {"many": [0, 5], "medium": [1, 2], "few": [3, 4]}


def test_class_stats():
    stats = class_stats(img_num_per_cls(500, 100, 100))
    assert stats["num_classes"] == 100 and stats["total"] == 10_847
    assert stats["imbalance_factor"] == pytest.approx(100.0)
    assert [len(stats["groups"][k]) for k in ("many", "medium", "few")] == [35, 35, 30]
    assert class_stats([10, 0])["imbalance_factor"] == float("inf")
