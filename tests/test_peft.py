"""Parameter-efficient tunings (longtail/models/peft.py) on small stand-in backbones (a ViT-like
and a MobileNet-like module with the real ones' module names) and the repository's ResNets:
exact parameter counts, identity at initialisation, which parameters get gradients, frozen BN
statistics, merging, option errors, optimiser groups and LIFT's class-mean initialisation."""

from __future__ import annotations

import copy
from typing import List, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.core.errors import ConfigError
from longtail.models.classifier import Classifier
from longtail.models.heads import CosineHead, LinearHead
from longtail.models.peft import (
    TUNINGS,
    LoRALinear,
    apply_tuning,
    class_mean_init,
    merge_tuning,
    parameter_counts,
)
from longtail.models.resnet_cifar import ResNetCifar
from longtail.models.resnet_imagenet import resnet

D, DEPTH, CLASSES = 16, 2, 5


# ----------------------------------------------------------------------------- stand-ins
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, 4)


class TinyViT(nn.Module):
    """timm-like names: patch_embed.proj, cls_token, blocks.i.{norm1,attn.qkv,attn.proj,norm2,
    mlp.fc1,mlp.fc2}, norm; ``enable_prompts`` adds ``prompt_embeddings``."""

    def __init__(self, dim: int = D, depth: int = DEPTH):
        super().__init__()
        self.num_features = dim
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.prompt_embeddings: Optional[nn.Parameter] = None
        self.deep = False

    def enable_prompts(self, length: int, depth: Optional[int] = None, deep: bool = False):
        n = (depth or len(self.blocks)) if deep else 1
        self.prompt_embeddings = nn.Parameter(torch.randn(n, length, self.num_features) * 0.02)
        self.deep = deep

    def forward_features(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
        p = self.prompt_embeddings
        for i, block in enumerate(self.blocks):
            if p is not None and (i == 0 or (self.deep and i < len(p))):
                if i > 0:
                    x = torch.cat([x[:, :1], x[:, 1 + p.shape[1] :]], 1)
                x = torch.cat([x[:, :1], p[i].expand(len(x), -1, -1), x[:, 1:]], 1)
            x = block(x)
        return self.norm(x)[:, 0]


class InvertedResidual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c, 2 * c, 1, bias=False),
            nn.BatchNorm2d(2 * c),
            nn.ReLU6(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False),
            nn.BatchNorm2d(2 * c),
            nn.ReLU6(),
            nn.Conv2d(2 * c, c, 1, bias=False),
            nn.BatchNorm2d(c),
        )

    def forward(self, x):
        return x + self.conv(x)


class TinyCNN(nn.Module):
    """MobileNetV2-like: BN-affine, bias-free convs, ``blocks()`` of equal-shape residual blocks."""

    def __init__(self, c: int = 8, n: int = 2):
        super().__init__()
        self.num_features = c
        self.stem = nn.Sequential(
            nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6()
        )
        self.features = nn.Sequential(*[InvertedResidual(c) for _ in range(n)])

    def blocks(self) -> List[nn.Module]:
        return list(self.features)

    def forward_features(self, x):
        return self.features(self.stem(x)).mean((2, 3))


def vit(head=LinearHead):
    torch.manual_seed(0)
    return Classifier(TinyViT(), nn.Identity(), head(D, CLASSES))


def cnn():
    torch.manual_seed(0)
    return Classifier(TinyCNN(), nn.Identity(), LinearHead(8, CLASSES))


def resnet8():
    torch.manual_seed(0)
    return Classifier(ResNetCifar(8), nn.Identity(), LinearHead(64, CLASSES))


def trainable(model, part=None):
    mod = model if part is None else getattr(model, part)
    return {n: p.numel() for n, p in mod.named_parameters() if p.requires_grad}


def head_numel(model):
    return sum(p.numel() for p in model.head.parameters())


def images(n=4, size=16):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).logits


def backward(model, x):
    model.train()
    model.zero_grad(set_to_none=True)
    model(x).logits.square().sum().backward()


def assert_only_trainable_get_grads(model):
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name


