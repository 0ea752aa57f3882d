"""ImageNet ResNets / ResNeXt (longtail/models/resnet_imagenet.py): torchvision's parameter counts
and state-dict names, loading a checkpoint by path (.pth / .safetensors, prefixes, fc dropped,
clear errors), feature shapes, zero-init residuals, the config route, and a training step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TINY_RUN
from safetensors.torch import load_file, save_file

from longtail.core.config import ModelConfig, load_config
from longtail.core.errors import ConfigError, LongtailError
from longtail.engine.trainer import fit
from longtail.models import BACKBONES, build_model
from longtail.models.resnet_imagenet import load_pretrained, strip_prefixes

REPO = Path(__file__).resolve().parents[1]

# torchvision's published counts (torchvision.models.<name>(num_classes=1000), fc included)
TORCHVISION_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
}
BLOCKS = {  # (bottleneck?, blocks per stage): the architecture rules the expected keys follow
    "resnet10": (False, (1, 1, 1, 1)),
    "resnet18": (False, (2, 2, 2, 2)),
    "resnet34": (False, (3, 4, 6, 3)),
    "resnet50": (True, (3, 4, 6, 3)),
    "resnet101": (True, (3, 4, 23, 3)),
    "resnet152": (True, (3, 8, 36, 3)),
    "resnext50_32x4d": (True, (3, 4, 6, 3)),
}
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_keys(arch: str) -> list[str]:
    """torchvision's state-dict keys of ``arch``, in its order, written from the rules: stem
    conv1/bn1; per block conv1..conv{2,3} with their BNs; a downsample (1x1 conv .0 + BN .1) on
    the first block of a stage whose shape changes (layer1 only for bottlenecks: 64 -> 256);
    fc."""
    bottleneck, layers = BLOCKS[arch]
    keys = ["conv1.weight"] + [f"bn1.{b}" for b in BN]
    for stage, n in enumerate(layers, start=1):
        for j in range(n):
            p = f"layer{stage}.{j}."
            for c in range(1, 4 if bottleneck else 3):
                keys += [f"{p}conv{c}.weight"] + [f"{p}bn{c}.{b}" for b in BN]
            if j == 0 and (bottleneck or stage > 1):
                keys += [f"{p}downsample.0.weight"] + [f"{p}downsample.1.{b}" for b in BN]
    return keys + ["fc.weight", "fc.bias"]


def build(arch: str, **params) -> nn.Module:
    return BACKBONES.build(arch, **params)


def on_meta(arch: str) -> nn.Module:
    with torch.device("meta"):  # shapes and names only: no memory, no init time
        return build(arch)


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and BN statistic set at random (BN variances positive), so two
    models agree only if every tensor was loaded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 0.2 + (0.9 if "var" in name else -0.1))
            else:
                t.fill_(seed)
    return model.eval()


def torchvision_file(model: nn.Module, tmp: Path, name: str = "tv.pth", prefix: str = "") -> Path:
    """``model``'s weights saved as torchvision saves them: its names plus a 1000-way fc."""
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    state[prefix + "fc.weight"] = torch.randn(1000, model.num_features)
    state[prefix + "fc.bias"] = torch.randn(1000)
    path = tmp / name
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


# ---------------------------------------------------------------------------------------------
# architecture


@pytest.mark.parametrize("arch", sorted(TORCHVISION_COUNTS))
def test_parameter_counts_equal_torchvision_with_a_1000_way_fc(arch):
    with torch.device("meta"):
        model = build_model(ModelConfig(backbone=arch), num_classes=1000, in_chans=3)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_COUNTS[arch]


def test_resnet10_parameter_count():
    """ResNet-10, BasicBlock [1, 1, 1, 1], fc at 1000 classes, by hand (3x3 convs, no bias;
    a BN has 2C parameters):
      stem    7*7*3*64 = 9,408 + bn 128                                        =     9,536
      layer1  2 * 3*3*64*64 = 73,728 + 2 bn 256                                =    73,984
      layer2  3*3*64*128 = 73,728 + 3*3*128*128 = 147,456 + 2 bn 512
              + downsample 64*128 = 8,192 + bn 256                             =   230,144
      layer3  294,912 + 589,824 + 1,024 + 32,768 + 512                         =   919,040
      layer4  1,179,648 + 2,359,296 + 2,048 + 131,072 + 1,024                  = 3,673,088
      fc      512*1000 + 1000                                                  =   513,000
      total                                                                      5,418,792
    """
    with torch.device("meta"):
        model = build_model(ModelConfig(backbone="resnet10"), num_classes=1000, in_chans=3)
    assert sum(p.numel() for p in model.backbone.parameters()) == 4_905_792
    assert sum(p.numel() for p in model.parameters()) == 5_418_792


