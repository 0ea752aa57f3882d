"""The training engine on a CUDA device (``pytest -m cuda``; skipped without one): AMP (bf16, fp16
with GradScaler), channels_last, torch.compile (default, reduce-overhead), SAM / RSAM, exact
resume on the GPU, and GPU evaluation equal to CPU evaluation of the same weights.

Tiny real-format CIFAR-10 (conftest's ``tiny_cifar_root``, ResNet-8): 118 training images,
batches 32, 32, 32, 22 an epoch, 100 test images.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN
from safetensors.torch import load_file

from longtail.core.config import load_config
from longtail.core.io import load_checkpoint
from longtail.engine.evaluate import evaluate, predict_logits
from longtail.engine.evaluate_run import load_finished_run
from longtail.engine.trainer import build_run, fit, train_one_epoch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "methods"
DEVICE = "cuda"  # the tests' device (a module constant: the bodies can be dry-run on "cpu")


def cfg_for(*extra: str, config: str = "ce.yaml", epochs: int = 2):
    """The tiny run on DEVICE, fp32 unless ``extra`` says otherwise."""
    return load_config(
        CONFIGS / config,
        [*TINY_RUN, f"train.epochs={epochs}", f"train.device={DEVICE}", "train.amp=none", *extra],
    )


def weights(run) -> dict:
    return {k: v.detach().clone() for k, v in run.method.model.state_dict().items()}


def first_step_loss(run) -> float:
    """The loss of the first step of epoch 0, at the initial weights (it takes the step)."""
    batch = next(iter(run.loader.epoch(0)))
    return float(run.method.train_step(batch)["loss"])


@pytest.fixture
def build(tiny_cifar_root, tmp_path):
    """``build(cfg)``: the run ``longtail train`` builds (nothing is written), each in its own
    folder; the global RNG is seeded by build_run, so runs of one test start from equal weights."""
    count = iter(range(1000))

    def make(cfg):
        return build_run(cfg, tmp_path / f"run{next(count)}", tiny_cifar_root)

    return make


@pytest.fixture
def deterministic():
    """cuDNN restricted to deterministic algorithms, TF32 off (convolutions and matmuls in full
    fp32); restored afterwards. build_run turns cudnn.benchmark on: benchmarking then chooses
    among deterministic algorithms only, and its choice is cached for the process, so two runs
    in one test use the same algorithms."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.deterministic, cudnn.benchmark = True, False
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    yield
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


def train_epochs(run, epochs: int):
    """``epochs`` epochs through the engine's loop (it synchronises the device at each end)."""
    return [train_one_epoch(run, e, None) for e in range(epochs)]


def assert_finite_and_moved(run, before: dict) -> None:
    after = weights(run)
    for key, value in after.items():
        assert torch.isfinite(value.float()).all(), key
    moved = [
        k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])
    ]
    assert len(moved) > len(before) // 4, f"only {len(moved)} of {len(before)} tensors changed"


# ------------------------------------------------------------------------------------ AMP


@pytest.mark.parametrize(
    "amp, dtype, rel", [("bf16", torch.bfloat16, 5e-2), ("fp16", torch.float16, 2e-2)]
)
def test_amp_trains_with_finite_loss(build, amp, dtype, rel):
    ref = build(cfg_for())
    run = build(cfg_for(f"train.amp={amp}"))
    assert run.device.type == DEVICE and run.optim.amp_dtype is dtype
    assert run.optim.scaler.is_enabled() is (amp == "fp16")  # GradScaler only for fp16
    batch = next(iter(run.loader.epoch(0)))
    with torch.no_grad(), run.optim.autocast():
        assert run.method.train_model(batch.images).logits.dtype is dtype
    # same initial weights and batch: the autocast loss is the fp32 loss up to half precision
    assert first_step_loss(run) == pytest.approx(first_step_loss(ref), rel=rel)
    before = weights(run)
    rows = train_epochs(run, 3)
    assert all(math.isfinite(r["loss"]) for r in rows), rows
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns (10 colour classes)
    assert next(run.method.model.parameters()).dtype is torch.float32  # fp32 master weights
    assert_finite_and_moved(run, before)
    if amp == "fp16":
        scale = run.optim.scaler.get_scale()
        assert 0 < scale <= 2.0**16 and math.isfinite(scale)
        assert run.optim.state_dict()["scaler"]["scale"] == scale  # resumable


# --------------------------------------------------------------------------- memory format


