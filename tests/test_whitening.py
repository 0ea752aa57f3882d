"""The channel-whitening neck (METHODS.md section 5, [PROPOSED]): ZCA by eigendecomposition and by
Newton-Schulz (IterNorm), group whitening, running statistics, the BET queue, and end-to-end runs
(tiny B3RS + LDAM fit, `longtail eval`, bit-exact resume; on real CIFAR-10-LT: decorrelation)."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN
from safetensors.torch import load_file

from longtail.cli import main
from longtail.core.config import load_config
from longtail.core.errors import ConfigError
from longtail.data.build import load_split
from longtail.data.loader import eval_batches
from longtail.engine.trainer import build_run, fit
from longtail.models import NECKS, build_model
from longtail.models.whitening import inv_sqrt_eig, inv_sqrt_newton_schulz

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG = CONFIGS / "methods" / "whitening_ldam_drw.yaml"
EPS = 1e-5


def correlated(n=400, d=16, seed=0, shift=3.0):
    """n rows of a Gaussian with a known, strongly correlated covariance A A^T + 0.1 I (float64)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    return z @ torch.linalg.cholesky(cov).T + shift, cov


def batch_cov(x):
    x = x.double()
    xc = x - x.mean(0)
    return xc.T @ xc / len(x)


def sym_fn(cov, f):
    lam, u = torch.linalg.eigh(cov)
    return (u * f(lam)) @ u.T


def ns_scalar(a, iterations):
    """IterNorm's P_T on the eigenvalues a of Sigma_N (the literal recursion, on scalars)."""
    p = np.ones_like(a)
    for _ in range(iterations):
        p = 0.5 * (3 * p - p**3 * a)
    return p


@pytest.fixture(scope="module")
def resnet8_features(tiny_cifar_root):
    """Pooled features [300, 64] of a random-init ResNet-8 on the 300 tiny CIFAR training images."""
    torch.manual_seed(0)
    model = build_model(
        load_config(CONFIG, ["data=cifar10_lt", "model.backbone=resnet8"]).model, 10, 3
    )
    images = load_split("cifar10", "train", tiny_cifar_root).images.float() / 255.0
    with torch.no_grad():
        return model.backbone.forward_features((images - 0.5) / 0.25)


# ---------------------------------------------------------------------------------------------
# options


def test_options_defaults_and_errors():
    neck = NECKS.build("whitening", 64)
    assert (neck.method, neck.group_size, neck.num_groups, neck.eps, neck.momentum) == (
        "eig",
        64,
        1,
        1e-5,
        0.1,
    )
    assert (neck.iterations, neck.affine, neck.bet, neck.running, neck.out_features) == (
        5,
        False,
        "none",
        "cov",
        64,
    )
    assert NECKS.build("whitening", 256).group_size == 64  # D > 128: groups of 64
    assert NECKS.build("whitening", 128).group_size == 128
    assert not list(neck.parameters())  # affine off: nothing to learn
    assert [n for n, _ in NECKS.build("whitening", 8, affine=True).named_parameters()] == [
        "weight",
        "bias",
    ]
    with pytest.raises(ConfigError, match=r"model\.neck_params\.group_sise"):
        NECKS.build("whitening", 64, key_prefix="model.neck_params.", group_sise=8)
    with pytest.raises(ConfigError, match=r"group_size.*divide"):
        NECKS.build("whitening", 64, group_size=24)
    with pytest.raises(ConfigError, match=r"model\.neck_params\.method"):
        NECKS.build("whitening", 64, method="cholesky")
    with pytest.raises(ConfigError, match=r"bet=queue"):
        NECKS.build("whitening", 64, bet="subbatch")
    with pytest.raises(ConfigError, match=r"model\.neck_params\.running"):
        NECKS.build("whitening", 64, running="batch")
    with pytest.raises(ConfigError, match=r"bet_queue"):
        NECKS.build("whitening", 64, bet="queue", bet_queue=0)


