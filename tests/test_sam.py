"""SAM and RSAM (longtail/optim/sam.py) through the closure protocol of OptimWrapper.update: the
perturbations and updates against hand-computed numbers, RSAM's noise statistics and decay
schedule, closure counts, exact restoration of the weights, bit-exact resume, an end-to-end SAM
run that `longtail eval` reproduces, fp16 loss scaling (same step as unscaled, overflow
skipped, end-to-end run), and 2 DDP ranks equal to one process."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import TINY_RUN
from safetensors.torch import load_file

from longtail.cli import main
from longtail.core.config import OptimConfig, load_config
from longtail.core.errors import ConfigError
from longtail.core.io import load_checkpoint
from longtail.engine.config_check import check_config
from longtail.engine.trainer import fit
from longtail.optim import build_optimizer, set_lr
from longtail.optim.sam import RSAM, SAM, rsam_noise_factor

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = [*TINY_RUN]


def optim_cfg(**kw) -> OptimConfig:
    base = dict(lr=0.1, momentum=0.0, weight_decay=0.0)
    base.update(kw)
    return OptimConfig(**base)


def recording_closure(params, loss_fn, log, clip=None):
    """A closure in the Method's shape that records the weights it was evaluated at."""

    def closure():
        log.append([p.detach().clone() for p in params])
        for p in params:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        return loss.detach()

    return closure


# ------------------------------------------------------------------------------------ SAM numbers


def test_sam_perturbation_is_rho_g_over_norm_on_a_linear_model():
    # f = x.w + b, L = (f - t)^2 at x = (1, 2), w = (0.5, -1), b = 0.25, t = 1:
    # f = -1.25, r = f - t = -2.25, g_w = 2 r x = (-4.5, -9), g_b = 2 r = -4.5,
    # |g| = sqrt(4.5^2 + 9^2 + 4.5^2) = sqrt(121.5) over all parameters together
    w = nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([0.25], dtype=torch.float64))
    x, t = torch.tensor([1.0, 2.0], dtype=torch.float64), 1.0
    opt = build_optimizer(optim_cfg(name="sam", rho=0.05), [w, b])
    assert isinstance(opt, SAM)
    log = []
    loss = opt.step(recording_closure([w, b], lambda: ((x @ w + b - t) ** 2).sum(), log))
    assert float(loss) == pytest.approx(2.25**2)  # the loss at w, not at w + e
    assert len(log) == 2
    norm = math.sqrt(121.5)
    e_w = [0.05 * -4.5 / norm, 0.05 * -9.0 / norm]
    e_b = [0.05 * -4.5 / norm]
    torch.testing.assert_close(log[1][0] - log[0][0], torch.tensor(e_w, dtype=torch.float64))
    torch.testing.assert_close(log[1][1] - log[0][1], torch.tensor(e_b, dtype=torch.float64))
    assert math.isclose(math.sqrt(sum(v * v for v in e_w + e_b)), 0.05)


def test_sam_update_is_base_sgd_with_the_gradient_at_w_plus_e():
    # L = 0.5 (1 w1^2 + 4 w2^2) at w = (1, 1): g = (1, 4), e = rho (1, 4)/sqrt(17),
    # g' = (1 (1 + e1), 4 (1 + e2)), w_new = w - lr g'   (rho 0.1, lr 0.1, plain SGD)
    a = torch.tensor([1.0, 4.0], dtype=torch.float64)
    w = nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = build_optimizer(optim_cfg(name="sam", rho=0.1), [w])
    opt.step(recording_closure([w], lambda: 0.5 * (a * w * w).sum(), []))
    e1, e2 = 0.1 / math.sqrt(17), 0.4 / math.sqrt(17)
    expected = [1 - 0.1 * (1 + e1), 1 - 0.1 * 4 * (1 + e2)]  # 0.8975746..., 0.5611943...
    torch.testing.assert_close(w.detach(), torch.tensor(expected, dtype=torch.float64))
    assert expected == pytest.approx([0.8975746, 0.5611943], abs=1e-7)


