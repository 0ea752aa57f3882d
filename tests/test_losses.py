"""Tests for longtail.losses against values computed by hand (math.log / math.exp), never the code path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from longtail.core.errors import ConfigError
from longtail.losses import LOSSES, class_balanced_weights, create, posthoc_adjust, select_tau

BASELINES = ["ce", "focal", "cb", "ldam", "logit_adjusted", "balanced_softmax", "gcl"]
ALL = LOSSES.names()  # every registered loss meets the contract below

# Fixed 2-sample, 3-class example used throughout.
Z = [[1.0, 2.0, 3.0], [1.0, 0.0, -1.0]]
Y = [2, 0]


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def lse(xs):
    return math.log(sum(math.exp(x) for x in xs))


def ce_by_hand(z, y):
    """Per-sample -log softmax(z)_y."""
    return [lse(row) - row[c] for row, c in zip(z, y)]


# Hand-computed per-sample CE of the fixed example:
#   l_0 = log(e^1 + e^2 + e^3) - 3 = 0.40760596...;  l_1 = log(e^1 + e^0 + e^-1) - 1 = 0.40760596...
L0 = math.log(math.e**1 + math.e**2 + math.e**3) - 3
L1 = math.log(math.e**1 + 1 + math.e**-1) - 1

# Class-balanced weights for counts [5000, 500, 50], beta = 0.9999, written out:
#   effective numbers E_n = (1 - 0.9999^n) / (1 - 0.9999):
#     E_5000 = 0.3934845044 / 1e-4 = 3934.845044,  E_500 = 487.7295373,  E_50 = 49.87769577
#   raw w = 1/E = [2.541396139e-4, 2.050316668e-3, 2.004904165e-2], sum = 2.229336322e-2
#   normalised to sum 3: w = raw * 3 / sum
CB3 = [0.034107361800995, 0.275167225436881, 2.690725412762124]
COUNTS3 = [5000, 500, 50]
# Same counts with beta = 0.9998 (GCL default): computed the same way.
CB3_9998 = [0.042153595526427, 0.279996305771733, 2.677850098701840]
# CIFAR-10-LT IF100 counts: int(5000 * 0.01 ** (c / 9)).
C10_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def approx(x, rel=1e-6, abs=1e-6):
    return pytest.approx(x, rel=rel, abs=abs)


# ----------------------------------------------------------------------------------------------
# registry / create / config errors
# ----------------------------------------------------------------------------------------------


def test_registry_has_the_baseline_losses():
    assert set(BASELINES) <= set(LOSSES.names())


@pytest.mark.parametrize("name", ALL)
def test_every_loss_has_contract(name):
    loss = create(name, class_counts=COUNTS3)
    assert isinstance(loss, torch.nn.Module)
    loss.set_epoch(0)
    loss.set_epoch(5)
    assert loss.requires_normalized_head is type(loss).requires_normalized_head
    if name in ("ldam", "gcl"):  # cosine logits
        assert loss.requires_normalized_head is True
    out = loss(t(Z), t(Y, torch.int64))
    assert out.dim() == 0 and out.dtype == torch.float32


@pytest.mark.parametrize("name", ALL)
def test_unknown_option_names_key(name):
    with pytest.raises(ConfigError, match=r"loss\.bogus_option"):
        create(name, class_counts=COUNTS3, bogus_option=1)


def test_unknown_loss_name():
    with pytest.raises(ConfigError, match="nope"):
        create("nope", class_counts=COUNTS3)


@pytest.mark.parametrize("name", ["cb", "ldam", "logit_adjusted", "balanced_softmax", "gcl"])
def test_missing_class_counts(name):
    with pytest.raises(ConfigError, match="class_counts"):
        create(name)


@pytest.mark.parametrize("name", ["ce", "focal"])
def test_class_counts_optional_without_drw(name):
    loss = create(name)
    assert torch.isfinite(loss(t(Z), t(Y, torch.int64)))
    with pytest.raises(ConfigError, match="class_counts"):
        create(name, drw_epoch=3)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(name="focal", gamma=-1.0), "loss.gamma"),
        (dict(name="cb", beta=1.0), "loss.beta"),
        (dict(name="cb", base="sigmoid"), "loss.base"),
        (dict(name="cb", base="ce", gamma=2.0), "loss.gamma"),
        (dict(name="ldam", scale=0.0), "loss.scale"),
        (dict(name="ce", drw_epoch=-1), "loss.drw_epoch"),
        (dict(name="ce", drw_epoch=2, drw_beta=1.5), "loss.drw_beta"),
        (dict(name="gcl", beta=0.9998, drw_beta=0.9999, drw_epoch=3), "loss.drw_beta"),
    ],
)
def test_bad_values(kwargs, key):
    kwargs = dict(kwargs)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        create(kwargs.pop("name"), class_counts=COUNTS3, **kwargs)


@pytest.mark.parametrize("counts", [[5, 0, 3], [5, -1], [], [[1, 2]], [1, float("nan")]])
def test_bad_class_counts(counts):
    with pytest.raises(ConfigError, match="class_counts"):
        create("ldam", class_counts=counts)


def test_num_classes_mismatch():
    loss = create("logit_adjusted", class_counts=[10, 5])
    with pytest.raises(ConfigError, match="class_counts"):
        loss(t(Z), t(Y, torch.int64))


def test_class_counts_accepts_numpy_and_tensor():
    a = create("ldam", class_counts=np.array(COUNTS3))
    b = create("ldam", class_counts=torch.tensor(COUNTS3))
    assert torch.equal(a.margins, b.margins)


# ----------------------------------------------------------------------------------------------
# class-balanced weights
# ----------------------------------------------------------------------------------------------


def test_class_balanced_weights_by_hand():
    w = class_balanced_weights(COUNTS3, 0.9999)
    assert w.dtype == torch.float32 and w.shape == (3,)
    assert w.tolist() == approx(CB3, rel=1e-6)
    assert float(w.sum()) == approx(3.0)
    # formula written with math for an unrelated set of counts
    counts, beta = [7, 3, 1, 1], 0.9
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    expect = [r * len(counts) / sum(raw) for r in raw]
    assert class_balanced_weights(counts, beta).tolist() == approx(expect)


def test_class_balanced_weights_edge_betas():
    assert class_balanced_weights([100, 10, 1], 0.0).tolist() == [1.0, 1.0, 1.0]
    # beta -> 1: w -> 1/n (normalised)
    w = class_balanced_weights([100, 10, 1], 1 - 1e-9)
    inv = [1 / 100, 1 / 10, 1.0]
    assert w.tolist() == approx([3 * x / sum(inv) for x in inv], rel=1e-5)


# ----------------------------------------------------------------------------------------------
# CE / focal
# ----------------------------------------------------------------------------------------------


def test_ce_by_hand():
    assert ce_by_hand(Z, Y) == approx([L0, L1])
    loss = create("ce")
    assert loss(t(Z), t(Y, torch.int64)).item() == approx((L0 + L1) / 2)


def test_focal_gamma2_by_hand():
    loss = create("focal", gamma=2.0)
    expect = sum((1 - math.exp(-v)) ** 2 * v for v in (L0, L1)) / 2
    assert loss(t(Z), t(Y, torch.int64)).item() == approx(expect)


def test_focal_default_gamma1_and_gamma0_is_ce():
    z = [[0.3, -1.2, 2.0], [0.0, 0.5, 0.1], [4.0, 1.0, 0.0]]
    y = [1, 1, 0]
    ls = ce_by_hand(z, y)
    assert create("focal")(t(z), t(y, torch.int64)).item() == approx(
        sum((1 - math.exp(-v)) * v for v in ls) / 3
    )
    assert create("focal", gamma=0.0)(t(z), t(y, torch.int64)).item() == approx(sum(ls) / 3)


def test_focal_weighted_follows_reference_convention():
    """LDAM-DRW FocalLoss: per-sample CE already multiplied by w_y, modulator exp(-w_y*l), plain mean."""
    loss = create("focal", class_counts=COUNTS3, gamma=2.0, drw_epoch=0)
    ws = [CB3[c] for c in Y]
    ces = [w * v for w, v in zip(ws, (L0, L1))]
    expect = sum((1 - math.exp(-c)) ** 2 * c for c in ces) / 2
    assert loss(t(Z), t(Y, torch.int64)).item() == approx(expect)
    # gamma = 0 with weights: plain mean of w_y * l (NOT the weighted mean)
    loss0 = create("focal", class_counts=COUNTS3, gamma=0.0, drw_epoch=0)
    assert loss0(t(Z), t(Y, torch.int64)).item() == approx(sum(ces) / 2)


# ----------------------------------------------------------------------------------------------
# class-balanced loss
# ----------------------------------------------------------------------------------------------


def test_cb_ce_weighted_mean_by_hand():
    loss = create("cb", class_counts=COUNTS3, beta=0.9999)
    w0, w1 = CB3[2], CB3[0]
    expect = (w0 * L0 + w1 * L1) / (w0 + w1)
    assert loss(t(Z), t(Y, torch.int64)).item() == approx(expect)


def test_weighted_mean_convention_on_larger_batch():
    z = [[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0], [1.0, 1.0, 1.0], [-2.0, 2.0, 0.0]]
    y = [0, 1, 2, 2, 0]
    ls = ce_by_hand(z, y)
    ws = [CB3[c] for c in y]
    expect = sum(w * v for w, v in zip(ws, ls)) / sum(ws)
    assert create("cb", class_counts=COUNTS3)(t(z), t(y, torch.int64)).item() == approx(expect)


def test_cb_focal_by_hand():
    loss = create("cb", class_counts=COUNTS3, base="focal", gamma=2.0)
    ces = [CB3[2] * L0, CB3[0] * L1]
    expect = sum((1 - math.exp(-c)) ** 2 * c for c in ces) / 2
    assert loss(t(Z), t(Y, torch.int64)).item() == approx(expect)
    assert create("cb", class_counts=COUNTS3, base="focal").gamma == 1.0


def test_cb_with_drw_defers_its_weights():
    loss = create("cb", class_counts=COUNTS3, drw_epoch=3)
    assert loss(t(Z), t(Y, torch.int64)).item() == approx((L0 + L1) / 2)
    loss.set_epoch(3)
    w0, w1 = CB3[2], CB3[0]
    assert loss(t(Z), t(Y, torch.int64)).item() == approx((w0 * L0 + w1 * L1) / (w0 + w1))
    # drw_beta may repeat beta
    create("cb", class_counts=COUNTS3, beta=0.999, drw_beta=0.999, drw_epoch=3)


# ----------------------------------------------------------------------------------------------
# DRW
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ce", "logit_adjusted"])
def test_drw_switch(name):
    params = dict(tau=0.0) if name == "logit_adjusted" else {}
    loss = create(name, class_counts=COUNTS3, drw_epoch=2, **params)
    unweighted = (L0 + L1) / 2
    w0, w1 = CB3[2], CB3[0]
    weighted = (w0 * L0 + w1 * L1) / (w0 + w1)
    x, y = t(Z), t(Y, torch.int64)
    assert loss.weight is None
    assert loss(x, y).item() == approx(unweighted)
    loss.set_epoch(1)
    assert loss(x, y).item() == approx(unweighted)
    loss.set_epoch(2)
    assert loss.drw_active
    assert loss.weight.tolist() == approx(CB3)
    assert loss(x, y).item() == approx(weighted)
    loss.set_epoch(7)
    assert loss(x, y).item() == approx(weighted)
    loss.set_epoch(0)  # e.g. a new run re-using the module
    assert loss(x, y).item() == approx(unweighted)


def test_drw_matches_ldam_drw_epoch_index():
    """LDAM-DRW: idx = epoch // 160 on 0-based epochs -> weights from epoch index 160."""
    loss = create("ldam", class_counts=C10_IF100, drw_epoch=160)
    loss.set_epoch(159)
    assert loss.weight is None
    loss.set_epoch(160)
    assert loss.weight is not None
    assert float(loss.weight.sum()) == approx(10.0, rel=1e-5)


