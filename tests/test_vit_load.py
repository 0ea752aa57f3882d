"""More checks of longtail/models/vit.py: an npz forward equals the converted state dict's (also
under big_vision's ``opt/target/`` prefix), npz position embeddings resized, the no-grad prefix
with frozen / trainable prompts, checkpointing with drop-path, the 1-channel stem, option and
file errors."""

import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from longtail.core.errors import ConfigError, LongtailError
from longtail.models import BACKBONES
from longtail.models.vit import VisionTransformer, load_vit_pretrained


def small(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(img_size=32, patch_size=16, embed_dim=24, depth=3, num_heads=2)
    return VisionTransformer(**{**args, **kw}).eval()


def randomized(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def to_npz(model, path, prefix=""):
    s = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d, h = model.embed_dim, model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": s["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": s["patch_embed.proj.bias"],
        "cls": s["cls_token"],
        "Transformer/posembed_input/pos_embedding": s["pos_embed"],
        "Transformer/encoder_norm/scale": s["norm.weight"],
        "Transformer/encoder_norm/bias": s["norm.bias"],
        "head/kernel": np.zeros((d, 7), np.float32),
        "pre_logits/kernel": np.zeros((d, d), np.float32),
    }
    for i in range(len(model.blocks)):
        p, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        for ln, n in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{p}{ln}/scale"], w[f"{p}{ln}/bias"] = s[t + n + ".weight"], s[t + n + ".bias"]
        qw, qb = s[t + "attn.qkv.weight"], s[t + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            a = f"{p}MultiHeadDotProductAttention_1/{n}/"
            w[a + "kernel"] = qw[j * d : (j + 1) * d].T.reshape(d, h, d // h)
            w[a + "bias"] = qb[j * d : (j + 1) * d].reshape(h, d // h)
        o = f"{p}MultiHeadDotProductAttention_1/out/"
        w[o + "kernel"] = s[t + "attn.proj.weight"].T.reshape(h, d // h, d)
        w[o + "bias"] = s[t + "attn.proj.bias"]
        for j in (0, 1):
            w[f"{p}MlpBlock_3/Dense_{j}/kernel"] = s[t + f"mlp.fc{j + 1}.weight"].T
            w[f"{p}MlpBlock_3/Dense_{j}/bias"] = s[t + f"mlp.fc{j + 1}.bias"]
    np.savez(path, **{prefix + k: v for k, v in w.items()})
    return w


@pytest.mark.parametrize("prefix", ["", "opt/target/"])
def test_npz_forward_equals_the_converted_state_dict(tmp_path, prefix):
    source = randomized(small())
    w = to_npz(source, tmp_path / "v.npz", prefix)
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "v.safetensors")
    )
    a, b = small(seed=1), small(seed=2)
    assert load_vit_pretrained(a, tmp_path / "v.npz") == []
    load_vit_pretrained(b, tmp_path / "v.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    q = w["Transformer/encoderblock_2/MultiHeadDotProductAttention_1/query/kernel"]  # [D, h, hd]
    assert np.array_equal(a.blocks[2].attn.qkv.weight[:24].detach().numpy(), q.reshape(24, 24).T)
    o = w["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"]  # [h, hd, D]
    assert np.array_equal(a.blocks[0].attn.proj.weight.detach().numpy(), o.reshape(24, 24).T)
    k = w["embedding/kernel"]  # HWIO
    assert np.array_equal(a.patch_embed.proj.weight[5, 1].detach().numpy(), k[:, :, 1, 5])


def test_npz_pos_embed_is_resized_and_bad_npz_named(tmp_path):
    source = randomized(small(img_size=64))  # grid 4
    to_npz(source, tmp_path / "v.npz")
    model = small(img_size=32)  # grid 2
    load_vit_pretrained(model, tmp_path / "v.npz")
    assert torch.equal(model.pos_embed[:, 0], source.pos_embed[:, 0])
    np.savez(tmp_path / "bad.npz", foo=np.zeros(3, np.float32))
    with pytest.raises(LongtailError, match="embedding/kernel"):
        load_vit_pretrained(small(), tmp_path / "bad.npz")


def test_frozen_backbone_without_prompts_is_the_plain_forward_and_shallow_prompts_enter_once():
    model = randomized(small())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    model.requires_grad_(False)
    assert torch.equal(model(x), ref)
    model.enable_prompts(2)
    seen = {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0][:, 1:3]))
        blk.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(f"o{i}", o[:, 1:3]))
    out = model(x)
    assert torch.equal(seen[0], model.prompt_embeddings[0].expand(2, -1, -1))
    assert torch.equal(seen[1], seen["o0"]) and torch.equal(seen[2], seen["o1"])
    assert out.requires_grad and model.frozen_prefix(x) == 0  # trainable prompts: no prefix


def test_frozen_prompts_and_blocks_run_without_a_graph():
    model = randomized(small())
    model.enable_prompts(2, deep=True)
    model.requires_grad_(False)
    model.blocks[2].requires_grad_(True)
    flags = {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, a, o, i=i: flags.__setitem__(i, o.requires_grad))
    model.train()(torch.randn(2, 3, 32, 32))
    assert model.frozen_prefix() == 2 and flags == {0: False, 1: False, 2: True}
    x = torch.randn(2, 3, 32, 32, requires_grad=True)  # a gradient w.r.t. the input: no prefix
    model(x).sum().backward()
    assert x.grad is not None


def test_gradient_checkpointing_matches_with_deep_prompts_and_drop_path():
    grads = []
    for ckpt in (False, True):
        model = randomized(small(drop_path_rate=0.2, grad_checkpointing=ckpt, prompt_dropout=0.1))
        model.enable_prompts(2, deep=True)
        model.train()
        torch.manual_seed(5)
        model(torch.randn(2, 3, 32, 32)).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_one_channel_stem_and_options(tmp_path, monkeypatch):
    source = randomized(BACKBONES.build("vit_tiny_patch16_224", img_size=32))
    torch.save(source.state_dict(), tmp_path / "w.pth")
    grey = BACKBONES.build(
        "vit_tiny_patch16_224", img_size=32, in_chans=1, pretrained=str(tmp_path / "w.pth")
    )
    assert torch.allclose(
        grey.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(1, keepdim=True)
    )
    deep = BACKBONES.build(
        "vit_tiny_patch16_224",
        img_size=32,
        prompt_length=2,
        prompt_deep=True,
        prompt_depth=4,
        pretrained=str(tmp_path / "w.pth"),
    )
    assert deep.prompt_embeddings.shape == (4, 2, 192)
    for bad, key in [
        ({"prompt_depth": 3}, "prompt_depth"),
        ({"prompt_depth": 13, "prompt_deep": True}, "prompt_depth"),
        ({"prompt_length": -1}, "prompt_length"),
        ({"prompt_dropout": 1.5}, "prompt_dropout"),
        ({"prompt_init": "zeros"}, "prompt_init"),
        ({"in_chans": 0}, "in_chans"),
        ({"grad_checkpointing": "yes"}, "grad_checkpointing"),
    ]:
        with pytest.raises(ConfigError, match=f"model.backbone_params.{key}"):
            BACKBONES.build("vit_tiny_patch16_224", img_size=32, **bad)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(LongtailError, match="download model.safetensors"):
        BACKBONES.build(
            "vit_tiny_patch16_224", pretrained="hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"
        )