# ----------------------------------------------------------------------------- registry
def test_every_tuning_is_registered():
    assert TUNINGS.names() == sorted(
        ["full", "linear_probe", "bitfit", "ssf", "lora", "adapter", "vpt"]
    )


def test_full_trains_everything_and_linear_probe_only_the_head():
    model = vit()
    total = sum(p.numel() for p in model.parameters())
    apply_tuning(model, "full", {})
    assert sum(trainable(model).values()) == total
    model = resnet8()
    report = apply_tuning(model, "linear_probe", {})
    assert trainable(model) == {"head.weight": 64 * CLASSES, "head.bias": CLASSES}
    assert report.counts["trainable"] == head_numel(model) == 325
    assert report.counts["trainable_backbone"] == 0
    model.train()
    assert not model.backbone.training and model.head.training


# ----------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("rank", [1, 4])
def test_lora_adds_r_in_plus_out_per_target_and_is_the_identity_at_init(rank):
    model = vit()
    x = images()
    before = logits(model, x)
    counts_before = parameter_counts(model)
    report = apply_tuning(model, "lora", {"rank": rank, "targets": ["qkv", "proj", "fc1", "fc2"]})
    # per block: qkv (16 -> 48), proj (16 -> 16), fc1 (16 -> 32), fc2 (32 -> 16)
    per_block = rank * ((16 + 48) + (16 + 16) + (16 + 32) + (32 + 16))
    added = report.counts["total"] - counts_before["total"]
    assert added == DEPTH * per_block
    assert report.counts["trainable_backbone"] == DEPTH * per_block
    assert report.counts["trainable"] == DEPTH * per_block + head_numel(model)
    assert report.inserted == {"LoRALinear": 4 * DEPTH}
    assert torch.equal(logits(model, x), before)
    keys = model.state_dict().keys()
    assert {"backbone.blocks.0.attn.qkv.base.weight", "backbone.blocks.0.attn.qkv.lora_A"} <= keys
    assert "backbone.blocks.0.attn.qkv.weight" not in keys


def test_lora_default_targets_qkv_with_scale_alpha_over_rank():
    model = vit()
    apply_tuning(model, "lora", {"rank": 4, "alpha": 8})
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == DEPTH and all(m.scale == 2.0 for m in layers)
    assert trainable(model, "backbone") == {
        f"blocks.{i}.attn.qkv.lora_{k}": 4 * (48 if k == "B" else 16)
        for i in range(DEPTH)
        for k in "AB"
    }
    default = vit()
    apply_tuning(default, "lora", {})
    assert all(
        m.scale == 1.0 and m.rank == 8 for m in default.modules() if isinstance(m, LoRALinear)
    )