def test_drw_epoch_zero_active_from_start_and_custom_beta():
    loss = create("ce", class_counts=COUNTS3, drw_epoch=0, drw_beta=0.9)
    raw = [(1 - 0.9) / (1 - 0.9**n) for n in COUNTS3]
    assert loss.weight.tolist() == approx([3 * r / sum(raw) for r in raw])


def test_set_epoch_rejects_bad_values():
    loss = create("ce")
    with pytest.raises(ConfigError):
        loss.set_epoch(-1)


# ----------------------------------------------------------------------------------------------
# LDAM
# ----------------------------------------------------------------------------------------------


def test_ldam_margins_cifar10_if100():
    loss = create("ldam", class_counts=C10_IF100, max_margin=0.5)
    m = loss.margins.tolist()
    assert m[9] == approx(0.5) and max(m) == approx(0.5)
    assert m[0] / m[9] == approx((50 / 5000) ** 0.25)
    assert m[0] == approx(0.5 * 0.1**0.5)  # 0.158113883...
    assert m[4] == approx(0.5 * (50 / 645) ** 0.25)
    assert all(a < b for a, b in zip(m, m[1:]))


def test_ldam_loss_by_hand():
    # counts [16, 1]: n^{-1/4} = [0.5, 1] -> margins [0.25, 0.5]
    loss = create("ldam", class_counts=[16, 1], max_margin=0.5, scale=10.0)
    assert loss.margins.tolist() == approx([0.25, 0.5])
    cos = [[0.5, 0.2], [0.1, 0.3]]
    # sample 0 (y=0): 10*[0.5-0.25, 0.2] = [2.5, 2.0];  sample 1 (y=1): 10*[0.1, 0.3-0.5] = [1, -2]
    l0 = math.log(math.exp(2.5) + math.exp(2.0)) - 2.5
    l1 = math.log(math.exp(1.0) + math.exp(-2.0)) + 2.0
    assert loss(t(cos), t([0, 1], torch.int64)).item() == approx((l0 + l1) / 2)