def test_adaptive_sam_scales_by_the_weights():
    # ASAM (as davda54/sam): e = rho w^2 g / | |w| g |; L as above at w = (2, 0.5): g = (2, 2),
    # |w| g = (4, 1), w^2 g = (8, 0.5)
    a = torch.tensor([1.0, 4.0], dtype=torch.float64)
    w = nn.Parameter(torch.tensor([2.0, 0.5], dtype=torch.float64))
    opt = build_optimizer(optim_cfg(name="sam", rho=0.1, adaptive=True, lr=0.0), [w])
    log = []
    opt.step(recording_closure([w], lambda: 0.5 * (a * w * w).sum(), log))
    e = torch.tensor([8.0, 0.5], dtype=torch.float64) * 0.1 / math.sqrt(17)
    torch.testing.assert_close(log[1][0] - log[0][0], e)


def test_clipping_the_first_gradient_leaves_the_sam_perturbation_unchanged():
    a = torch.tensor([1.0, 4.0], dtype=torch.float64)
    perturbations = []
    for clip in (None, 0.01):
        w = nn.Parameter(torch.ones(2, dtype=torch.float64))
        log = []
        build_optimizer(optim_cfg(name="sam", rho=0.1, lr=0.0), [w]).step(
            recording_closure([w], lambda w=w: 0.5 * (a * w * w).sum(), log, clip=clip)
        )
        perturbations.append(log[1][0] - log[0][0])
    torch.testing.assert_close(perturbations[0], perturbations[1], rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------------ RSAM numbers


def test_rsam_perturbation_statistics():
    n = 400_000
    w = nn.Parameter(torch.zeros(n))
    opt = build_optimizer(optim_cfg(name="rsam", rho=0.05, dis_mul=0.1), [w], seed=3)
    assert isinstance(opt, RSAM)
    opt.set_epoch(1)  # decay factor 1 (no DRW: 1 at every epoch)
    log = []
    opt.step(recording_closure([w], lambda: w.sum() * 0.0, log))
    e = log[0][0].double()
    scale = 0.05 * 0.1
    assert float(e.std()) == pytest.approx(
        scale / 3, rel=0.01
    )  # 1.67e-3; clamping at 3 sigma: -0.3 %
    assert abs(float(e.mean())) < 5 * scale / 3 / math.sqrt(n)
    assert float(e.abs().max()) <= scale * (1 + 1e-6)  # |xi| <= 1 ...
    assert int((e.abs() >= scale * (1 - 1e-6)).sum()) > 0  # ... reached by the clamp
    frac = float((e.abs() >= scale * (1 - 1e-6)).double().mean())
    assert frac == pytest.approx(0.0027, rel=0.15)  # P(|N(0,1)| > 3)


@pytest.mark.parametrize(
    "fix, expected", [(False, [2.0, 1.0, 1.0, 0.5, 0.5]), (True, [1.0, 1.0, 1.0, 0.5, 0.5])]
)
def test_rsam_decay_schedule(fix, expected):
    epochs = [0, 1, 59, 60, 69]
    # GNM-PT: reweight_epoch 59 (CB weights for epoch > 59) = our drw_epoch 60
    assert [rsam_noise_factor(e, 60, fix) for e in epochs] == expected
    opt = build_optimizer(
        optim_cfg(name="rsam", fix_epoch0_quirk=fix),
        [nn.Parameter(torch.zeros(3))],
        loss=SimpleNamespace(drw_epoch=60),
    )  # the loss's DRW epoch
    got = []
    for e in epochs:
        opt.set_epoch(e)
        got.append(opt.noise_factor() / (0.05 * 0.1))
    assert got == pytest.approx(expected, rel=1e-12)
    explicit = build_optimizer(
        optim_cfg(name="rsam", decay_epoch=10),
        [nn.Parameter(torch.zeros(1))],
        loss=SimpleNamespace(drw_epoch=60),
    )
    assert explicit.decay_epoch == 10  # the option wins
    plain = build_optimizer(optim_cfg(name="rsam"), [nn.Parameter(torch.zeros(1))])
    assert [plain.noise_factor(e) / 0.005 for e in (0, 1, 500)] == pytest.approx([1.0, 1.0, 1.0])


@pytest.mark.parametrize("name, calls", [("sgd", 1), ("rsam", 1), ("sam", 2)])
def test_closure_calls_per_step(name, calls):
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = build_optimizer(optim_cfg(name=name), [w])
    log = []
    for _ in range(3):
        opt.step(recording_closure([w], lambda: (w**2).sum(), log))
    assert len(log) == 3 * calls


@pytest.mark.parametrize("name", ["rsam", "sam"])
def test_weights_restored_exactly(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    opt = build_optimizer(OptimConfig(name=name, lr=0.1, momentum=0.9, weight_decay=5e-4), params)
    set_lr(opt, 0.0)  # lr 0: the step itself changes nothing
    x, y = torch.randn(16, 7), torch.randint(0, 3, (16,))
    log = []
    for _ in range(2):
        opt.step(recording_closure(params, lambda: nn.functional.cross_entropy(model(x), y), log))
    assert any(not torch.equal(a, b) for a, b in zip(log[-1], before))  # it did perturb
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_wrappers_share_the_base_param_groups_and_resume_their_state():
    w = nn.Parameter(torch.zeros(1000))
    cfg = OptimConfig(name="rsam", lr=0.1, momentum=0.9)
    opt = build_optimizer(cfg, [w], seed=1)
    assert opt.param_groups is opt.base.param_groups and opt.param_groups[0]["base_lr"] == 0.1
    set_lr(opt, 0.5)
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.05)

    def run(o, steps):
        log = []
        for _ in range(steps):
            o.step(recording_closure([w], lambda: (w * torch.arange(1000.0)).sum(), log))
        return log

    opt.set_epoch(3)
    run(opt, 2)
    state = copy.deepcopy(opt.state_dict())  # as a checkpoint: not the live tensors
    w_saved = w.detach().clone()
    ahead = run(opt, 2)
    w_ahead = w.detach().clone()
    with torch.no_grad():
        w.copy_(w_saved)
    fresh = build_optimizer(cfg, [w], seed=1)
    fresh.load_state_dict(state)
    assert fresh.epoch == 3 and fresh.param_groups is fresh.base.param_groups
    again = run(fresh, 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ahead, again))  # same noise, same points
    assert torch.equal(w.detach(), w_ahead)  # same momentum state
    with pytest.raises(ValueError, match="rsam"):  # resumed with another optimiser
        build_optimizer(OptimConfig(name="sam"), [w]).load_state_dict(state)


