"""The ALA loss (longtail.losses.ala) against values computed by hand with math.log / math.exp on
fixed cosines and counts: both quantity factors, with and without the DRW class weights; the
difficulty factor carries no gradient; harder and rarer samples get the larger adjustment; the
recipe configs/methods/ala.yaml."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from longtail.core.config import load_config
from longtail.core.errors import ConfigError
from longtail.engine.config_check import check_config
from longtail.losses import create

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COUNTS = [40, 10, 5]  # n / n_min = 8, 2, 1
COS = [[0.5, -0.2, 0.1], [0.3, 0.8, -0.4], [-0.6, 0.2, 0.4]]
Y = [0, 2, 1]
S = 30.0


def qf_by_hand(quantity):
    ratios = [8.0, 2.0, 1.0]
    top = math.log(2.0) if quantity == "log" else 1.0
    return [top / math.log(r + 1.0) for r in ratios]


def per_sample_by_hand(quantity):
    """-log softmax(s (cos - DF QF_y e_y))_y per sample, DF = (1 - cos_y) / 2."""
    qf = qf_by_hand(quantity)
    out = []
    for row, y in zip(COS, Y):
        df = (1.0 - row[y]) / 2.0
        z = [S * (c - (df * qf[y] if j == y else 0.0)) for j, c in enumerate(row)]
        out.append(math.log(sum(math.exp(v) for v in z)) - z[y])
    return out


def cb_weights_by_hand(beta=0.9999):
    raw = [(1.0 - beta) / (1.0 - beta**n) for n in COUNTS]
    return [w * len(raw) / sum(raw) for w in raw]


def run(loss, cos=COS, y=Y):
    cos = cos if isinstance(cos, torch.Tensor) else torch.tensor(cos)
    return loss(cos, torch.tensor(y, dtype=torch.int64))


def test_quantity_factors_by_hand():
    # log: 1 for the rarest class, ln2/ln3 = 0.6309 at 2x, ln2/ln9 = 0.3155 at 8x; 0.150 at 100x
    assert create("ala", class_counts=COUNTS).qf.tolist() == pytest.approx(
        [0.31546488, 0.63092975, 1.0], rel=1e-6
    )
    assert create("ala", class_counts=[100, 1]).qf.tolist() == pytest.approx(
        [math.log(2) / math.log(101), 1.0], rel=1e-6
    )
    inverse = create("ala", class_counts=COUNTS, quantity="inverse_log").qf
    assert inverse.tolist() == pytest.approx(qf_by_hand("inverse_log"), rel=1e-6)
    assert inverse.tolist() == pytest.approx([0.45511961, 0.91023923, 1.44269504], rel=1e-6)


@pytest.mark.parametrize("quantity", ["log", "inverse_log"])
def test_loss_equals_the_hand_computed_value(quantity):
    loss = create("ala", class_counts=COUNTS, quantity=quantity, scale=S)
    expected = sum(per_sample_by_hand(quantity)) / len(Y)
    assert float(run(loss)) == pytest.approx(expected, rel=1e-5)
    # the log form's sample 0 written out: DF = 0.25, QF = ln2/ln9, target cos 0.5 - 0.0788662
    if quantity == "log":
        z = [S * (0.5 - 0.25 * math.log(2) / math.log(9)), S * -0.2, S * 0.1]
        assert per_sample_by_hand("log")[0] == pytest.approx(
            math.log(sum(math.exp(v) for v in z)) - z[0], rel=1e-12
        )
        assert z[0] == pytest.approx(12.634015, rel=1e-6)


@pytest.mark.parametrize("quantity", ["log", "inverse_log"])
def test_drw_weights_give_the_weighted_mean(quantity):
    loss = create("ala", class_counts=COUNTS, quantity=quantity, drw_epoch=2, drw_beta=0.9999)
    plain = sum(per_sample_by_hand(quantity)) / len(Y)
    loss.set_epoch(1)
    assert loss.weight is None and float(run(loss)) == pytest.approx(plain, rel=1e-5)
    loss.set_epoch(2)
    w = cb_weights_by_hand()
    assert loss.weight.tolist() == pytest.approx(w, rel=1e-5)
    per = per_sample_by_hand(quantity)
    expected = sum(w[y] * v for y, v in zip(Y, per)) / sum(w[y] for y in Y)
    assert float(run(loss)) == pytest.approx(expected, rel=1e-5)
    assert abs(expected - plain) > 0.05  # the weights change the value


def test_difficulty_factor_is_detached():
    """d L / d cos_{i,c} = s (p_ic - 1[c = y_i]) / B: the DF term adds no gradient of its own."""
    loss = create("ala", class_counts=COUNTS)
    cos = torch.tensor(COS, requires_grad=True)
    run(loss, cos).backward()
    qf = qf_by_hand("log")
    for i, (row, y) in enumerate(zip(COS, Y)):
        df = (1.0 - row[y]) / 2.0
        z = [S * (c - (df * qf[y] if j == y else 0.0)) for j, c in enumerate(row)]
        total = sum(math.exp(v) for v in z)
        for j in range(3):
            p = math.exp(z[j]) / total
            expected = S * (p - (1.0 if j == y else 0.0)) / len(Y)
            assert float(cos.grad[i, j]) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_harder_and_rarer_samples_get_the_larger_adjustment():
    """The subtracted term DF * QF, read back from two-class losses (l = log(1 + e^{s (cos_o -
    cos_y + shift)}) with cos_o = 0): larger for a low target cosine (hard) and for a rare class;
    a hard head sample is adjusted more than an easy tail sample (the paper's point)."""
    # QF = ln2/ln101 (class 0), 1 (class 1); scale 5 keeps the easy sample's loss resolvable
    loss = create("ala", class_counts=[1000, 10], scale=5.0)

    def shift(cos_y, y):
        row = [cos_y, 0.0] if y == 0 else [0.0, cos_y]
        value = float(run(loss, [row], [y]))
        return math.log(math.expm1(value)) / 5.0 + cos_y

    qf_head = math.log(2) / math.log(101)
    assert shift(-0.5, 1) == pytest.approx(0.75, rel=1e-4)  # DF 0.75, QF 1
    assert shift(0.9, 1) == pytest.approx(0.05, rel=1e-3)  # DF 0.05
    assert shift(-0.5, 0) == pytest.approx(0.75 * qf_head, rel=1e-4)  # 0.1126
    assert shift(-0.5, 1) > shift(-0.5, 0) > shift(0.9, 1) > 0


def test_options_are_checked():
    with pytest.raises(ConfigError, match=r"loss\.quantity"):
        create("ala", class_counts=COUNTS, quantity="sqrt")
    with pytest.raises(ConfigError, match=r"loss\.scale"):
        create("ala", class_counts=COUNTS, scale=0.0)
    with pytest.raises(ConfigError, match="class_counts"):
        create("ala")
    loss = create("ala", class_counts=COUNTS)
    assert loss.requires_normalized_head and loss.logit_scale == 30.0


def test_recipe():
    cfg = check_config(load_config(CONFIGS / "methods" / "ala.yaml", ["data=cifar10_lt"]))
    assert cfg.model.head == "cosine" and cfg.model.experts == 1
    assert cfg.loss.params() == {
        "scale": 30.0,
        "quantity": "log",
        "drw_epoch": 160,
        "drw_beta": 0.9999,
    }
    with pytest.raises(ConfigError, match=r"loss\.quantity"):
        check_config(
            load_config(CONFIGS / "methods" / "ala.yaml", ["data=cifar10_lt", "loss.quantity=x"])
        )