def test_ldam_drw_weighted_by_hand():
    loss = create("ldam", class_counts=[16, 1], scale=10.0, drw_epoch=1, drw_beta=0.5)
    loss.set_epoch(1)
    # beta = 0.5: raw (1-.5)/(1-.5^16) = 0.5000076, (1-.5)/(1-.5) = 1 -> normalised to sum 2
    r = [0.5 / (1 - 0.5**16), 1.0]
    w = [2 * x / sum(r) for x in r]
    l0 = math.log(math.exp(2.5) + math.exp(2.0)) - 2.5
    l1 = math.log(math.exp(1.0) + math.exp(-2.0)) + 2.0
    out = loss(t([[0.5, 0.2], [0.1, 0.3]]), t([0, 1], torch.int64)).item()
    assert out == approx((w[0] * l0 + w[1] * l1) / (w[0] + w[1]))


# ----------------------------------------------------------------------------------------------
# logit adjustment / balanced softmax
# ----------------------------------------------------------------------------------------------


def test_logit_adjusted_by_hand():
    # counts [3, 1] -> prior [0.75, 0.25]; z = 0, y = 1: softmax(log prior)_1 = 0.25 -> loss log 4
    loss = create("logit_adjusted", class_counts=[3, 1], tau=1.0)
    assert loss(t([[0.0, 0.0]]), t([1], torch.int64)).item() == approx(math.log(4))
    # tau = 2: logits [2 log .75, 2 log .25] -> p_1 = .0625 / (.5625 + .0625) = 0.1
    loss2 = create("logit_adjusted", class_counts=[3, 1], tau=2.0)
    assert loss2(t([[0.0, 0.0]]), t([1], torch.int64)).item() == approx(-math.log(0.1))