def test_channels_last_trains_like_contiguous(build):
    contiguous = build(cfg_for("train.channels_last=false"))
    nhwc = build(cfg_for("train.channels_last=true"))
    batch = next(iter(nhwc.loader.epoch(0)))
    assert batch.images.device.type == DEVICE
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    conv = next(m for m in nhwc.method.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert first_step_loss(nhwc) == pytest.approx(first_step_loss(contiguous), rel=1e-2)
    before = weights(nhwc)
    rows = train_epochs(nhwc, 2)
    assert all(math.isfinite(r["loss"]) for r in rows), rows
    assert_finite_and_moved(nhwc, before)


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_matches_eager(build, mode):
    eager = build(cfg_for())
    compiled = build(cfg_for(f"train.compile={mode}"))
    assert compiled.cfg.train.compile_mode == mode
    assert hasattr(compiled.method.train_model, "_orig_mod")  # torch.compile's wrapper
    assert compiled.method.model is not compiled.method.train_model
    assert first_step_loss(compiled) == pytest.approx(first_step_loss(eager), rel=5e-3)
    before = weights(compiled)
    # two epochs: full batches and the short last one (22 images: another graph)
    rows = train_epochs(compiled, 2)
    assert all(math.isfinite(r["loss"]) for r in rows), rows
    assert_finite_and_moved(compiled, before)


# ------------------------------------------------------------------------------- SAM / RSAM


@pytest.mark.parametrize(
    "config, extra",
    [
        ("ce.yaml", ("optim=sam",)),
        ("ce.yaml", ("optim=sam", "train.amp=fp16")),
        ("rsam_gcl_drw.yaml", ()),
        ("rsam_gcl_drw.yaml", ("train.amp=bf16",)),
    ],
)
def test_sam_and_rsam_train_on_the_gpu(build, config, extra):
    run = build(cfg_for(*extra, config=config))
    optimizer = run.optim.optimizer
    assert type(optimizer).__name__ == ("SAM" if "optim=sam" in extra else "RSAM")
    if type(optimizer).__name__ == "RSAM":
        assert optimizer.generator.device.type == DEVICE  # noise drawn on the device
    before = weights(run)
    rows = train_epochs(run, 2)
    assert all(math.isfinite(r["loss"]) for r in rows), rows
    assert_finite_and_moved(run, before)
    # BatchNorm statistics move once a step, though SAM runs two forward passes a step
    tracked = [b for k, b in run.method.model.state_dict().items() if "num_batches_tracked" in k]
    assert tracked and all(int(b) == 2 * len(run.loader) for b in tracked)


# ----------------------------------------------------------------------------------- resume


def test_resume_on_the_gpu_is_bit_exact(tiny_cifar_root, tmp_path, deterministic):
    cfg = cfg_for(epochs=3)
    fit(cfg, tmp_path / "straight", tiny_cifar_root)
    assert fit(cfg, tmp_path / "killed", tiny_cifar_root, stop_after_epoch=1) is None
    state = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert state["epoch"] == 1
    fit(cfg, tmp_path / "killed", tiny_cifar_root, resume=True)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    h1 = (tmp_path / "straight" / "history.jsonl").read_text().splitlines()
    h2 = (tmp_path / "killed" / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in h1] == [json.loads(x)["loss"] for x in h2]
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert metrics["device"].startswith(DEVICE)


# ------------------------------------------------------------------------------- evaluation


def test_gpu_evaluation_equals_cpu_evaluation(tiny_cifar_root, tmp_path, deterministic):
    run_dir = tmp_path / "run"
    saved = fit(cfg_for(epochs=2), run_dir, tiny_cifar_root)  # trained and evaluated on the GPU
    run = load_finished_run(run_dir, tiny_cifar_root)  # `longtail eval`'s path: weights on GPU
    assert next(run.method.model.parameters()).device.type == DEVICE
    data, cl = run.data, run.cfg.train.channels_last
    cpu_model = copy.deepcopy(run.method.model).cpu()
    test = data.test
    common = dict(class_counts=data.class_counts, mean=data.mean, std=data.std, channels_last=cl)
    on_gpu = evaluate(run.method.model, test.images, test.labels, device=run.device, **common)
    on_cpu = evaluate(cpu_model, test.images, test.labels, device=torch.device("cpu"), **common)
    n = len(test.labels)
    one_image = 100.0 / n + 1e-9
    assert abs(on_gpu["top1"] - on_cpu["top1"]) <= one_image
    assert abs(saved["top1"] - on_cpu["top1"]) <= one_image  # metrics.json, written on the GPU
    # ECE (in %): a confidence moved into another bin by rounding moves it by < 1 image's share
    assert on_gpu["ece"] == pytest.approx(on_cpu["ece"], abs=one_image)
    gpu_logits = predict_logits(
        run.method.model, test.images, data.mean, data.std, device=run.device
    )
    cpu_logits = predict_logits(
        cpu_model, test.images, data.mean, data.std, device=torch.device("cpu")
    )
    assert gpu_logits.device.type == "cpu" and gpu_logits.shape == (n, len(data.class_counts))
    torch.testing.assert_close(gpu_logits, cpu_logits, rtol=1e-3, atol=1e-3)
    differ = int((gpu_logits.argmax(1) != cpu_logits.argmax(1)).sum())
    assert differ <= 1
