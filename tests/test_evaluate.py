"""Metrics against hand-computed values: group accuracies, per-class accuracy, ECE."""

import math

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