def test_balanced_softmax_by_hand():
    loss = create("balanced_softmax", class_counts=[3, 1])
    # z + log n = [1 + log 3, 2 + 0], y = 0
    expect = math.log(3 * math.e + math.e**2) - (1 + math.log(3))
    assert loss(t([[1.0, 2.0]]), t([0], torch.int64)).item() == approx(expect)


def test_la_tau1_equals_balanced_softmax_and_tau0_equals_ce():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 10, generator=g) * 3
    y = torch.randint(0, 10, (64,), generator=g)
    la = create("logit_adjusted", class_counts=C10_IF100, tau=1.0)(z, y)
    bs = create("balanced_softmax", class_counts=C10_IF100)(z, y)
    assert abs(la.item() - bs.item()) < 1e-6
    la0 = create("logit_adjusted", class_counts=C10_IF100, tau=0.0)(z, y)
    ce = create("ce")(z, y)
    assert abs(la0.item() - ce.item()) < 1e-6


def test_posthoc_adjust_values():
    counts = [3, 1]
    z = [[0.0, 0.0], [1.0, -1.0]]
    out_t = posthoc_adjust(t(z), counts, tau=1.0)
    expect = [[-math.log(0.75), -math.log(0.25)], [1 - math.log(0.75), -1 - math.log(0.25)]]
    assert isinstance(out_t, torch.Tensor)
    assert np.allclose(out_t.numpy(), expect, atol=1e-6)
    out_np = posthoc_adjust(np.array(z), counts, tau=0.5)
    assert isinstance(out_np, np.ndarray)
    assert np.allclose(
        out_np, [[x - 0.5 * math.log(p) for x, p in zip(row, (0.75, 0.25))] for row in z]
    )
    assert np.allclose(posthoc_adjust(t(z), counts, tau=0.0).numpy(), z)