def test_lora_merge_equals_the_wrapped_forward():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), rank=3, alpha=6.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(7, 6)
    merged = layer.merge()
    assert type(merged) is nn.Linear
    assert torch.allclose(merged(x), layer(x), atol=1e-6)
    w = layer.base.weight + 2.0 * layer.lora_B @ layer.lora_A
    assert torch.allclose(merged.weight, w)
    assert not layer.base.weight.requires_grad  # freeze_base by default

    model = vit()
    apply_tuning(model, "lora", {"targets": ["qkv", "fc2"], "rank": 2})
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B)
    x = images()
    tuned = logits(model, x)
    merge_tuning(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(logits(model, x), tuned, atol=1e-5)


def test_lora_gradients_reach_only_lora_and_head():
    model = vit()
    apply_tuning(model, "lora", {"targets": ["qkv", "proj"], "rank": 2})
    backward(model, images())
    assert_only_trainable_get_grads(model)
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert {"head.weight", "head.bias", "backbone.blocks.1.attn.proj.lora_B"} <= grads
    assert not any(".base." in n or "norm" in n for n in grads)


def test_lora_target_without_a_match_lists_the_linear_names():
    with pytest.raises(ConfigError) as err:
        apply_tuning(vit(), "lora", {"targets": ["query"]})
    msg = str(err.value)
    assert "'model.tuning_params.targets'" in msg and "'query'" in msg
    assert all(n in msg for n in ("qkv", "proj", "fc1", "fc2"))


def test_lora_dropout_only_in_training():
    model = vit()
    apply_tuning(model, "lora", {"dropout": 0.5, "rank": 2})
    assert torch.equal(logits(model, images()), logits(vit(), images()))


def test_lora_builds_on_the_meta_device():
    with torch.device("meta"):
        model = vit()
        apply_tuning(model, "lora", {"rank": 2})
    assert parameter_counts(model)["trainable_backbone"] == DEPTH * 2 * (16 + 48)


# ----------------------------------------------------------------------------- BitFit
@pytest.mark.parametrize("make", [resnet8, vit, cnn])
def test_bitfit_trains_the_biases_and_the_head(make):
    model = make()
    biases = sum(p.numel() for n, p in model.backbone.named_parameters() if n.endswith("bias"))
    keys = list(model.state_dict())
    report = apply_tuning(model, "bitfit", {})
    assert report.counts["trainable"] == biases + head_numel(model)
    assert all(n.endswith("bias") for n in trainable(model, "backbone"))
    assert list(model.state_dict()) == keys  # frozen BN layers keep their keys
    backward(model, images(size=32))
    assert_only_trainable_get_grads(model)


def test_bitfit_keeps_bn_statistics_frozen_across_train_calls():
    model = resnet8()
    apply_tuning(model, "bitfit", {})
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_b" in k}
    assert stats
    model.train()
    bn = model.backbone.get_submodule("bn1") if hasattr(model.backbone, "bn1") else None
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and model.backbone.training
    model(images(size=32)).logits.sum().backward()
    copy.deepcopy(model).train()(images(size=32))
    for k, v in model.state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), k
    del bn
    # norm_stats=train: the statistics move
    model = resnet8()
    apply_tuning(model, "bitfit", {"norm_stats": "train"})
    model.train()(images(size=32))
    moved = [
        k for k, v in model.state_dict().items() if k in stats and not torch.equal(v, stats[k])
    ]
    assert moved


def test_frozen_bn_layer_still_normalises_with_its_running_statistics():
    model = resnet8()
    x = images(size=32)
    reference = logits(copy.deepcopy(model), x)
    apply_tuning(model, "bitfit", {})
    model.train()
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference)


# ----------------------------------------------------------------------------- SSF
def _ssf_channels(backbone, types=(nn.Linear, nn.Conv2d, nn.LayerNorm, nn.BatchNorm2d)):
    n = 0
    for m in backbone.modules():
        if isinstance(m, nn.Linear) and nn.Linear in types:
            n += m.out_features
        elif isinstance(m, nn.Conv2d) and nn.Conv2d in types:
            n += m.out_channels
        elif isinstance(m, nn.LayerNorm) and nn.LayerNorm in types:
            n += m.normalized_shape[0]
        elif isinstance(m, nn.BatchNorm2d) and nn.BatchNorm2d in types:
            n += m.num_features
    return n


@pytest.mark.parametrize("make", [vit, cnn, resnet8])
def test_ssf_is_the_identity_at_init_with_two_parameters_per_channel(make):
    model = make()
    x = images(size=32)
    before = logits(model, x)
    channels = _ssf_channels(model.backbone)
    report = apply_tuning(model, "ssf", {})
    assert report.counts["trainable_backbone"] == 2 * channels
    assert report.counts["trainable"] == 2 * channels + head_numel(model)
    assert all(n.endswith((".scale", ".shift")) for n in trainable(model, "backbone"))
    assert torch.equal(logits(model, x), before)
    backward(model, x)
    assert_only_trainable_get_grads(model)


