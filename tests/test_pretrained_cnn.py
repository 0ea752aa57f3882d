"""MobileNetV2 (longtail/models/mobilenet.py) and EfficientNet-Lite0 (longtail/models/efficientnet.py):
torchvision's / timm's parameter counts, torchvision's / lukemelas' state-dict names (checked
against names written out here and, where present, against the real ImageNet files), loading by
path with the classifier dropped, grey stems, TF SAME padding, blocks(), options by name, and
the composed model files."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.core.config import ModelConfig, load_config
from longtail.core.errors import ConfigError
from longtail.models import build_model
from longtail.models.efficientnet import Conv2dPad, efficientnet_lite0
from longtail.models.mobilenet import mobilenet_v2
from longtail.models.pretrained import load_pretrained

REPO = Path(__file__).resolve().parents[1]
PRETRAINED = Path(
    os.environ.get("LONGTAIL_PRETRAINED")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrained"
)
MNV2_FILE = PRETRAINED / "mobilenet_v2-b0353104.pth"
LITE0_FILE = PRETRAINED / "efficientnet-lite0-57934424.pth"
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
HEAD_1000 = 1280 * 1000 + 1000


def real(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"no real weights at {path} (set LONGTAIL_PRETRAINED)")
    return path


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mnv2_keys() -> List[str]:
    """torchvision mobilenet_v2()'s state-dict names without classifier.*, written out."""
    keys = ["features.0.0.weight", *(f"features.0.1.{b}" for b in BN)]
    for i in range(1, 18):
        if i == 1:  # expand ratio 1: depthwise, project, BN
            parts = ["conv.0.0.weight", *(f"conv.0.1.{b}" for b in BN), "conv.1.weight"]
            parts += [f"conv.2.{b}" for b in BN]
        else:
            parts = ["conv.0.0.weight", *(f"conv.0.1.{b}" for b in BN)]
            parts += ["conv.1.0.weight", *(f"conv.1.1.{b}" for b in BN), "conv.2.weight"]
            parts += [f"conv.3.{b}" for b in BN]
        keys += [f"features.{i}.{p}" for p in parts]
    keys += ["features.18.0.weight", *(f"features.18.1.{b}" for b in BN)]
    return keys


def lite0_keys() -> List[str]:
    """lukemelas' EfficientNet-Lite0 state-dict names without _fc.*, written out."""
    keys = ["_conv_stem.weight", *(f"_bn0.{b}" for b in BN)]
    for i in range(16):
        parts = [] if i == 0 else ["_expand_conv.weight", *(f"_bn0.{b}" for b in BN)]
        parts += ["_depthwise_conv.weight", *(f"_bn1.{b}" for b in BN)]
        parts += ["_project_conv.weight", *(f"_bn2.{b}" for b in BN)]
        keys += [f"_blocks.{i}.{p}" for p in parts]
    keys += ["_conv_head.weight", *(f"_bn1.{b}" for b in BN)]
    return keys


CASES = [
    # builder, hand-written keys, classifier keys, stem key, real file
    (mobilenet_v2, mnv2_keys, ("classifier.1.weight", "classifier.1.bias"), "features.0.0.weight", MNV2_FILE),
    (efficientnet_lite0, lite0_keys, ("_fc.weight", "_fc.bias"), "_conv_stem.weight", LITE0_FILE),
]  # fmt: skip
IDS = ["mobilenet_v2", "efficientnet_lite0"]


def test_parameter_counts_equal_torchvision_and_timm_with_a_1000_way_head():
    mnv2 = build_model(ModelConfig(backbone="mobilenet_v2"), num_classes=1000, in_chans=3)
    lite0 = build_model(ModelConfig(backbone="efficientnet_lite0"), num_classes=1000, in_chans=3)
    assert n_params(mnv2.backbone) == 2_223_872 and n_params(mnv2) == 3_504_872
    assert n_params(lite0.backbone) == 3_371_008 and n_params(lite0) == 4_652_008


@pytest.mark.parametrize("path,total", [(MNV2_FILE, 3_504_872), (LITE0_FILE, 4_652_008)], ids=IDS)
def test_the_real_files_hold_those_counts(path, total):
    state = torch.load(real(path), map_location="cpu", weights_only=True)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    assert sum(v.numel() for k, v in state.items() if not k.endswith(buffers)) == total


@pytest.mark.parametrize("builder,keys,head,stem,path", CASES, ids=IDS)
def test_state_dict_names_are_the_hand_written_and_the_real_files(builder, keys, head, stem, path):
    own = builder().state_dict()
    assert list(own) == keys()  # the names, in the file's order
    assert all(v.dim() != 4 or not k.endswith("bias") for k, v in own.items())
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert list(state) == keys() + list(head)
        assert all(tuple(own[k].shape) == tuple(state[k].shape) for k in own)


@pytest.mark.parametrize("builder,keys,head,stem,path", CASES, ids=IDS)
def test_a_checkpoint_with_the_real_names_loads_with_the_classifier_dropped(
    builder, keys, head, stem, path, tmp_path
):
    shapes = {k: v.shape for k, v in builder().state_dict().items()}
    torch.manual_seed(0)
    state = {k: torch.randn(shapes[k]) for k in keys() if not k.endswith("num_batches_tracked")}
    state[head[0]], state[head[1]] = torch.randn(1000, 1280), torch.randn(1000)
    file = tmp_path / "weights.pth"
    torch.save(state, file)
    model = builder(pretrained=str(file))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)
    assert sorted(load_pretrained(builder(), file, (head[0].split(".")[0] + ".",), stem)) == sorted(
        head
    )


