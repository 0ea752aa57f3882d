"""MFM (longtail.methods.mfm, longtail.models.modulator) on a tiny real-format CIFAR-10: identity
at initialisation (both variants), modulation only where the flags say (training batches; not the
meta or test forward by default), a tiny `fit` end to end with `longtail eval` reproducing
metrics.json, bit-exact resume on CPU, and a saved modulator reused frozen, without a meta set, on
another dataset (a tiny Fashion-MNIST: 1-channel inputs, the same 16/32/64 stage widths)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import write_idx_folder
from safetensors.torch import load_file

from longtail.cli import main
from longtail.core.config import ModelConfig, load_config
from longtail.core.errors import ConfigError, LongtailError
from longtail.core.io import load_checkpoint
from longtail.data.augment import normalize
from longtail.data.loader import Batch
from longtail.engine.trainer import build_run, fit
from longtail.models import build_model
from longtail.models.modulator import StageModulation, build_modulator

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = [
    "model.backbone=resnet8",
    "data.imbalance_factor=10",
    "data.val_per_class=3",
    "train.batch_size=32",
    "train.eval_batch_size=64",
    "train.progress=false",
    "schedule.warmup_epochs=1",
    "schedule.milestones=[2]",
    "schedule.gamma=0.1",
]
META = ["data.meta_per_class=2", "method.meta_batch_size=10"]
COMPARED = ("top1", "many", "medium", "few", "per_class", "ece", "confusion")


def mfm_cfg(epochs=3, *extra, dataset="cifar10_lt"):
    return load_config(
        CONFIGS / "methods" / "mfm.yaml",
        [f"data={dataset}", *TINY, *META, f"train.epochs={epochs}", *extra],
    )


def write_fashion_mnist(root: Path, train_per_class: int = 30, test_per_class: int = 10) -> Path:
    """A small Fashion-MNIST in the official idx layout (conftest's writer, seed 0)."""
    return write_idx_folder(root, "FashionMNIST", train_per_class, test_per_class, seed=0)


@pytest.fixture(scope="module")
def mfm_run(tiny_cifar_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mfm") / "straight"
    metrics = fit(mfm_cfg(3), run_dir, tiny_cifar_root)
    return run_dir, metrics


# ------------------------------------------------------------------------------------ the modulator


@pytest.mark.parametrize("variant", ["direct", "network"])
def test_identity_at_initialisation(variant):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet8"), 10, 3)
    plain = copy.deepcopy(model)
    hooks = StageModulation(model.backbone, build_modulator(model.backbone, variant))
    x = torch.randn(8, 3, 32, 32)
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(plain, mode)()
        with hooks.active(True):
            out = model(x)
        ref = plain(x)
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.features, ref.features), mode


def test_modulator_shapes_and_stages():
    model = build_model(ModelConfig(backbone="resnet8"), 10, 1)
    mod = build_modulator(model.backbone, "network")
    assert mod.stages == [0, 1, 2] and mod.channels == [16, 32, 64]
    assert mod.mods[2].fc1.out_features == 16 and mod.mods[2].fc2.out_features == 128
    assert build_modulator(model.backbone, "direct", stages=[-1]).stages == [2]
    with pytest.raises(ConfigError, match="method.stages"):
        build_modulator(model.backbone, "network", stages=[3])
    with pytest.raises(ConfigError, match="method.variant"):
        build_modulator(model.backbone, "film")


def perturb(modulator, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in modulator.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))


def count_calls(modulator):
    calls = []
    modulator.register_forward_hook(lambda m, args, out: calls.append(args[0]))
    return calls


def tiny_batch(run, n=16):
    data = run.data
    images = normalize(data.train.images[:n], data.mean, data.std).contiguous(
        memory_format=torch.channels_last
    )
    return Batch(images, data.train.labels[:n], torch.arange(n))


@pytest.mark.parametrize("modulate_meta", [False, True])
def test_only_training_batches_are_modulated(tiny_cifar_root, tmp_path, modulate_meta):
    run = build_run(mfm_cfg(1, f"method.modulate_meta={modulate_meta}"), tmp_path, tiny_cifar_root)
    method = run.method
    perturb(method.modulator)
    calls = count_calls(method.modulator)
    batch = tiny_batch(run)
    method.train_model.train()
    bn = method.model.backbone.bn1
    tracked = int(bn.num_batches_tracked)
    stats = method.train_step(batch)
    # virtual training forward + real training forward (+ the meta forward if asked), 3 stages each
    assert len(calls) == 3 * (3 if modulate_meta else 2)
    assert int(bn.num_batches_tracked) == tracked + 1  # only the real step moves BN
    assert set(stats) == {"loss", "meta_loss"} and method.meta_steps == 1
    # evaluation forwards are unmodulated unless modulate_at_test
    method.model.eval()
    calls.clear()
    with torch.no_grad():
        default = method.model(batch.images).logits
        with method.modulation.active(False):
            plain = method.model(batch.images).logits
        with method.modulation.active(True):
            modulated = method.model(batch.images).logits
    assert torch.equal(default, plain) and not torch.allclose(default, modulated)
    assert len(calls) == 3