def test_config_errors():
    with pytest.raises(
        ConfigError, match=r"'optim\.rho': Input should be greater than or equal to 0"
    ):
        check_config(
            load_config(
                CONFIGS / "methods" / "ce.yaml", ["data=cifar10_lt", "optim=sam", "optim.rho=-0.1"]
            )
        )
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.rho'.*optimizer 'sgd'"):
        check_config(
            load_config(CONFIGS / "methods" / "ce.yaml", ["data=cifar10_lt", "optim.rho=0.1"])
        )
    with pytest.raises(ConfigError, match=r"optim\.base"):
        build_optimizer(OptimConfig(name="sam", base="rsam"), [nn.Parameter(torch.zeros(1))])
    with pytest.raises(ConfigError, match="sgd"):  # unknown base: the choices
        build_optimizer(OptimConfig(name="rsam", base="adamz"), [nn.Parameter(torch.zeros(1))])


# ------------------------------------------------------------------------------------- engine runs


def test_rsam_gcl_drw_resume_is_bit_exact(tiny_cifar_root, tmp_path):
    # DRW (and the noise halving) from epoch 2 of 3: epoch 0 factor 2, epoch 1 factor 1, epoch 2 0.5
    cfg = load_config(
        CONFIGS / "methods" / "rsam_gcl_drw.yaml", [*TINY, "train.epochs=3", "loss.drw_epoch=2"]
    )
    assert cfg.optim.name == "rsam" and cfg.loss.name == "gcl"
    fit(cfg, tmp_path / "straight", tiny_cifar_root)
    assert fit(cfg, tmp_path / "killed", tiny_cifar_root, stop_after_epoch=1) is None
    state = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert state["epoch"] == 1 and state["optim"]["optimizer"]["kind"] == "rsam"
    fit(cfg, tmp_path / "killed", tiny_cifar_root, resume=True)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    h1, h2 = (
        [json.loads(x)["loss"] for x in (d / "history.jsonl").read_text().splitlines()]
        for d in (tmp_path / "straight", tmp_path / "killed")
    )
    assert h1 == h2 and all(np.isfinite(h1))