def test_ssf_targets_restrict_the_layer_types_and_merge_folds_them():
    model = vit()
    channels = _ssf_channels(model.backbone, (nn.Linear,))
    apply_tuning(model, "ssf", {"targets": ["Linear"]})
    assert (
        parameter_counts(model)["trainable_backbone"]
        == 2 * channels
        == 2 * DEPTH * (48 + 16 + 32 + 16)
    )
    for name, p in model.backbone.named_parameters():
        if p.requires_grad:
            nn.init.normal_(p, 1.0 if name.endswith("scale") else 0.0, 0.3)
    x = images()
    tuned = logits(model, x)
    merge_tuning(model)
    assert parameter_counts(model)["trainable_backbone"] == 0
    assert torch.allclose(logits(model, x), tuned, atol=1e-5)

    model = cnn()  # conv without bias and BN: merged into conv weights and BN affine
    apply_tuning(model, "ssf", {})
    for name, p in model.backbone.named_parameters():
        if p.requires_grad:
            nn.init.normal_(p, 1.0 if name.endswith("scale") else 0.0, 0.3)
    tuned = logits(model, x)
    merge_tuning(model)
    assert torch.allclose(logits(model, x), tuned, atol=1e-4)


def test_ssf_bad_target_names_the_key():
    with pytest.raises(ConfigError, match=r"'model.tuning_params.targets'"):
        apply_tuning(vit(), "ssf", {"targets": ["Dense"]})


def test_ssf_on_an_imagenet_resnet():
    torch.manual_seed(0)
    model = Classifier(resnet("resnet10"), nn.Identity(), LinearHead(512, CLASSES))
    x = images(2, 32)
    before = logits(model, x)
    channels = _ssf_channels(model.backbone)
    apply_tuning(model, "ssf", {"targets": ["BatchNorm2d"]})
    bn = _ssf_channels(model.backbone, (nn.BatchNorm2d,))
    assert parameter_counts(model)["trainable_backbone"] == 2 * bn < 2 * channels
    assert torch.equal(logits(model, x), before)


# ----------------------------------------------------------------------------- adapter
def test_adapter_on_a_transformer_is_the_identity_with_the_stated_count():
    model = vit()
    x = images()
    before = logits(model, x)
    report = apply_tuning(model, "adapter", {"dim": 4, "scale": 0.1})
    # per block: down D*dim + dim, up dim*D + D
    assert report.counts["trainable_backbone"] == DEPTH * (2 * D * 4 + 4 + D)
    assert report.inserted == {"ParallelAdapter": DEPTH}
    assert torch.equal(logits(model, x), before)
    assert "backbone.blocks.0.mlp.base.fc1.weight" in model.state_dict()
    backward(model, x)
    assert_only_trainable_get_grads(model)
    up = model.backbone.blocks[0].mlp.adapter.up.weight
    assert up.grad is not None and up.grad.abs().sum() > 0


def test_adapter_norm_in_adds_a_layernorm():
    model = vit()
    report = apply_tuning(model, "adapter", {"dim": 4, "norm": "in"})
    assert report.counts["trainable_backbone"] == DEPTH * (2 * D * 4 + 4 + D + 2 * D)


def test_adapter_on_a_cnn_wraps_each_block():
    model = cnn()
    x = images(size=32)
    before = logits(model, x)
    report = apply_tuning(model, "adapter", {"dim": 3})
    assert report.counts["trainable_backbone"] == 2 * (2 * 8 * 3 + 3 + 8)
    assert torch.equal(logits(model, x), before)
    assert len(model.backbone.blocks()) == 2
    backward(model, x)
    assert_only_trainable_get_grads(model)


def test_adapter_without_mlp_or_blocks_is_a_config_error():
    with pytest.raises(ConfigError, match="blocks"):
        apply_tuning(resnet8(), "adapter", {})


# ----------------------------------------------------------------------------- VPT
def test_vpt_needs_prompts():
    with pytest.raises(ConfigError, match=r"vpt needs a backbone with prompts \(a ViT"):
        apply_tuning(resnet8(), "vpt", {})


def test_vpt_trains_only_the_prompts_and_the_head():
    model = vit()
    report = apply_tuning(model, "vpt", {"length": 3, "depth": 2, "deep": True})
    assert trainable(model, "backbone") == {"prompt_embeddings": 2 * 3 * D}
    assert report.counts["trainable"] == 2 * 3 * D + head_numel(model)
    backward(model, images())
    assert_only_trainable_get_grads(model)