def test_modulate_at_test(tiny_cifar_root, tmp_path):
    run = build_run(mfm_cfg(1, "method.modulate_at_test=true"), tmp_path, tiny_cifar_root)
    perturb(run.method.modulator)
    model = run.method.model.eval()
    x = tiny_batch(run).images
    with torch.no_grad():
        default = model(x).logits
        with run.method.modulation.active(True):
            modulated = model(x).logits
        with run.method.modulation.active(False):
            plain = model(x).logits
    assert torch.equal(default, modulated) and not torch.allclose(default, plain)


def test_configuration_errors(tiny_cifar_root, tmp_path):
    with pytest.raises(ConfigError, match="data.meta_per_class"):
        build_run(mfm_cfg(1, "data.meta_per_class=0"), tmp_path / "a", tiny_cifar_root)
    with pytest.raises(ConfigError, match="method.modulator"):
        build_run(mfm_cfg(1, "method.freeze_modulator=true"), tmp_path / "b", tiny_cifar_root)
    with pytest.raises(ConfigError, match="method.meta_optimizer"):
        build_run(mfm_cfg(1, "method.meta_optimizer=lbfgs"), tmp_path / "c", tiny_cifar_root)
    with pytest.raises(ConfigError, match="method.meta_lrr"):
        build_run(mfm_cfg(1, "method.meta_lrr=0.1"), tmp_path / "d", tiny_cifar_root)


def test_configs_load():
    for dataset in ("cifar10_lt", "cifar100_lt", "fashion_mnist_lt"):
        cfg = load_config(CONFIGS / "methods" / "mfm.yaml", [f"data={dataset}"])
        assert cfg.method.name == "mfm" and cfg.data.meta_per_class == 10
        assert cfg.data.meta_from == "unused" and cfg.method.params()["meta_batch_size"] == 100
        ce = load_config(CONFIGS / "methods" / "ce.yaml", [f"data={dataset}"])
        assert cfg.optim == ce.optim and cfg.train == ce.train and cfg.model == ce.model


# ------------------------------------------------------------------------------------ runs