def test_select_tau_constructed_example():
    # counts [90, 10]: log pi_0 - log pi_1 = log 9 = 2.1972. Adjusted margin of class 0 over class 1
    # is d - tau * log 9. Class-1 images have d = 0.5 (correct iff tau > 0.2276); class-0 images
    # d = 1.5 (correct iff tau < 0.6827). So tau in {0.3, ..., 0.6} gives 100 %, tau = 0 gives 50 %.
    logits = np.array([[1.5, 0.0]] * 10 + [[0.5, 0.0]] * 10)
    labels = np.array([0] * 10 + [1] * 10)
    best, table = select_tau(logits, labels, [90, 10])
    assert best == pytest.approx(0.3)  # ties 0.3..0.6 -> the smallest
    taus = [tau for tau, _ in table]
    assert len(table) == 21 and taus[0] == 0.0 and taus[-1] == pytest.approx(2.0)
    acc = dict(table)
    assert acc[0.0] == pytest.approx(0.5)
    assert acc[0.3] == pytest.approx(1.0) and acc[0.6] == pytest.approx(1.0)
    assert acc[0.7] == pytest.approx(0.5) and acc[0.2] == pytest.approx(0.5)
    # custom grid with torch inputs, unsorted; tie at tau 0 and 0.1 (both 50 %) -> 0.0
    best2, table2 = select_tau(
        torch.tensor(logits), torch.tensor(labels), [90, 10], taus=[0.1, 0.0]
    )
    assert best2 == 0.0 and [tau for tau, _ in table2] == [0.0, 0.1]


# ----------------------------------------------------------------------------------------------
# GCL
# ----------------------------------------------------------------------------------------------

GCL_COUNTS = [100, 10, 1]  # m = [0, log 10, log 100] -> m / max m = [0, 0.5, 1]
COS = [[0.5, 0.2, -0.1], [0.3, 0.4, 0.1]]
COS_Y = [0, 2]


def gcl_by_hand(cos, y, noise=None, s=25.0, margin=0.1, noise_mul=1.0):
    rel = [0.0, 0.5, 1.0]
    total = 0.0
    for i, (row, c) in enumerate(zip(cos, y)):
        adj = [
            v - (noise_mul * abs(noise[i][j]) * rel[j] if noise is not None else 0.0)
            for j, v in enumerate(row)
        ]
        adj[c] -= margin
        total += lse([s * a for a in adj]) - s * adj[c]
    return total / len(cos)


def test_gcl_eval_is_margin_only_by_hand():
    loss = create("gcl", class_counts=GCL_COUNTS)
    assert loss.cloud.tolist() == approx([0.0, 0.5, 1.0])
    loss.eval()
    # sample 0: 25*[0.4, 0.2, -0.1] = [10, 5, -2.5];  sample 1: 25*[0.3, 0.4, 0.0] = [7.5, 10, 0]
    l0 = math.log(math.exp(10) + math.exp(5) + math.exp(-2.5)) - 10
    l1 = math.log(math.exp(7.5) + math.exp(10) + 1.0) - 0.0
    expect = (l0 + l1) / 2
    assert gcl_by_hand(COS, COS_Y) == approx(expect)
    x, y = t(COS), t(COS_Y, torch.int64)
    assert loss(x, y).item() == approx(expect)
    assert loss(x, y).item() == loss(x, y).item()  # deterministic in eval mode


def test_gcl_train_noise_reproducible_and_by_hand():
    x, y = t(COS), t(COS_Y, torch.int64)
    eval_value = gcl_by_hand(COS, COS_Y)
    a = create("gcl", class_counts=GCL_COUNTS, generator=torch.Generator().manual_seed(123))
    b = create("gcl", class_counts=GCL_COUNTS)
    b.generator = torch.Generator().manual_seed(123)  # attribute form
    assert a.training
    va, vb = a(x, y).item(), b(x, y).item()
    assert va == vb
    assert va != approx(eval_value)
    # noise = |N(0, 1/9)| clamped to 1, drawn as randn(B, C) / 3 from the same seeded stream
    eps = (
        (torch.randn(2, 3, generator=torch.Generator().manual_seed(123)) / 3).clamp(-1, 1).tolist()
    )
    assert va == approx(gcl_by_hand(COS, COS_Y, noise=eps), rel=1e-5)
    # noise only pushes logits down: train loss on a target-head sample is <= its eval loss
    assert (
        a(t([[0.5, 0.2, -0.1]]), t([0], torch.int64)).item()
        <= gcl_by_hand([[0.5, 0.2, -0.1]], [0]) + 1e-6
    )
    # noise_mul = 0 in training mode equals eval mode
    c = create("gcl", class_counts=GCL_COUNTS, noise_mul=0.0)
    assert c(x, y).item() == approx(eval_value)