def test_a_list_of_tunings_trains_the_union():
    model = vit()
    report = apply_tuning(
        model, ["vpt", "lora", "bitfit"], {"vpt": {"length": 2}, "lora": {"rank": 2}}
    )
    names = trainable(model, "backbone")
    assert "prompt_embeddings" in names and "blocks.0.attn.qkv.lora_A" in names
    assert "blocks.0.attn.qkv.base.bias" in names and "norm.bias" in names
    biases = sum(v for n, v in names.items() if n.endswith("bias"))
    assert report.counts["trainable_backbone"] == 2 * D + DEPTH * 2 * (16 + 48) + biases
    assert report.tunings == ["vpt", "lora", "bitfit"] and report.params["bitfit"] == {}
    # LoRA then SSF: the scale comes after the whole adapted layer
    model = vit()
    apply_tuning(model, ["lora", "ssf"], {"ssf": {"targets": ["Linear"]}})
    assert isinstance(model.backbone.blocks[0].attn.qkv.base, LoRALinear)


# ----------------------------------------------------------------------------- options
def test_unknown_and_invalid_options_name_their_key():
    with pytest.raises(ConfigError, match=r"'model.tuning_params.rnak'"):
        apply_tuning(vit(), "lora", {"rnak": 4})
    with pytest.raises(ConfigError, match=r"'model.tuning_params.lora.rnak'"):
        apply_tuning(vit(), ["vpt", "lora"], {"lora": {"rnak": 4}})
    with pytest.raises(ConfigError, match=r"'model.tuning_params.rank'"):
        apply_tuning(vit(), "lora", {"rank": 0})
    with pytest.raises(ConfigError, match=r"'model.tuning_params.norm_stats'"):
        apply_tuning(resnet8(), "bitfit", {"norm_stats": "moving"})
    with pytest.raises(ConfigError, match=r"'model.tuning_params.ssf'"):
        apply_tuning(vit(), ["vpt", "lora"], {"ssf": {}})
    with pytest.raises(ConfigError, match=r"'model.tuning_params.length'"):
        apply_tuning(vit(), "full", {"length": 3})
    with pytest.raises(ConfigError, match="no tuning named 'lorra'"):
        apply_tuning(vit(), "lorra", {})
    with pytest.raises(ConfigError, match="alone"):
        apply_tuning(vit(), ["full", "lora"], {})
    model = vit()
    with pytest.raises(ConfigError):
        apply_tuning(model, "lora", {"rank": 0})
    assert parameter_counts(model)["trainable"] == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- LIFT init
def test_class_mean_init_sets_normalised_means_of_normalised_features():
    head = CosineHead(2, 3)
    keep = head.weight[2].clone()
    features = torch.tensor([[3.0, 4.0], [0.0, 2.0], [0.0, -5.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    counts = class_mean_init(head, features, labels)
    assert counts.tolist() == [2, 2, 0]
    # class 0: mean of (0.6, 0.8) and (0, 1) = (0.3, 0.9) -> / sqrt(0.9)
    m0 = torch.tensor([0.3, 0.9]) / 0.9**0.5
    # class 1: mean of (0, -1) and (-1, 0) = (-0.5, -0.5) -> (-1, -1) / sqrt 2
    m1 = torch.tensor([-1.0, -1.0]) / 2**0.5
    assert torch.allclose(head.weight[0], m0) and torch.allclose(head.weight[1], m1)
    assert torch.equal(head.weight[2], keep)  # no sample: its init stays

    linear = LinearHead(2, 3)
    class_mean_init(linear, features, labels)
    assert torch.allclose(linear.weight[0], torch.tensor([0.3, 0.9]))
    assert torch.allclose(linear.weight[1], torch.tensor([-0.5, -0.5]))
    assert linear.bias[:2].tolist() == [0.0, 0.0]
    raw = LinearHead(2, 3)
    class_mean_init(raw, features, labels, normalize_features=False)
    assert torch.allclose(raw.weight[0], torch.tensor([1.5, 3.0]))
    with pytest.raises(ValueError):
        class_mean_init(head, features, torch.tensor([0, 1, 2, 3]))