# ---------------------------------------------------------------------------------------------
# whitening


def test_eig_whitens_a_known_covariance():
    x, _ = correlated()
    assert batch_cov(x).abs().sub(torch.eye(16)).abs().max() > 1.0  # far from white
    neck = NECKS.build("whitening", 16).train()
    y = neck(x)
    assert y.dtype == torch.float64
    # exactly Sigma (Sigma + eps I)^-1 (identity up to the eps ridge), mean 0
    expected = sym_fn(batch_cov(x), lambda lam: lam / (lam + EPS))
    torch.testing.assert_close(batch_cov(y), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(batch_cov(y), torch.eye(16, dtype=torch.float64), atol=1e-3, rtol=0)
    assert y.mean(0).abs().max() < 1e-10
    # ZCA (symmetric W): the whitened data stays closest to the centred input
    w = torch.linalg.lstsq(x - x.mean(0), y).solution
    torch.testing.assert_close(w, w.T, atol=1e-8, rtol=0)


def test_eig_whitens_real_resnet8_features(resnet8_features):
    x = resnet8_features  # float32 [300, 64]
    before = batch_cov(x)
    corr = before / before.diagonal().sqrt().outer(before.diagonal().sqrt())
    assert (corr - torch.eye(64)).abs().max() > 0.5  # random-init features are correlated
    y = NECKS.build("whitening", 64).train()(x)
    assert y.dtype == torch.float32
    expected = sym_fn(before, lambda lam: lam / (lam + EPS))
    torch.testing.assert_close(batch_cov(y), expected, atol=2e-4, rtol=0)
    lam = torch.linalg.eigvalsh(before)
    ridge = float(EPS / (lam[0] + EPS))  # eps shrinkage of the smallest direction
    assert (batch_cov(y) - torch.eye(64)).abs().max() <= ridge + 2e-4


@pytest.mark.parametrize("iterations", [1, 3, 5])
def test_newton_schulz_matches_its_known_error(iterations):
    x, _ = correlated(d=12, seed=1)
    neck = NECKS.build("whitening", 12, method="newton_schulz", iterations=iterations).train()
    y = neck(x)
    sigma = batch_cov(x) + EPS * torch.eye(12, dtype=torch.float64)
    trace = float(sigma.trace())
    a, u = torch.linalg.eigh(sigma / trace)
    # W Sigma_b W has the eigenvalues (a - eps/tr) p_T(a)^2 on Sigma's eigenvectors
    p = torch.from_numpy(ns_scalar(a.numpy(), iterations))
    expected = (u * ((a - EPS / trace) * p**2)) @ u.T
    torch.testing.assert_close(batch_cov(y), expected, atol=1e-9, rtol=0)
    error = float((batch_cov(y) - torch.eye(12, dtype=torch.float64)).abs().max())
    assert error > 0.05  # incomplete whitening at small T (IterNorm)


def test_newton_schulz_converges_with_more_iterations():
    x, cov = correlated(d=12, seed=1)
    assert torch.linalg.cond(cov) > 100
    errors = []
    for t in (5, 10, 20, 40):
        y = NECKS.build("whitening", 12, method="newton_schulz", iterations=t).train()(x)
        errors.append(float((batch_cov(y) - torch.eye(12, dtype=torch.float64)).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3 and errors[3] < 1e-3
    # at convergence equal to the eigendecomposition (the literal P^3 recursion diverges here)
    y_eig = NECKS.build("whitening", 12).train()(x)
    y_ns = NECKS.build("whitening", 12, method="newton_schulz", iterations=60).train()(x)
    torch.testing.assert_close(y_ns, y_eig, atol=1e-8, rtol=0)


def test_group_whitening_is_block_identity(resnet8_features):
    x = resnet8_features.double()
    y = NECKS.build("whitening", 64, group_size=16).train()(x)
    c = batch_cov(y)
    for k in range(4):
        s = slice(16 * k, 16 * (k + 1))
        block = batch_cov(x[:, s])  # identity up to the eps ridge
        expected = sym_fn(block, lambda lam: lam / (lam + EPS))
        torch.testing.assert_close(c[s, s], expected, atol=1e-10, rtol=0)
        torch.testing.assert_close(c[s, s], torch.eye(16, dtype=torch.float64), atol=1e-2, rtol=0)
        # each group is whitened on its own: the same as a 16-channel neck on that slice
        torch.testing.assert_close(y[:, s], NECKS.build("whitening", 16).train()(x[:, s]))
    off = c.clone()
    for k in range(4):
        off[16 * k : 16 * (k + 1), 16 * k : 16 * (k + 1)] = 0
    assert off.abs().max() > 0.2  # cross-group correlation is left alone


@pytest.mark.parametrize("method", ["eig", "newton_schulz"])
def test_gradients_reach_input_and_backbone(method, tiny_cifar_root):
    torch.manual_seed(0)
    cfg = load_config(
        CONFIG, ["data=cifar10_lt", "model.backbone=resnet8", f"model.neck_params.method={method}"]
    )
    model = build_model(cfg.model, 10, 3).train()
    data = load_split("cifar10", "train", tiny_cifar_root)
    images = ((data.images[:96].float() / 255.0 - 0.5) / 0.25).requires_grad_(True)
    out = model(images)
    loss = F.cross_entropy(30 * out.logits, data.labels[:96].long())
    loss.backward()
    conv1 = model.backbone.conv1.weight.grad
    for g in (images.grad, conv1, model.head.weight.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_eig_gradient_is_exact_and_stable_at_equal_eigenvalues():
    x = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    neck = NECKS.build("whitening", 5).train()
    weights = torch.randn(30, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: (neck(t) * weights).sum(), (x,))
    # isotropic covariance (all eigenvalues equal): torch's eigh gradient divides by 0 here
    iso = torch.cat([torch.eye(5), -torch.eye(5)]).double() * 2.0
    sigma = (batch_cov(iso) + EPS * torch.eye(5, dtype=torch.float64))[None]
    g_out = torch.randn(1, 5, 5, dtype=torch.float64)
    s1 = sigma.clone().requires_grad_(True)
    (grad_eig,) = torch.autograd.grad((inv_sqrt_eig(s1, EPS) * g_out).sum(), s1)
    s2 = sigma.clone().requires_grad_(True)
    (grad_ns,) = torch.autograd.grad((inv_sqrt_newton_schulz(s2, 40) * g_out).sum(), s2)
    assert torch.isfinite(grad_eig).all()
    torch.testing.assert_close(
        grad_eig, 0.5 * (grad_ns + grad_ns.transpose(1, 2)), atol=1e-10, rtol=0
    )
    # the closed form at a multiple eigenvalue l: dW = -G_sym / (2 l^(3/2))
    lam = float(sigma[0, 0, 0])
    g_sym = 0.5 * (g_out + g_out.transpose(1, 2))
    torch.testing.assert_close(grad_eig, -g_sym / (2 * lam**1.5), atol=1e-12, rtol=0)


def test_autocast_computes_inside_in_float64():
    x, _ = correlated(n=200, d=16, seed=3)
    x = x.float()
    ref = NECKS.build("whitening", 16).train()(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = NECKS.build("whitening", 16).train()(x)
        y_bf16 = NECKS.build("whitening", 16).train()(x.bfloat16())
    assert y.dtype == torch.float32 and torch.equal(y, ref)  # no bf16 matmul inside
    assert y_bf16.dtype == torch.bfloat16  # output in the input's dtype


# ---------------------------------------------------------------------------------------------
# running statistics


def test_running_statistics_follow_the_momentum_rule():
    x1, _ = correlated(n=200, d=8, seed=4)
    x2, _ = correlated(n=150, d=8, seed=5, shift=-1.0)
    neck = NECKS.build("whitening", 8, momentum=0.25).train()
    torch.testing.assert_close(neck.running_mean, torch.zeros(8))
    torch.testing.assert_close(neck.running_whiten, torch.eye(8)[None])
    torch.testing.assert_close(neck.running_cov, torch.eye(8)[None])
    mean, whiten, cov = (
        torch.zeros(8, dtype=torch.float64),
        torch.eye(8, dtype=torch.float64),
        torch.eye(8, dtype=torch.float64),
    )
    for x in (x1, x2):
        neck(x)
        w_batch = sym_fn(batch_cov(x), lambda lam: (lam + EPS) ** -0.5)
        mean = 0.75 * mean + 0.25 * x.mean(0)
        whiten = 0.75 * whiten + 0.25 * w_batch
        cov = 0.75 * cov + 0.25 * batch_cov(x)
        torch.testing.assert_close(neck.running_mean, mean.float())
        torch.testing.assert_close(neck.running_whiten[0], whiten.float())
        torch.testing.assert_close(neck.running_cov[0], cov.float())


@pytest.mark.parametrize("running", ["cov", "whiten"])
def test_eval_uses_running_statistics(running):
    x, _ = correlated(n=200, d=8, seed=6)
    neck = NECKS.build("whitening", 8, running=running).train()
    for i in range(3):
        neck(x[50 * i : 50 * i + 100])
    neck.eval()
    before = {k: v.clone() for k, v in neck.state_dict().items()}
    if running == "whiten":
        w = neck.running_whiten[0].double()
    else:
        w = sym_fn(neck.running_cov[0].double(), lambda lam: (lam + EPS) ** -0.5)
    test = x[:20].float()
    y = neck(test)
    torch.testing.assert_close(y, ((test.double() - neck.running_mean) @ w.T).float())
    for i in (0, 7, 19):  # one image alone: the same output
        torch.testing.assert_close(neck(test[i : i + 1]), y[i : i + 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(neck(test[:5] * 10)[0], neck((test[:5] * 10)[:1])[0])
    for k, v in neck.state_dict().items():
        assert torch.equal(v, before[k]), k  # evaluation changes nothing


def test_running_cov_whitens_the_population_where_running_whiten_overshoots():
    """Batches of 32 from a fixed 64-d Gaussian (fewer samples than channels): the running
    average of the batch W's keeps eps^(-1/2)-sized null-space gains; W of the running covariance
    does not."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    cov = (q * torch.logspace(0, -2, 64, dtype=torch.float64)) @ q.T
    chol = torch.linalg.cholesky(cov)
    necks = {r: NECKS.build("whitening", 64, running=r).train() for r in ("cov", "whiten")}
    for _ in range(60):
        x = torch.randn(32, 64, generator=g, dtype=torch.float64) @ chol.T + 1.0
        for neck in necks.values():
            neck(x)
    spread = {}
    for name, neck in necks.items():
        w = neck.eval().eval_whitening_matrix()[0]
        spread[name] = torch.linalg.eigvalsh(w @ cov @ w.T)
    assert spread["cov"].min() > 0.3 and spread["cov"].max() < 3.0, spread["cov"]
    assert spread["whiten"].max() > 20.0, spread["whiten"]


# ---------------------------------------------------------------------------------------------
# BET queue


def test_bet_queue_covers_the_last_batches_fifo():
    batches = [
        correlated(n=n, d=12, seed=10 + i, shift=float(i))[0]
        for i, n in enumerate([20, 25, 30, 35, 40])
    ]
    neck = NECKS.build("whitening", 12, group_size=4, bet="queue", bet_queue=3).train()
    assert neck.queue_count.tolist() == [0, 0, 0]
    for i, b in enumerate(batches):
        neck(b)
        assert int((neck.queue_count > 0).sum()) == min(i + 1, 3)  # fills, then stays
    assert sorted(neck.queue_count.tolist()) == [30.0, 35.0, 40.0]  # oldest two dropped
    assert int(neck.queue_next) == 5 % 3
    current, _ = correlated(n=16, d=12, seed=99, shift=-2.0)
    mean, cov, _, _ = neck.statistics(current)
    union = torch.cat([*batches[2:], current])
    torch.testing.assert_close(mean, union.mean(0), atol=1e-12, rtol=0)
    full = batch_cov(union)
    blocks = torch.stack([full[4 * k : 4 * k + 4, 4 * k : 4 * k + 4] for k in range(3)])
    torch.testing.assert_close(cov, blocks, atol=1e-10, rtol=0)
    # and the output is the current batch whitened with the union's statistics
    expected = torch.cat(
        [
            (current[:, 4 * k : 4 * k + 4] - union.mean(0)[4 * k : 4 * k + 4])
            @ sym_fn(blocks[k] + EPS * torch.eye(4, dtype=torch.float64), lambda lam: lam**-0.5)
            for k in range(3)
        ],
        dim=1,
    )
    torch.testing.assert_close(neck(current), expected, atol=1e-10, rtol=0)


def test_bet_gradient_flows_only_through_the_current_batch():
    old = [correlated(n=24, d=6, seed=20 + i)[0].requires_grad_(True) for i in range(2)]
    neck = NECKS.build("whitening", 6, bet="queue", bet_queue=4).train()
    for b in old:
        neck(b)
    assert not any(t.requires_grad for t in neck.buffers())
    x = correlated(n=10, d=6, seed=30)[0].requires_grad_(True)
    weights = torch.randn(10, 6, dtype=torch.float64)
    (neck(x) * weights).sum().backward()
    assert all(b.grad is None for b in old)  # nothing reaches the queued features
    # = whitening the concatenation [detached queued features; x], loss on x's rows only
    x2 = x.detach().clone().requires_grad_(True)
    union = torch.cat([old[0].detach(), old[1].detach(), x2])
    mu = union.mean(0)
    w = sym_fn(batch_cov(union) + EPS * torch.eye(6, dtype=torch.float64), lambda lam: lam**-0.5)
    (((x2 - mu) @ w) * weights).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-10, rtol=0)
    assert x.grad.abs().sum() > 0


def test_state_dict_round_trip_keeps_the_queue():
    neck = NECKS.build("whitening", 8, bet="queue", bet_queue=2).train()
    for i in range(3):
        neck(correlated(n=30, d=8, seed=40 + i)[0])
    state = neck.state_dict()
    assert {
        "running_mean",
        "running_cov",
        "running_whiten",
        "queue_count",
        "queue_mean",
        "queue_scatter",
        "queue_next",
    } <= set(state)
    other = NECKS.build("whitening", 8, bet="queue", bet_queue=2).train()
    other.load_state_dict(state)
    x = correlated(n=30, d=8, seed=50)[0]
    torch.testing.assert_close(other(x), neck(x), atol=0, rtol=0)
    for k, v in neck.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    neck.reset_queue()
    assert neck.queue_count.sum() == 0


# ---------------------------------------------------------------------------------------------
# end to end

TINY = [*TINY_RUN, "loss.drw_epoch=2"]


def tiny_cfg(epochs, extra=()):
    return load_config(CONFIG, [*TINY, f"train.epochs={epochs}", *extra])


def test_config_combination():
    cfg = load_config(CONFIG, ["data=cifar10_lt"])
    assert (cfg.model.neck, cfg.model.head, cfg.loss.name, cfg.sampler.name) == (
        "whitening",
        "cosine",
        "ldam",
        "b3rs",
    )
    assert cfg.model.neck_params["bet"] == "queue" and cfg.loss.drw_epoch == 160
    for name in ("cifar100_lt", "fashion_mnist_lt"):
        other = load_config(CONFIGS / "methods" / "whitening_ldam_drw.yaml", [f"data={name}"])
        assert other.model.neck_params == cfg.model.neck_params and other.sampler.name == "b3rs"


def test_tiny_fit_and_eval_reproduce(tiny_cifar_root, tmp_path, capsys):
    run_dir = tmp_path / "wb"
    metrics = fit(tiny_cfg(6), run_dir, tiny_cifar_root)
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert metrics["top1"] > 25.0  # chance: 10 %
    weights = load_file(str(run_dir / "model.safetensors"))
    assert weights["neck.queue_count"].tolist() == [32.0] * 4  # b3rs: whole batches
    assert not torch.equal(weights["neck.running_whiten"], torch.eye(64)[None])
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--data-root", str(tiny_cifar_root), "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((run_dir / "metrics.json").read_text())
    for key in ("top1", "many", "medium", "few", "per_class", "ece", "confusion"):
        assert again[key] == saved[key], key


def test_resume_is_bit_exact_with_the_queue(tiny_cifar_root, tmp_path):
    cfg = tiny_cfg(2, ["model.neck_params.method=newton_schulz"])
    fit(cfg, tmp_path / "straight", tiny_cifar_root)
    assert fit(cfg, tmp_path / "killed", tiny_cifar_root, stop_after_epoch=1) is None
    fit(cfg, tmp_path / "killed", tiny_cifar_root, resume=True)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys() and "neck.queue_scatter" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------
# real data


def mean_abs_offdiag_corr(features: torch.Tensor) -> float:
    """Mean |corr(i, j)| over channel pairs i != j; constant (dead ReLU) channels are left out."""
    f = features.double()
    std = f.std(0)
    f = f[:, std > 1e-8 * std.max()]
    c = torch.corrcoef(f.T)
    d = c.shape[0]
    return float((c - torch.diag(c.diagonal())).abs().sum() / (d * (d - 1)))


def held_out_features(run_dir: Path, data_root: Path) -> torch.Tensor:
    cfg = load_config(run_dir / "config.yaml")
    run = build_run(cfg, run_dir / "reload", data_root)
    model = run.method.model
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    model.eval()
    data = run.data
    with torch.no_grad():
        return torch.cat(
            [
                model.forward_features(b.images)
                for b in eval_batches(
                    data.test.images, data.test.labels, 256, data.mean, data.std, run.device
                )
            ]
        )


@pytest.mark.realdata
def test_whitening_decorrelates_classifier_inputs_on_real_cifar10_lt(real_data_root, tmp_path):
    """ResNet-8 on real CIFAR-10-LT (IF100 capped at 300 images a class), B3RS + LDAM, 2 epochs
    (lr 0.1, then 0.001 so that the running statistics settle, like the end of the real recipe):
    the classifier inputs of the ~1,000 held-out test images are far less correlated with the
    whitening neck (evaluation mode: running statistics) than with the identity neck."""
    start = time.process_time()  # CPU time: wall time depends on the machine's load
    common = [
        "data=cifar10_lt",
        "model.backbone=resnet8",
        "train.progress=false",
        "train.epochs=2",
        "schedule.warmup_epochs=0",
        "schedule.milestones=[1]",
        "schedule.gamma=0.01",
        "data.max_per_class=300",
        "data.max_test_per_class=100",
        "data.val_per_class=10",
        "train.batch_size=64",
    ]
    corr = {}
    for neck, extra in (("whitening", []), ("identity", ["model.neck_params={}"])):
        run_dir = tmp_path / neck
        fit(load_config(CONFIG, [*common, f"model.neck={neck}", *extra]), run_dir, real_data_root)
        features = held_out_features(run_dir, real_data_root)
        assert features.shape[1] == 64 and features.shape[0] > 900
        corr[neck] = mean_abs_offdiag_corr(features)
    print("mean |off-diagonal correlation| of the classifier inputs:", corr)
    assert corr["identity"] > 0.2  # CE-style features are strongly correlated
    assert corr["whitening"] < 0.5 * corr["identity"], corr
    assert time.process_time() - start < 120  # measured 21 s CPU (wall 22 s idle, 645 s loaded)