def test_sam_trains_end_to_end_and_eval_reproduces_metrics(tiny_cifar_root, tmp_path, capsys):
    run_dir = tmp_path / "sam"
    # the CE run of test_engine.py (4 epochs, > 40 % there with SGD) with optim.name=sam
    cfg = load_config(CONFIGS / "methods" / "ce.yaml", [*TINY, "train.epochs=4", "optim.name=sam"])
    metrics = fit(cfg, run_dir, tiny_cifar_root)
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    # 10 colour classes, chance 10 %; 16 steps on 118 images: test top-1 of seeds 0/1/2 measured
    # 30/48/80 % with SAM (rho 0.05), 60/66/81 % with SGD
    assert metrics["top1"] >= 20.0
    weights = load_file(str(run_dir / "model.safetensors"))
    steps = math.ceil(sum(metrics["class_counts"]) / 32) * 4
    tracked = [v for k, v in weights.items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == steps for v in tracked)  # BN statistics: once per step
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--data-root", str(tiny_cifar_root), "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((run_dir / "metrics.json").read_text())
    for key in ("top1", "many", "medium", "few", "per_class", "ece", "confusion"):
        assert again[key] == saved[key], key


def _scaled_closure(model, x, y, scaler, clip):
    """The closure of OptimWrapper.update under fp16: scaled backward, clip at clip x scale."""

    def closure():
        for p in model.parameters():
            p.grad = None
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip * float(scaler.get_scale()))
        return loss.detach()

    return closure


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("name", ["sam", "rsam"])
def test_loss_scaled_step_equals_the_unscaled_step(name, clip):
    # fp16's GradScaler: gradients x 1024 in every closure, one unscale + check in the base step;
    # the weights after 3 steps equal those of the plain step (SAM's e is scale-free)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
    scaled = copy.deepcopy(plain)
    start = [p.detach().clone() for p in plain.parameters()]
    x, y = torch.randn(16, 7), torch.randint(0, 3, (16,))
    cfg = OptimConfig(name=name, lr=0.5, momentum=0.9, weight_decay=5e-4, rho=0.5)
    opt_a, opt_b = (
        build_optimizer(cfg, plain.parameters()),
        build_optimizer(cfg, scaled.parameters()),
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(3):
        opt_a.step(
            recording_closure(
                list(plain.parameters()),
                lambda: nn.functional.cross_entropy(plain(x), y),
                [],
                clip=clip,
            )
        )
        opt_b.step(_scaled_closure(scaled, x, y, scaler, clip), base_step=scaler.step)
        scaler.update()
    assert scaler.get_scale() == 1024.0  # no overflow, no skipped step
    assert any(not torch.equal(a, s0) for a, s0 in zip(plain.parameters(), start))  # it stepped
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sam", "rsam"])
def test_overflowing_step_is_skipped_and_the_scale_halves(name):
    model = nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(OptimConfig(name=name, lr=0.1, rho=0.05), model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)

    def closure():
        for p in model.parameters():
            p.grad = None
        loss = model(torch.full((4, 3), 1e38)).square().sum()  # inf in float32
        scaler.scale(loss).backward()
        return loss.detach()

    opt.step(closure, base_step=scaler.step)
    scaler.update()
    assert scaler.get_scale() == 2.0**15
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)  # restored and not stepped