@pytest.mark.parametrize("builder,keys,head,stem,path", CASES, ids=IDS)
def test_the_real_files_load_and_give_finite_features(builder, keys, head, stem, path):
    model = builder(pretrained=str(real(path))).eval()
    with torch.no_grad():
        out = model.forward_features(torch.randn(2, 3, 96, 96))
    assert out.shape == (2, 1280) and torch.isfinite(out).all()
    assert model.num_features == 1280


@pytest.mark.parametrize("builder,keys,head,stem,path", CASES, ids=IDS)
def test_grey_inputs_get_the_rgb_stem_summed(builder, keys, head, stem, path, tmp_path):
    if not path.is_file():  # a random RGB checkpoint with the real names instead
        torch.manual_seed(1)
        source = builder()
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        path = tmp_path / "rgb.pth"
        torch.save(source.state_dict(), path)
    rgb = builder(pretrained=str(path)).eval()
    grey = builder(in_chans=1, pretrained=str(path)).eval()
    assert grey.state_dict()[stem].shape[1] == 1
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("builder,count", [(mobilenet_v2, 10), (efficientnet_lite0, 9)], ids=IDS)
def test_blocks_keep_their_shape_and_every_conv_is_bias_free(builder, count):
    model = builder().eval()
    blocks = model.blocks()
    assert len(blocks) == count
    shapes = {}
    hooks = [
        b.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, (i[0].shape, o.shape)))
        for b in blocks
    ]
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert len(shapes) == count and all(a == b for a, b in shapes.values())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.bias is None for m in convs)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.affine for m in bns) and len(bns) == (52 if count == 10 else 49)
    assert [b.out_channels for b in model.stages] == model.stage_channels  # type: ignore[attr-defined]


def test_batch_norm_constants_are_torchvisions_and_tensorflows():
    assert {
        (m.eps, m.momentum) for m in mobilenet_v2().modules() if isinstance(m, nn.BatchNorm2d)
    } == {(1e-5, 0.1)}
    lite = efficientnet_lite0()
    assert {(m.eps, m.momentum) for m in lite.modules() if isinstance(m, nn.BatchNorm2d)} == {
        (1e-3, 0.01)
    }


@pytest.mark.parametrize("size", [64, 65, 96, 97])
def test_same_padding_is_tensorflows(size):
    torch.manual_seed(2)
    for k in (3, 5):
        conv = Conv2dPad(4, 6, k, stride=2, same=True)
        x = torch.randn(1, 4, size, size)
        total = max((math.ceil(size / 2) - 1) * 2 + k - size, 0)
        expected = F.conv2d(
            F.pad(x, [total // 2, total - total // 2] * 2), conv.weight, stride=2
        )  # TF: the odd pixel after
        assert torch.equal(conv(x), expected) and expected.shape[-1] == math.ceil(size / 2)
        sym = Conv2dPad(4, 6, k, stride=2, same=False)
        sym.weight.data.copy_(conv.weight.data)
        assert torch.equal(sym(x), F.conv2d(x, conv.weight, stride=2, padding=k // 2))


def test_the_two_paddings_differ_with_the_same_weights():
    same = efficientnet_lite0(padding="same").train()  # batch statistics: unit-scale outputs
    sym = efficientnet_lite0(padding="symmetric").train()
    sym.load_state_dict(same.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = same(x), sym(x)
    assert a.shape == b.shape == (2, 1280) and (a - b).abs().max() > 1e-2 * a.abs().max()


@pytest.mark.parametrize(
    "backbone,params,key",
    [
        ("mobilenet_v2", {"width_mult": 0}, "width_mult"),
        ("mobilenet_v2", {"width_mult": "wide"}, "width_mult"),
        ("mobilenet_v2", {"pretrained": 5}, "pretrained"),
        ("mobilenet_v2", {"depth": 3}, "depth"),
        ("efficientnet_lite0", {"padding": "valid"}, "padding"),
        ("efficientnet_lite0", {"drop_path_rate": 1.5}, "drop_path_rate"),
        ("efficientnet_lite0", {"pretrained": ""}, "pretrained"),
    ],
)
def test_options_are_checked_by_name(backbone, params, key):
    with pytest.raises(ConfigError, match=f"model.backbone_params.{key}"):
        build_model(ModelConfig(backbone=backbone, backbone_params=params), 3, 3)
    with pytest.raises(ConfigError, match="model.backbone_params.in_chans"):
        build_model(ModelConfig(backbone=backbone), 3, 0)


def test_width_multiplier_and_drop_path_build():
    half = mobilenet_v2(width_mult=0.5)
    assert half.num_features == 1280 and half.stage_channels == [8, 16, 16, 48, 160]
    lite = efficientnet_lite0(drop_path_rate=0.2).train()
    out = lite(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1280) and torch.isfinite(out).all()


@pytest.mark.parametrize("selector", ["mobilenet_v2", "efficientnet_lite0"])
def test_model_files_compose(selector):
    cfg = load_config(
        REPO / "configs" / "methods" / "ce.yaml", ["data=cifar10_lt", f"model={selector}"]
    )
    assert (cfg.model.backbone, cfg.model.head, cfg.model.backbone_params) == (
        selector,
        "linear",
        {},
    )