def test_fit_end_to_end(mfm_run):
    run_dir, metrics = mfm_run
    for name in (
        "config.yaml",
        "history.jsonl",
        "last.pt",
        "model.safetensors",
        "metrics.json",
        "modulator.safetensors",
    ):
        assert (run_dir / name).is_file(), name
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all("meta_loss" in r for r in rows)
    info = metrics["mfm"]
    assert info["variant"] == "network" and info["meta_images"] == 20
    assert info["meta_borrowed"] == [2] + [0] * 9 and metrics["class_counts"][0] == 28
    assert info["meta_steps"] == 3 * 4  # 116 images / 32 = 4 steps
    saved = load_file(str(run_dir / "modulator.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "fc2" in k)  # it learned
    state = load_checkpoint(run_dir / "last.pt")["method"]["mfm"]
    for key, value in saved.items():
        assert torch.equal(state["modulator"][key], value)
    # the model weights are a plain Classifier (no modulator inside)
    assert not any("mods." in k for k in load_file(str(run_dir / "model.safetensors")))


def test_eval_reproduces_metrics_json(mfm_run, tiny_cifar_root, capsys):
    run_dir, _ = mfm_run
    assert main(["eval", str(run_dir), "--data-root", str(tiny_cifar_root), "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((run_dir / "metrics.json").read_text())
    for key in (*COMPARED, "mfm"):
        assert again[key] == saved[key], key
    assert again["val"]["top1"] == saved["val"]["top1"]


def test_resume_is_bit_exact(mfm_run, tiny_cifar_root, tmp_path):
    straight, _ = mfm_run
    killed = tmp_path / "killed"
    assert fit(mfm_cfg(3), killed, tiny_cifar_root, stop_after_epoch=1) is None
    assert load_checkpoint(killed / "last.pt")["method"]["mfm"]["meta_steps"] == 4
    fit(mfm_cfg(3), killed, tiny_cifar_root, resume=True)
    for name in ("model.safetensors", "modulator.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(killed / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    rows = [
        [json.loads(x) for x in (d / "history.jsonl").read_text().splitlines()]
        for d in (straight, killed)
    ]
    assert [(r["loss"], r["meta_loss"]) for r in rows[0]] == [
        (r["loss"], r["meta_loss"]) for r in rows[1]
    ]


def test_saved_modulator_transfers_frozen_without_meta_set(mfm_run, tmp_path):
    run_dir, _ = mfm_run
    source = load_file(str(run_dir / "modulator.safetensors"))
    fm_root = write_fashion_mnist(tmp_path / "fm")
    cfg = load_config(
        CONFIGS / "methods" / "ce.yaml",
        [
            "data=fashion_mnist_lt",
            *TINY,
            "train.epochs=2",
            "method.name=mfm",
            f"method.modulator={run_dir / 'modulator.safetensors'}",
            "method.freeze_modulator=true",
        ],
    )
    assert cfg.data.meta_per_class == 0
    target = tmp_path / "fm-run"
    metrics = fit(cfg, target, fm_root)
    assert metrics["mfm"]["frozen"] and metrics["mfm"]["meta_steps"] == 0
    assert metrics["mfm"]["meta_images"] == 0
    after = load_file(str(target / "modulator.safetensors"))
    assert after.keys() == source.keys()
    for key in source:
        assert torch.equal(after[key], source[key]), key  # frozen
    # a run folder is accepted too, and a backbone with other stage widths is refused
    by_folder = load_config(
        CONFIGS / "methods" / "ce.yaml",
        [
            "data=fashion_mnist_lt",
            *TINY,
            "method.name=mfm",
            f"method.modulator={run_dir}",
            "method.freeze_modulator=true",
        ],
    )
    run = build_run(by_folder, tmp_path / "x", fm_root)
    assert all(not p.requires_grad for p in run.method.modulator.parameters())
    wide = load_config(
        CONFIGS / "methods" / "ce.yaml",
        [
            "data=fashion_mnist_lt",
            *TINY,
            "model.backbone_params={widths: [8, 16, 32]}",
            "method.name=mfm",
            f"method.modulator={run_dir}",
            "method.freeze_modulator=true",
        ],
    )
    with pytest.raises(LongtailError, match="stage widths"):
        build_run(wide, tmp_path / "y", fm_root)


def test_auto_deployment_is_chosen_on_val_and_kept_by_eval(
    mfm_run, tiny_cifar_root, tmp_path, capsys
):
    # a frozen modulator made strong (last layer x200), so modulated and unmodulated nets differ
    from safetensors import safe_open
    from safetensors.torch import save_file

    from longtail.engine.evaluate_run import load_finished_run
    from longtail.engine.trainer import evaluate_splits

    source = str(mfm_run[0] / "modulator.safetensors")
    with safe_open(source, framework="pt") as fh:
        meta = fh.metadata()
    strong = {k: v * 200 if "fc2" in k else v for k, v in load_file(source).items()}
    save_file(strong, str(tmp_path / "strong.safetensors"), metadata=meta)
    frozen = [f"method.modulator={tmp_path / 'strong.safetensors'}", "method.freeze_modulator=true"]
    run_dir = tmp_path / "auto"
    metrics = fit(mfm_cfg(3, *frozen, "method.modulate_at_test=auto"), run_dir, tiny_cifar_root)

    val = {}
    run = load_finished_run(run_dir, tiny_cifar_root)
    for flag in (False, True):  # the same weights, evaluated with each flag
        run.method.modulation.default = flag
        val[str(flag).lower()] = evaluate_splits(run)["val"]["top1"]
    choice = metrics["mfm"]["deploy_choice"]
    assert val["true"] != val["false"]
    assert choice["val_top1_unmodulated"] == pytest.approx(val["false"])
    assert choice["val_top1_modulated"] == pytest.approx(val["true"])
    assert choice["deployed"] == ("modulated" if val["true"] > val["false"] else "unmodulated")
    assert metrics["val"]["top1"] == pytest.approx(max(val.values()))
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--data-root", str(tiny_cifar_root), "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["val"]["top1"] == metrics["val"]["top1"] and again["top1"] == metrics["top1"]
    assert again["mfm"]["deploy_choice"] == choice
    with pytest.raises(ConfigError, match="modulate_at_test"):
        build_run(
            mfm_cfg(1, "method.modulate_at_test=sometimes"), tmp_path / "bad", tiny_cifar_root
        )