@pytest.mark.parametrize("name", ["sgd", "sam", "rsam"])
def test_fp16_autocast_trains_end_to_end(name, tiny_cifar_root, tmp_path):
    cfg = load_config(
        CONFIGS / "methods" / "ce.yaml",
        [*TINY, "train.epochs=2", f"optim.name={name}", "train.amp=fp16", "optim.grad_clip=5.0"],
    )
    metrics = fit(cfg, tmp_path / name, tiny_cifar_root)
    rows = [
        json.loads(line) for line in (tmp_path / name / "history.jsonl").read_text().splitlines()
    ]
    assert all(np.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    assert metrics["top1"] > 10.0  # above chance (10 classes)


# --------------------------------------------- DDP: 2 spawned gloo ranks (no BN) = one process


def _ddp_losses_and_weights(root: Path):
    from test_distributed import CONFIG
    from test_distributed import TINY as DTINY

    from longtail.engine import trainer

    out = {}
    for name in ("sam", "rsam"):
        # 149 images, batch 32: the last batch splits 11 + 10 (grad_scale weighting applies)
        cfg = load_config(
            CONFIG,
            [
                *DTINY,
                "train.batch_size=32",
                "optim.lr=0.01",
                f"optim.name={name}",
                "optim.rho=0.5",
                "train.epochs=1",
            ],
        )
        run = trainer.build_run(cfg, Path("unused"), root)
        loss = trainer.train_one_epoch(run, 0, None)["loss"]
        out[name] = {"loss": loss, "state": run.method.model.state_dict()}
    return out


def _spawned(rank: int, port: int, root: str, out: str) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )
    torch.set_num_threads(1)
    from test_distributed import _without_bn

    from longtail.core.distributed import shutdown_distributed
    from longtail.engine import trainer

    build = trainer.build_model
    trainer.build_model = lambda *a, **k: _without_bn(build(*a, **k))
    try:
        result = _ddp_losses_and_weights(Path(root))
        if rank == 0:
            torch.save(result, out)
    finally:
        shutdown_distributed()


@pytest.mark.slow
def test_ddp_sam_and_rsam_equal_one_process(tiny_cifar_root, tmp_path, monkeypatch):
    """Equal to one process only if SAM's |g| uses the all-reduced gradient (no no_sync) and
    RSAM draws the same noise on every rank (a shared seed)."""
    import torch.multiprocessing as mp
    from test_distributed import _without_bn, free_port, join_or_fail

    from longtail.engine import trainer

    out = tmp_path / "rank0.pt"
    ctx = mp.start_processes(
        _spawned,
        args=(free_port(), str(tiny_cifar_root), str(out)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    build = trainer.build_model
    monkeypatch.setattr(trainer, "build_model", lambda *a, **k: _without_bn(build(*a, **k)))
    single = _ddp_losses_and_weights(tiny_cifar_root)
    join_or_fail(ctx, timeout=300)
    two = torch.load(out, weights_only=True)
    for name in ("sam", "rsam"):
        assert np.isfinite(single[name]["loss"])
        # float32 rounding of the 2-rank gradient average: ~1e-6 relative in the loss, up to
        # 3.3e-6 absolute in a weight after the epoch (measured on an AVX2 CPU; 0 on an AVX-512
        # one), well below what one step moves a weight (lr 0.01 x its gradient, ~1e-3)
        np.testing.assert_allclose(two[name]["loss"], single[name]["loss"], rtol=1e-5)
        for key, value in single[name]["state"].items():
            torch.testing.assert_close(
                two[name]["state"][key], value, rtol=1e-5, atol=2e-5, msg=f"{name} {key}"
            )
