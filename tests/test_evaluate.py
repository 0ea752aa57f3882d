"""Metrics against hand-computed values: group accuracies, per-class accuracy, ECE."""

import math

import pytest
import torch

from longtail.core.metrics import MetricAccumulator, metrics_from_sums


def test_group_and_per_class_accuracy_from_confusion():
    # rows = true class; counts: class 0 many (150), class 1 medium (50), class 2 few (10)
    confusion = torch.tensor([[8, 2, 0], [1, 3, 0], [0, 1, 1]], dtype=torch.float64)
    m = metrics_from_sums(confusion, torch.zeros(3, 15), 0.0, [150, 50, 10])
    assert math.isclose(m["top1"], 100 * 12 / 16)
    assert [round(a, 4) for a in m["per_class"]] == [80.0, 75.0, 50.0]
    assert (m["many"], m["medium"], m["few"]) == (80.0, 75.0, 50.0)
    assert math.isclose(m["mean_class_acc"], (80 + 75 + 50) / 3)
    assert m["groups"] == {"many": [0], "medium": [1], "few": [2]}


def test_empty_group_is_none_not_zero():
    confusion = torch.eye(2, dtype=torch.float64) * 5
    m = metrics_from_sums(confusion, torch.zeros(3, 15), 0.0, [500, 200])
    assert m["many"] == 100.0 and m["medium"] is None and m["few"] is None


def test_ece_by_hand():
    acc = MetricAccumulator(num_classes=2, num_bins=15)
    l3, l9 = math.log(3.0), math.log(9.0)
    logits = torch.tensor([[0.0, l3], [0.0, l3], [l9, 0.0]])  # confidences 0.75, 0.75, 0.9
    labels = torch.tensor([1, 0, 0])  # right, wrong, right
    acc.update(logits, labels)
    m = acc.compute([100, 100])
    # bins (0.7333, 0.8]: conf sum 1.5, correct 1; (0.8667, 0.9333]: 0.9 vs 1 -> (0.5 + 0.1) / 3
    assert math.isclose(m["ece"], 100 * 0.6 / 3, rel_tol=1e-6)
    assert m["confusion"] == [[1, 1], [0, 1]]  # rows: true class
    expected_nll = (-math.log(0.75) - math.log(0.25) - math.log(0.9)) / 3
    assert math.isclose(m["nll"], expected_nll, rel_tol=1e-6)


def test_top5_and_per_class_sums_without_a_confusion_matrix_beyond_1000_classes():
    from longtail.core.metrics import CONFUSION_MAX_CLASSES

    # 6 classes: sample 0 (class 0) right at top-1; sample 1 (class 1) ranked 3rd; sample 2
    # (class 2) ranked last (6th): top-1 1/3, top-5 2/3
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5],
            [9.0, 6, 8, 7, 0, 1],
            [0.0, 1, -5, 2, 3, 4],
        ]
    )
    labels = torch.tensor([0, 1, 2])
    acc = MetricAccumulator(6)
    acc.update(logits, labels)
    m = acc.compute([100, 50, 10, 10, 10, 10])
    assert m["top1"] == pytest.approx(100 / 3) and m["top5"] == pytest.approx(200 / 3)
    assert m["per_class_count"] == [1, 1, 1, 0, 0, 0] and m["confusion"][1][0] == 1
    # 1,200 classes: no C x C matrix, the same numbers from the per-class sums
    c = CONFUSION_MAX_CLASSES + 200
    big = torch.full((3, c), -10.0)
    big[:, :6] = logits
    acc = MetricAccumulator(c)
    acc.update(big, labels)
    assert acc.confusion.numel() == 0
    m2 = acc.compute([100, 50, 10] + [10] * (c - 3))
    assert m2["confusion"] is None
    assert (m2["top1"], m2["top5"]) == (pytest.approx(100 / 3), pytest.approx(200 / 3))
    assert m2["per_class"][:3] == [100.0, 0.0, 0.0] and m2["per_class"][3] is None


def test_per_class_plot_bins_thousands_of_classes(tmp_path):
    from longtail.engine.report import BINS, count_bins, plot_per_class

    counts = [1000 // (1 + c % 500) + 2 for c in range(8142)]  # iNaturalist-sized
    accs = [float(c % 101) for c in range(8142)]
    centre, mean, low, high = count_bins(list(zip(counts, accs)))
    assert 1 < len(centre) <= BINS and all(lo <= m <= hi for lo, m, hi in zip(low, mean, high))
    assert centre == sorted(centre)
    path = tmp_path / "plot.png"
    plot_per_class(path, counts, {"test": {"per_class": accs, "top1": 50.0}})
    assert path.stat().st_size > 10_000