@pytest.mark.parametrize("arch", sorted(BLOCKS))
def test_state_dict_keys_are_torchvisions_without_fc(arch):
    expected = torchvision_keys(arch)
    assert list(on_meta(arch).state_dict()) == expected[:-2]  # same names, same order
    if arch in ("resnet50", "resnext50_32x4d"):
        assert len(expected) == 320  # torchvision's resnet50 state_dict, num_batches_tracked in


def test_representative_shapes_and_the_stride_in_the_3x3_conv():
    r50, x50, r18 = on_meta("resnet50"), on_meta("resnext50_32x4d"), on_meta("resnet18")
    shapes = {k: list(v.shape) for k, v in r50.state_dict().items()}
    assert shapes["conv1.weight"] == [64, 3, 7, 7]
    assert shapes["layer1.0.conv1.weight"] == [64, 64, 1, 1]
    assert shapes["layer1.0.downsample.0.weight"] == [256, 64, 1, 1]
    assert shapes["layer2.0.conv1.weight"] == [128, 256, 1, 1]
    assert shapes["layer2.0.conv2.weight"] == [128, 128, 3, 3]
    assert shapes["layer4.2.conv3.weight"] == [2048, 512, 1, 1]
    assert shapes["layer4.0.downsample.0.weight"] == [2048, 1024, 1, 1]
    # v1.5: the stride is in the 3x3 conv, not in the first 1x1
    assert r50.layer2[0].conv1.stride == (1, 1) and r50.layer2[0].conv2.stride == (2, 2)
    assert r50.layer2[0].downsample[0].stride == (2, 2)
    # ResNeXt 32x4d: 128 channels in 32 groups in the first stage, 2x ResNet's bottleneck width
    assert x50.layer1[0].conv2.groups == 32
    assert list(x50.state_dict()["layer1.0.conv2.weight"].shape) == [128, 4, 3, 3]
    assert list(x50.state_dict()["layer4.0.conv1.weight"].shape) == [1024, 1024, 1, 1]
    assert "layer1.0.downsample.0.weight" not in r18.state_dict()
    assert (r18.num_features, r50.num_features, x50.num_features) == (512, 2048, 2048)
    assert r50.stage_channels == [256, 512, 1024, 2048] and r18.stage_channels == [
        64,
        128,
        256,
        512,
    ]


@pytest.mark.parametrize(("arch", "dim"), [("resnet10", 512), ("resnet50", 2048)])
def test_feature_shapes_at_224_and_64_px(arch, dim):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=arch), num_classes=7, in_chans=3).eval()
    spatial = []
    handle = model.backbone.layer4.register_forward_hook(
        lambda m, i, o: spatial.append(tuple(o.shape))
    )
    with torch.no_grad():
        for px in (224, 64):
            out = model(torch.randn(2, 3, px, px))
            assert out.features.shape == (2, dim) and out.logits.shape == (2, 7)
    handle.remove()
    assert spatial == [(2, dim, 7, 7), (2, dim, 2, 2)]  # stride 32


def test_grey_inputs_and_resnext_at_64_px():
    model = build("resnext50_32x4d", in_chans=1).eval()
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    with torch.no_grad():
        assert model.forward_features(torch.randn(2, 1, 64, 64)).shape == (2, 2048)


def test_zero_init_residual_makes_every_block_start_as_its_shortcut():
    torch.manual_seed(0)
    model = build("resnet50", zero_init_residual=True).eval()
    blocks = [b for stage in model.stages for b in stage]
    assert len(blocks) == 16 and all(b.bn3.weight.abs().sum() == 0 for b in blocks)
    assert build("resnet18", zero_init_residual=True).layer1[0].bn2.weight.abs().sum() == 0
    assert build("resnet50").layer1[0].bn3.weight.min() == 1.0  # default: off
    x = torch.rand(2, 256, 8, 8)  # a block without projection: relu(0 + x) = x for x >= 0
    with torch.no_grad():
        torch.testing.assert_close(model.layer1[1](x), x, rtol=0, atol=0)