def test_gcl_drw_uses_beta_9998():
    loss = create("gcl", class_counts=COUNTS3, drw_epoch=60)  # == GNM-PT reweight_epoch 59
    loss.set_epoch(59)
    assert loss.weight is None
    loss.set_epoch(60)
    assert loss.weight.tolist() == approx(CB3_9998)
    assert create("gcl", class_counts=COUNTS3, drw_epoch=0, beta=0.9999).weight.tolist() == approx(
        CB3
    )
    assert create(
        "gcl", class_counts=COUNTS3, drw_epoch=0, drw_beta=0.9999
    ).weight.tolist() == approx(CB3)


def test_gcl_equal_counts_no_nan():
    loss = create("gcl", class_counts=[10, 10, 10])
    out = loss(t(COS), t(COS_Y, torch.int64))
    assert torch.isfinite(out)
    loss.eval()
    assert out.item() == approx(loss(t(COS), t(COS_Y, torch.int64)).item())


# ----------------------------------------------------------------------------------------------
# numerics: gradients, dtype, buffers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_gradients_finite(name):
    g = torch.Generator().manual_seed(1)
    z = (torch.rand(16, 10, generator=g) * 2 - 1).requires_grad_()
    y = torch.randint(0, 10, (16,), generator=g)
    loss = create(name, class_counts=C10_IF100, drw_epoch=1)
    loss.set_epoch(1)
    out = loss(z, y)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_gradient_finite_at_zero_ce(gamma):
    z = torch.tensor([[200.0, -200.0]], requires_grad=True)
    out = create("focal", gamma=gamma)(z, torch.tensor([0]))
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("name", ALL)
def test_low_precision_logits_computed_in_float32(name):
    loss = create(name, class_counts=COUNTS3)
    loss.eval()
    x = t(COS, torch.bfloat16)
    y = t(COS_Y, torch.int64)
    ref = loss(x.float(), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(x, y)
    assert out.dtype == torch.float32
    assert out.item() == approx(ref.item(), rel=1e-6)


def test_buffers_registered_and_moved():
    expected = {
        "ldam": "margins",
        "logit_adjusted": "log_prior",
        "balanced_softmax": "log_counts",
        "gcl": "cloud",
    }
    for name, buf in expected.items():
        loss = create(name, class_counts=COUNTS3, drw_epoch=0)
        names = dict(loss.named_buffers())
        assert buf in names and "weight" in names
        moved = loss.to(torch.device("meta"))
        assert all(b.device.type == "meta" for b in moved.buffers())
    # non-persistent: a state_dict does not depend on the epoch
    loss = create("ce", class_counts=COUNTS3, drw_epoch=1)
    before = loss.state_dict()
    loss.set_epoch(1)
    assert before.keys() == loss.state_dict().keys()


def test_ce_batch_mean_reduction_divides_by_the_batch_size():
    """Cui et al.'s TF code divides the weighted sum by the batch size; PyTorch's weighted mean
    (our default, LDAM-DRW's) by the sum of the weights."""
    z, y = [[1.0, 0.5, -1.0], [0.2, 0.1, 0.9], [0.0, 2.0, 0.3]], [0, 2, 1]
    ls = ce_by_hand(z, y)
    ws = [CB3[c] for c in y]
    weighted = create("cb", class_counts=COUNTS3)(t(z), t(y, torch.int64)).item()
    batch = create("cb", class_counts=COUNTS3, reduction="batch_mean")(
        t(z), t(y, torch.int64)
    ).item()
    assert weighted == approx(sum(w * v for w, v in zip(ws, ls)) / sum(ws))
    assert batch == approx(sum(w * v for w, v in zip(ws, ls)) / 3)
    # without weights the two are the same plain mean
    assert create("ce", reduction="batch_mean")(t(z), t(y, torch.int64)).item() == approx(
        sum(ls) / 3
    )
    with pytest.raises(ConfigError, match="loss.reduction"):
        create("ce", reduction="sum")
