"""Sigmoid focal loss and its class-balanced form (loss.name=cb, loss.base=sigmoid_focal) against
values computed by hand, and the focal effect: easy examples lose weight."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from longtail.core.config import load_config
from longtail.losses import class_balanced_weights, create

Z = [[2.0, -1.0, 0.5], [0.0, 1.5, -2.0]]
Y = [0, 2]
COUNTS = [50, 10, 2]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _hand(z, y, gamma, w=None):
    total = 0.0
    for _i, (row, label) in enumerate(zip(z, y)):
        s = 0.0
        for c, v in enumerate(row):
            p_t = _sig(v) if c == label else 1.0 - _sig(v)
            s += -((1.0 - p_t) ** gamma) * math.log(p_t)
        total += (w[label] if w is not None else 1.0) * s
    return total / len(y)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_sigmoid_focal_by_hand(gamma):
    loss = create("sigmoid_focal", gamma=gamma)
    out = loss(torch.tensor(Z), torch.tensor(Y))
    assert out.item() == pytest.approx(_hand(Z, Y, gamma), rel=1e-6)


def test_gamma_0_is_the_sigmoid_cross_entropy():
    z, y = torch.tensor(Z), torch.tensor(Y)
    bce = (
        torch.nn.functional.binary_cross_entropy_with_logits(
            z, torch.nn.functional.one_hot(y, 3).float(), reduction="sum"
        )
        / 2
    )
    assert create("sigmoid_focal", gamma=0.0)(z, y).item() == pytest.approx(bce.item(), rel=1e-6)


def test_class_balanced_sigmoid_focal_by_hand():
    w = class_balanced_weights(COUNTS, 0.9999).tolist()
    loss = create("cb", class_counts=COUNTS, base="sigmoid_focal", gamma=1.0, beta=0.9999)
    out = loss(torch.tensor(Z), torch.tensor(Y))
    assert out.item() == pytest.approx(_hand(Z, Y, 1.0, w), rel=1e-6)
    # the rare class (2 images) weighs most: w_2 / w_0 > 10
    assert w[2] / w[0] > 10


def test_focusing_down_weights_easy_examples():
    """The paper's effect: relative to the cross-entropy, a well-classified example loses far more
    of its loss than a misclassified one."""
    easy, hard = torch.tensor([[4.0, -4.0, -4.0]]), torch.tensor([[-1.0, 1.0, 0.0]])
    y = torch.tensor([0])
    ce, fl = create("sigmoid_focal", gamma=0.0), create("sigmoid_focal", gamma=2.0)
    assert fl(easy, y) / ce(easy, y) < 1e-3 and fl(hard, y) / ce(hard, y) > 0.4


def test_gradient_is_finite_and_deferred_weights_switch_on():
    loss = create("sigmoid_focal", class_counts=COUNTS, gamma=2.0, drw_epoch=1)
    z = torch.tensor(Z, requires_grad=True)
    plain = loss(z, torch.tensor(Y))
    plain.backward()
    assert torch.isfinite(z.grad).all()
    loss.set_epoch(1)
    w = class_balanced_weights(COUNTS, 0.9999).tolist()
    assert loss(torch.tensor(Z), torch.tensor(Y)).item() == pytest.approx(
        _hand(Z, Y, 2.0, w), rel=1e-6
    )


@pytest.mark.parametrize("dataset", ["cifar10_lt", "fashion_mnist_lt"])
def test_recipe_composes_with_any_dataset(dataset):
    cfg = load_config(CONFIGS / "methods" / "cb_sigmoid_focal.yaml", [f"data={dataset}"])
    assert cfg.loss.name == "cb" and cfg.loss.params() == {
        "base": "sigmoid_focal",
        "beta": 0.9999,
        "gamma": 1.0,
    }
    loss = create(cfg.loss.name, class_counts=COUNTS, **cfg.loss.params())
    assert loss(torch.tensor(Z), torch.tensor(Y)).item() == pytest.approx(
        _hand(Z, Y, 1.0, class_balanced_weights(COUNTS, 0.9999).tolist()), rel=1e-6
    )