def test_options_are_checked_by_name():
    assert BACKBONES.option_names("resnet50", {}) == {
        "in_chans",
        "zero_init_residual",
        "pretrained",
    }
    with pytest.raises(ConfigError, match="model.backbone_params.zero_init_residual"):
        build_model(
            ModelConfig(backbone="resnet10", backbone_params={"zero_init_residual": 1}), 3, 3
        )
    with pytest.raises(ConfigError, match="model.backbone_params.pretrained"):
        build_model(ModelConfig(backbone="resnet10", backbone_params={"pretrained": 5}), 3, 3)
    with pytest.raises(ConfigError, match="'model.backbone_params.widths'"):
        build_model(ModelConfig(backbone="resnet10", backbone_params={"widths": [8]}), 3, 3)


# ---------------------------------------------------------------------------------------------
# pretrained weights by path


def test_a_torchvision_named_checkpoint_loads_with_fc_dropped(tmp_path):
    source = randomized(build("resnet50"), seed=1)
    path = torchvision_file(source, tmp_path)
    assert len(torch.load(path, weights_only=True)) == 320
    target = build("resnet50")
    dropped = load_pretrained(target, path)
    assert dropped == ["fc.weight", "fc.bias"]
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_saved_and_reloaded_by_path_gives_identical_outputs(tmp_path, suffix):
    source = randomized(build("resnet18"), seed=2)
    path = tmp_path / f"r18{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)
    torch.manual_seed(99)
    target = build("resnet18").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(target(x), source(x))
        assert load_pretrained(target, path) == []  # nothing dropped: it has no fc
        assert torch.equal(target(x), source(x))


def test_wrapper_prefixes_and_containers_are_stripped(tmp_path):
    assert strip_prefixes("module.backbone.layer1.0.conv1.weight") == "layer1.0.conv1.weight"
    assert strip_prefixes("_orig_mod.model.fc.bias") == "fc.bias"
    assert strip_prefixes("layer1.0.bn1.weight") == "layer1.0.bn1.weight"
    source = randomized(build("resnet10"), seed=3)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = source(x)
    files = [
        torchvision_file(source, tmp_path, "ddp.pth", prefix="module."),  # DataParallel / DDP
        torchvision_file(source, tmp_path, "wrap.safetensors", prefix="model.backbone."),
    ]
    ckpt = tmp_path / "train.pt"  # a training checkpoint with the weights under 'state_dict'
    torch.save(
        {"epoch": 90, "state_dict": {"module." + k: v for k, v in source.state_dict().items()}},
        ckpt,
    )
    classifier = build_model(ModelConfig(backbone="resnet10"), num_classes=5, in_chans=3)
    classifier.backbone.load_state_dict(source.state_dict())
    run = tmp_path / "model.safetensors"  # a longtail run's weights: backbone.* + head.*
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(run))
    for path in [*files, ckpt, run]:
        target = build("resnet10").eval()
        load_pretrained(target, path)
        with torch.no_grad():
            assert torch.equal(target(x), want), path


