"""Parameter-efficient tuning inside whole runs (models/build.py, engine, hooks/class_mean.py):
model.tuning decides what the optimiser updates, the head's own lr, model.input_size, parameter
counts in metrics.json, classifier initialisation from class means, and the RSAM-PT recipes."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN
from safetensors.torch import load_file

from longtail.core.config import ModelConfig, load_config
from longtail.data.sources import build_bundle
from longtail.engine.trainer import fit
from longtail.models import build_model
from longtail.optim import param_groups

REPO = Path(__file__).resolve().parents[1]
CE = REPO / "configs" / "methods" / "ce.yaml"


def _run(tmp_path, root, *extra):
    cfg = load_config(CE, [*TINY_RUN, "train.epochs=1", "train.eval_every=0", *extra])
    metrics = fit(cfg, tmp_path / "run", root)
    assert metrics is not None
    return metrics, load_file(str(tmp_path / "run" / "model.safetensors"))


def test_bitfit_run_trains_only_biases_and_the_head(tiny_cifar_root, tmp_path):
    torch.manual_seed(0)
    start = build_model(
        ModelConfig(backbone="resnet8", tuning="bitfit"), num_classes=10, in_chans=3
    ).state_dict()
    metrics, saved = _run(tmp_path, tiny_cifar_root, "model.tuning=bitfit", "seed=0")
    model = build_model(ModelConfig(backbone="resnet8"), num_classes=10, in_chans=3)
    biases = sum(p.numel() for n, p in model.backbone.named_parameters() if n.endswith("bias"))
    head = sum(p.numel() for p in model.head.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert metrics["parameters"] == {
        "total": total,
        "trainable": biases + head,
        "trainable_head": head,
    }
    moved = {k for k in saved if not torch.equal(saved[k], start[k])}
    frozen = [k for k in moved if k.startswith("backbone.") and not k.endswith("bias")]
    # BN biases and the head move; conv / BN weights stay bit-identical (and BN statistics,
    # which bitfit keeps frozen by default)
    assert not frozen, frozen[:5]
    assert any(k.startswith("backbone.") and k.endswith("bias") for k in moved)
    assert {"head.weight", "head.bias"} <= moved


def test_linear_probe_run_leaves_the_backbone_bit_identical(tiny_cifar_root, tmp_path):
    torch.manual_seed(0)
    start = build_model(
        ModelConfig(backbone="resnet8", tuning="linear_probe"), num_classes=10, in_chans=3
    ).state_dict()
    metrics, saved = _run(tmp_path, tiny_cifar_root, "model.tuning=linear_probe", "seed=0")
    for k, v in start.items():
        if k.startswith("backbone."):
            assert torch.equal(saved[k], v), k
    assert not torch.equal(saved["head.weight"], start["head.weight"])
    assert metrics["parameters"]["trainable"] == metrics["parameters"]["trainable_head"] == 650


def test_head_lr_gives_the_head_its_own_group():
    model = build_model(ModelConfig(backbone="resnet8"), num_classes=10, in_chans=3)
    params = [p for p in model.parameters() if p.requires_grad]
    assert param_groups(params, model.head.parameters()) == params  # nothing asked: one group
    groups = param_groups(params, model.head.parameters(), lr=0.5, weight_decay=0.0)
    assert [g["name"] for g in groups] == ["tuned", "head"]
    assert groups[1]["lr"] == 0.5 and groups[1]["weight_decay"] == 0.0
    assert "lr" not in groups[0]
    assert sum(len(g["params"]) for g in groups) == len(params)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.head.parameters()}
    opt = torch.optim.SGD(groups, lr=0.1, weight_decay=5e-4)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]


def test_head_lr_in_a_run_scales_with_the_schedule(tiny_cifar_root, tmp_path):
    """optim.head_lr=0 with a frozen backbone: nothing moves at all (the head's group has lr 0),
    while the same run without it trains the head."""
    torch.manual_seed(0)
    start = build_model(
        ModelConfig(backbone="resnet8", tuning="linear_probe"), num_classes=10, in_chans=3
    ).state_dict()
    _, saved = _run(tmp_path, tiny_cifar_root, "model.tuning=linear_probe", "optim.head_lr=0")
    assert torch.equal(saved["head.weight"], start["head.weight"])


def test_input_size_resizes_before_the_backbone():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet8", input_size=48), 10, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    big = F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), model.backbone.forward_features(big))
        assert torch.equal(model.forward_features(big), model.backbone.forward_features(big))


def test_class_mean_init_hook_sets_the_cosine_head_to_class_means(tiny_cifar_root, tmp_path):
    """Linear probe at lr 0 with the hook: the saved cosine head is the normalised mean of the
    normalised training features of each class (computed here from the saved backbone)."""
    metrics, saved = _run(
        tmp_path,
        tiny_cifar_root,
        "model.tuning=linear_probe",
        "model.head=cosine",
        "optim.lr=0",
        "optim.weight_decay=0",
        "hooks.class_mean_init={}",
    )
    cfg = load_config(CE, [*TINY_RUN, "model.head=cosine"])
    data = build_bundle(cfg.data, tiny_cifar_root, seed=cfg.seed)
    model = build_model(cfg.model, 10, 3)
    model.load_state_dict(saved)
    model.eval()
    x = data.train.images.float() / 255.0
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    with torch.no_grad():
        f = F.normalize(model.forward_features((x - mean) / std), dim=1)
    for c in range(10):
        m = F.normalize(f[data.train.labels == c].mean(0), dim=0)
        w = F.normalize(saved["head.weight"][c], dim=0)
        assert torch.allclose(w, m, atol=1e-4), c
    assert metrics["class_mean_init"]["classes_initialised"] == 10


@pytest.mark.parametrize("recipe", ["rsam_pt", "vpt_gcl_drw", "vpt_sam_gcl_drw"])
@pytest.mark.parametrize("data", ["cifar100_lt", "places_lt", "inat2018", "imagenet_lt"])
def test_prompt_recipes_compose_on_every_benchmark(recipe, data):
    cfg = load_config(REPO / "configs" / "methods" / f"{recipe}.yaml", [f"data={data}"])
    m = cfg.model
    assert (m.backbone, m.head, m.tuning) == ("vit_base_patch16_224", "cosine", "vpt")
    assert m.tuning_params == {"length": 10, "depth": 12, "deep": True}
    assert m.backbone_params == {"pool": "cls_prompt", "prompt_dropout": 0.1}
    assert cfg.loss.name == "gcl" and cfg.loss.params()["drw_epoch"] == 60
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == (70, 128, 0.005)
    assert cfg.optim.weight_decay == 1e-3 and cfg.schedule.name == "cosine"
    expected = {"rsam_pt": "rsam", "vpt_gcl_drw": "sgd", "vpt_sam_gcl_drw": "sam"}[recipe]
    assert cfg.optim.name == expected
    assert cfg.data.dataset.replace("_", "-").startswith(data.split("_")[0])


def test_the_rsam_pt_model_trains_only_prompts_and_head():
    cfg = load_config(REPO / "configs" / "methods" / "rsam_pt.yaml", ["data=cifar100_lt"])
    with torch.device("meta"):
        model = build_model(cfg.model, 100, 3)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    prompts = sum(v for n, v in trainable.items() if "prompt" in n)
    assert prompts == 12 * 10 * 768
    assert sum(trainable.values()) == prompts + 100 * 768  # cosine head, no bias


def test_every_cnn_tuning_applies_to_the_imagenet_resnets_and_starts_as_the_backbone():
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    ref = build_model(ModelConfig(backbone="resnet18"), 10, 3).eval()
    with torch.no_grad():
        want = ref.forward_features(x)
    for tuning in ("linear_probe", "bitfit", "ssf", "adapter", "full"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(backbone="resnet18", tuning=tuning), 10, 3).eval()
        with torch.no_grad():
            assert torch.allclose(model.forward_features(x), want, atol=1e-5), tuning
    # adapters beside the 5 of ResNet-18's 8 blocks that keep their shape (dim 64, no norm)
    assert len(ref.backbone.blocks()) == 5
    adapted = build_model(ModelConfig(backbone="resnet18", tuning="adapter"), 10, 3)
    wrapped = [m for m in adapted.backbone.modules() if type(m).__name__ == "ParallelAdapter"]
    assert len(wrapped) == 5