def test_missing_num_batches_tracked_of_old_files_is_allowed(tmp_path):
    source = randomized(build("resnet18"), seed=4)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) == 122 - 2 - 20  # 20 BNs
    torch.save(state, tmp_path / "old.pth")
    target = build("resnet18").eval()
    load_pretrained(target, tmp_path / "old.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_a_wrong_architecture_names_the_first_missing_keys(tmp_path):
    path = torchvision_file(build("resnet18"), tmp_path, "r18.pth")
    with pytest.raises(LongtailError) as err:
        load_pretrained(build("resnet34"), path)
    msg = str(err.value)
    assert "do not fit backbone resnet34" in msg and str(path) in msg
    # resnet34 has 8 more BasicBlocks (16 vs 8) of 2 convs + 2 BNs: 8 * (2 + 2 * 4) = 80 missing
    # (their num_batches_tracked are the lenient 16 more)
    assert "80 missing (first: layer1.2.conv1.weight, layer1.2.bn1.weight" in msg
    assert "unexpected" not in msg and "model.backbone=resnet50" in msg
    with pytest.raises(LongtailError, match=r"missing \(first: layer1\.0\.conv3\.weight") as err:
        load_pretrained(build("resnet50"), path)
    assert "unexpected" not in str(err.value)
    assert (
        "of another shape (layer1.0.conv1.weight: file [64, 64, 3, 3], resnet50 [64, 64, 1, 1]"
        in str(err.value)
    )
    r50 = torchvision_file(on_meta("resnet50").to_empty(device="cpu"), tmp_path, "r50.pth")
    with pytest.raises(LongtailError, match=r"unexpected \(first: layer1\.0\.conv3\.weight"):
        load_pretrained(build("resnet18"), r50)


def test_unreadable_files_get_a_clear_error(tmp_path):
    with pytest.raises(LongtailError, match="downloads nothing") as err:
        load_pretrained(build("resnet10"), tmp_path / "none.pth")
    assert "model.backbone_params.pretrained" in str(err.value) and "none.pth" in str(err.value)
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(LongtailError, match=r"\.pth, \.pt, \.bin, \.safetensors"):
        load_pretrained(build("resnet10"), tmp_path / "w.npz")
    torch.save(build("resnet10"), tmp_path / "whole.pth")  # a pickled module, not a state dict
    with pytest.raises(LongtailError, match=r"weights_only=True.*state_dict\(\)"):
        load_pretrained(build("resnet10"), tmp_path / "whole.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(LongtailError, match="bad.safetensors cannot be read"):
        load_pretrained(build("resnet10"), tmp_path / "bad.safetensors")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(LongtailError, match="not a state dict of tensors"):
        load_pretrained(build("resnet10"), tmp_path / "meta.pth")


def test_rgb_weights_go_into_a_grey_stem_summed_over_channels(tmp_path):
    source = randomized(build("resnet10"), seed=5)
    path = torchvision_file(source, tmp_path)
    grey = build("resnet10", in_chans=1, pretrained=str(path)).eval()
    torch.testing.assert_close(grey.conv1.weight, source.conv1.weight.sum(1, keepdim=True))
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():  # a grey image = the same image in RGB with R = G = B
        torch.testing.assert_close(grey(x), source(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# from a config


@pytest.mark.parametrize(
    ("selector", "arch"),
    [
        ("resnet10", "resnet10"),
        ("resnet50", "resnet50"),
        ("resnet152", "resnet152"),
        ("resnext50", "resnext50_32x4d"),
    ],
)
def test_model_files_compose(selector, arch):
    cfg = load_config(
        REPO / "configs" / "methods" / "ce.yaml", ["data=cifar10_lt", f"model={selector}"]
    )
    assert (cfg.model.backbone, cfg.model.head, cfg.model.backbone_params) == (arch, "linear", {})


def test_pretrained_from_the_config(tmp_path):
    source = randomized(build("resnet10"), seed=6)
    path = torchvision_file(source, tmp_path, "r10.safetensors")
    cfg = load_config(
        REPO / "configs" / "methods" / "ce.yaml",
        ["data=cifar10_lt", "model=resnet10", f"model.backbone_params.pretrained={path}"],
    )
    model = build_model(cfg.model, num_classes=10, in_chans=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), source(x))
    assert model.head.weight.shape == (10, 512)  # the head is the run's, new
    cfg.model.backbone_params["pretrained"] = str(tmp_path / "missing.pth")
    with pytest.raises(LongtailError, match="No pretrained weights at .*missing.pth"):
        build_model(cfg.model, num_classes=10, in_chans=3)


def test_a_run_starts_from_the_pretrained_backbone(tiny_cifar_root, tmp_path):
    """A whole run (tiny CIFAR-10 at 32 px, 1 epoch at lr 0): its saved backbone is the file's."""
    source = randomized(build("resnet10"), seed=7)
    path = torchvision_file(source, tmp_path, "r10.pth")
    overrides = [
        *TINY_RUN,
        "model=resnet10",
        "model.backbone=resnet10",  # over TINY_RUN's CIFAR resnet8
        f"model.backbone_params.pretrained={path}",
        "train.epochs=1",
        "optim.lr=0",
        "optim.weight_decay=0",
    ]
    cfg = load_config(REPO / "configs" / "methods" / "ce.yaml", overrides)
    metrics = fit(cfg, tmp_path / "run", tiny_cifar_root)
    assert metrics is not None and len(metrics["per_class"]) == 10
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    for k, v in source.state_dict().items():
        if "running" not in k and "num_batches" not in k:  # BN statistics move in training
            assert torch.equal(saved[f"backbone.{k}"], v), k
    assert saved["head.weight"].shape == (10, 512)


# ---------------------------------------------------------------------------------------------
# training


def test_resnet10_training_steps_reduce_the_loss_at_64_px():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet10"), num_classes=4, in_chans=3).train()
    x, y = torch.randn(8, 3, 64, 64), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
