"""Vision Transformer (Dosovitskiy et al., ICLR 2021) with visual prompt tuning (VPT, Jia et al.,
ECCV 2022), in timm's ``vit_*_patch16_224`` key layout (no classifier: the long-tail head follows).

ViT: the image is cut into P x P patches, each linearly embedded (a P x P / P conv,
``patch_embed.proj``); a learnable ``cls_token`` is prepended and ``pos_embed`` [1, 1 + N, D]
added (N = (img_size / P)^2). Each pre-norm block: x = x + attn(norm1(x)); x = x + mlp(norm2(x))
with attn = proj(softmax(q k^T / sqrt(d_h)) v) over ``heads`` heads (q, k, v from one fused
``qkv`` linear) and mlp = fc2(gelu(fc1(x))) (4x wider). A final ``norm`` (LayerNorm, eps 1e-6).

VPT: L learnable ``prompt_embeddings`` tokens sit between CLS and the patches, [CLS, prompts,
patches], with no position embedding. Shallow: inserted once before block 0 and carried through.
Deep: fresh prompts for each of the first ``prompt_depth`` blocks, the previous block's prompt
outputs dropped and replaced (later blocks carry the last ones). Init uniform(-v, v),
v = sqrt(6 / (3 P^2 + D)) (VPT's Xavier-style init).

Pooled feature (``pool``): ``cls`` the CLS token after the final norm (timm's ``global_pool=
'token'``); ``avg`` the mean of the patch tokens after the norm; ``cls_prompt`` the feature of
RSAM-PT / GNM-PT (Li et al., NeurIPS 2024): (CLS after the final norm + mean of the last block's
prompt outputs, taken before it) / 2, as GNM-PT's code computes it.

Weights are read by path (nothing is downloaded): a timm ``.safetensors`` / ``.pth`` or Google's
original ``.npz`` (the IN-21k release, :func:`load_vit_pretrained`); position embeddings are
resized (bicubic) to the model's grid. Blocks before the first one with a trainable parameter run
under ``torch.no_grad()`` (a linear probe or last-blocks tuning stores no activations there).
Shapes: x [B, in_chans, img_size, img_size] -> forward_features [B, D].
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from longtail.core.errors import ConfigError, LongtailError
from longtail.models.pretrained import SUFFIXES, backbone_weights, check_fit, read_state_dict
from longtail.models.registry import BACKBONES

_KEY = "model.backbone_params."
POOLS = ("cls", "avg", "cls_prompt")
PROMPT_INITS = ("uniform", "normal")
# timm's classifier keys (head) and the representation layer of old IN-21k checkpoints
# (pre_logits, unused by the later releases): dropped on load
DROPPED_PREFIXES = ("head.", "pre_logits.")
HF_PREFIX = "hf-hub:"

# name -> (patch size, embed dim, depth, heads)
ARCHITECTURES: Dict[str, Tuple[int, int, int, int]] = {
    "vit_tiny_patch16_224": (16, 192, 12, 3),
    "vit_small_patch16_224": (16, 384, 12, 6),
    "vit_base_patch16_224": (16, 768, 12, 12),
    "vit_base_patch32_224": (32, 768, 12, 12),
    "vit_large_patch16_224": (16, 1024, 24, 16),
}


# ----------------------------------------------------------------------------- modules
class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, N, D] by a P x P conv of stride P (``proj``)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise LongtailError(
                f"The ViT is built for {self.img_size}-px inputs ({self.img_size} x "
                f"{self.img_size}), got {x.shape[-2]} x {x.shape[-1]}: set model.input_size={self.img_size} (inputs "
                f"resized inside the model) or {_KEY}img_size to the input size."
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: one fused ``qkv`` linear, F.scaled_dot_product_attention,
    the output ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not a multiple of the {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """fc2(gelu(fc1(x)))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drops the residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1 x), then + mlp(norm2 x)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class VisionTransformer(nn.Module):
    """A ViT backbone with optional visual prompts, timm's ``vit_*`` state-dict keys.

    Args:
        img_size: the input size it is built for (pos_embed grid img_size / patch_size).
        patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: the architecture.
        drop_path_rate: stochastic depth, linearly 0 .. rate over the blocks.
        pool: ``cls`` | ``avg`` | ``cls_prompt`` (module docstring).
        prompt_length, prompt_depth, prompt_deep: prompts (see :meth:`enable_prompts`).
        prompt_dropout: dropout on the prompt tokens as they enter.
        prompt_init: ``uniform`` (VPT's) or ``normal`` (truncated, std 0.02).
        grad_checkpointing: recompute each block in the backward pass (while training).
        arch: the name errors give.
    Attributes: ``num_features`` (= embed_dim), ``blocks``, ``prompt_embeddings`` (None or
    [1 | depth, L, D]), ``num_prompts``.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        pool: str = "cls",
        prompt_length: int = 0,
        prompt_depth: Optional[int] = None,
        prompt_deep: bool = False,
        prompt_dropout: float = 0.0,
        prompt_init: str = "uniform",
        grad_checkpointing: bool = False,
        arch: str = "vit",
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if prompt_init not in PROMPT_INITS:
            raise ValueError(f"prompt_init must be one of {PROMPT_INITS}, got {prompt_init!r}")
        self.arch = arch
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.pool = pool
        self.grad_checkpointing = grad_checkpointing
        self.prompt_init = prompt_init
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # 0 .. rate
        self.blocks = nn.Sequential(
            *(Block(embed_dim, num_heads, mlp_ratio, rates[i]) for i in range(depth))
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()
        self.prompt_embeddings: Optional[nn.Parameter] = None
        self.prompt_drop = nn.Dropout(prompt_dropout)
        self.prompt_deep = False
        if prompt_length:
            self.enable_prompts(prompt_length, prompt_depth, prompt_deep)

    def _init_weights(self) -> None:  # timm's 'default' init
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ prompts
    @property
    def num_prompts(self) -> int:
        p = self.prompt_embeddings
        return 0 if p is None else int(p.shape[1])

    def enable_prompts(self, length: int, depth: Optional[int] = None, deep: bool = False) -> None:
        """Allocate ``length`` learnable prompt tokens (``prompt_embeddings``, replacing any).

        Shallow (``deep`` false): one set [1, L, D] inserted before block 0 and carried through
        (``depth`` must be None or 1). Deep: [depth, L, D], fresh prompts at the input of blocks
        0 .. depth - 1 (default: every block). ``length`` 0 removes the prompts."""
        n_blocks = len(self.blocks)
        if not _is_int(length) or length < 0:
            raise ConfigError(
                f"The prompt length ({_KEY}prompt_length / model.tuning_params.length) must be "
                f"an integer >= 0, got {length!r}."
            )
        if not isinstance(deep, bool):
            raise ConfigError(f"'{_KEY}prompt_deep' must be true or false, got {deep!r}.")
        if depth is not None and (not _is_int(depth) or not 1 <= depth <= n_blocks):
            raise ConfigError(
                f"The prompt depth ({_KEY}prompt_depth / model.tuning_params.depth) must be null "
                f"or an integer in 1..{n_blocks} (the blocks of {self.arch}), got {depth!r}."
            )
        if not deep and depth not in (None, 1):
            raise ConfigError(
                f"A prompt depth of {depth} needs deep prompts ({_KEY}prompt_deep=true / "
                f"model.tuning_params.deep=true): shallow prompts enter once, before block 0."
            )
        ref = self.pos_embed
        self.prompt_deep = deep
        if length == 0:
            self.prompt_embeddings = None
            return
        rows = (n_blocks if depth is None else depth) if deep else 1
        prompts = torch.empty(rows, length, self.embed_dim, device=ref.device, dtype=ref.dtype)
        if self.prompt_init == "uniform":
            val = math.sqrt(6.0 / float(3 * self.patch_size * self.patch_size + self.embed_dim))
            nn.init.uniform_(prompts, -val, val)
        else:
            nn.init.trunc_normal_(prompts, std=0.02)
        self.prompt_embeddings = nn.Parameter(prompts)

    def prompt_parameters(self) -> Iterator[nn.Parameter]:
        """The prompt parameters (none without prompts)."""
        if self.prompt_embeddings is not None:
            yield self.prompt_embeddings

    def _with_prompts(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Block i's input: prompts inserted (block 0) or replaced (deep, i < depth)."""
        p = self.prompt_embeddings
        if p is None or (i > 0 and not (self.prompt_deep and i < p.shape[0])):
            return x
        prompt = self.prompt_drop(p[i if self.prompt_deep else 0].expand(x.shape[0], -1, -1))
        rest = x[:, 1:] if i == 0 else x[:, 1 + p.shape[1] :]
        return torch.cat([x[:, :1], prompt.to(x.dtype), rest], dim=1)

    # ------------------------------------------------------------------ forward
    def frozen_prefix(self, x: Optional[torch.Tensor] = None) -> int:
        """k: blocks 0 .. k-1 (and the embedding) need no gradient: no parameter of them or
        before them requires grad, no trainable prompt enters (every prompt enters at block 0 or
        a block of a deep set starting at 0) and the input needs none."""
        if not torch.is_grad_enabled() or (x is not None and x.requires_grad):
            return 0
        stem = [self.cls_token, self.pos_embed, *self.patch_embed.parameters()]
        if any(p.requires_grad for p in stem):
            return 0
        if any(p.requires_grad for p in self.prompt_parameters()):
            return 0
        for i, block in enumerate(self.blocks):
            if any(p.requires_grad for p in block.parameters()):
                return i
        return len(self.blocks)

    _first_trained_block = frozen_prefix

    def forward_embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> tokens [B, 1 + N, D]: [CLS, patches] + pos_embed."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + self.pos_embed.to(x.dtype)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> the last block's tokens [B, 1 + L + N, D] ([CLS, prompts, patches]),
        before the final norm."""
        k = self.frozen_prefix(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and k == 0):
            h = self.forward_embed(x)
        for i, block in enumerate(self.blocks):
            if i < k:
                with torch.no_grad():
                    h = block(self._with_prompts(h, i))
                continue
            h = self._with_prompts(h, i)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        return h

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, 1 + L + N, D] (the last block's, before the final norm) -> [B, D] by ``pool``:
        ``cls_prompt`` averages the normed CLS with the prompt outputs taken before the norm,
        as GNM-PT's code does (``(x[:, 0] + prompt_out.mean(1)) / 2``)."""
        n_prompts = self.num_prompts
        normed = self.norm(tokens)
        if self.pool == "cls":
            return normed[:, 0]
        if self.pool == "avg":
            return normed[:, 1 + n_prompts :].mean(1)
        if n_prompts == 0:
            raise ConfigError(
                f"{_KEY}pool=cls_prompt averages the CLS token with the prompt outputs, and "
                f"{self.arch} has no prompts: set {_KEY}prompt_length (or model.tuning=vpt), or "
                f"choose pool=cls."
            )
        return (normed[:, 0] + tokens[:, 1 : 1 + n_prompts].mean(1)) / 2

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> pooled features [B, num_features]."""
        return self.pool_tokens(self.forward_tokens(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


# ----------------------------------------------------------------------------- loading
def resample_pos_embed(
    pos: torch.Tensor, grid: int, num_prefix: int = 1, antialias: bool = True
) -> torch.Tensor:
    """[1, prefix + g*g, D] -> [1, prefix + grid*grid, D]: the grid resized bicubically (as
    timm's resample_abs_pos_embed), the prefix (CLS) embeddings kept as they are."""
    prefix, rest = pos[:, :num_prefix], pos[:, num_prefix:]
    old = int(round(math.sqrt(rest.shape[1])))
    if old * old != rest.shape[1]:
        raise LongtailError(
            f"The checkpoint's position embeddings ({rest.shape[1]} patch positions) are not a "
            f"square grid; they cannot be resized to {grid} x {grid}."
        )
    if old == grid:
        return pos
    d = rest.shape[-1]
    img = rest.float().reshape(1, old, old, d).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", antialias=antialias)
    rest = img.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos.dtype)
    return torch.cat([prefix, rest], dim=1)


resize_pos_embed = resample_pos_embed


def _npz_convert(arrays: Mapping[str, np.ndarray], depth: int) -> Dict[str, torch.Tensor]:
    """Google's ViT ``.npz`` (Flax names) -> timm's state-dict keys. ``head/*`` (the IN-21k
    classifier) and ``pre_logits/*`` (the representation layer) are dropped."""
    prefix = "opt/target/" if "opt/target/embedding/kernel" in arrays else ""

    def get(name: str) -> torch.Tensor:
        key = prefix + name
        if key not in arrays:
            raise LongtailError(
                f"The .npz has no {key!r}: it is not a ViT checkpoint of Google's "
                f"vision_transformer release (keys like embedding/kernel, cls, "
                f"Transformer/encoderblock_0/...)."
            )
        return torch.from_numpy(np.asarray(arrays[key]).copy())

    big_vision = f"{prefix}Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"
    mha, mlp, ln2 = (0, 0, 1) if big_vision in arrays else (1, 3, 2)
    pos_key = (
        "Transformer/posembed_input/pos_embedding"
        if prefix + "Transformer/posembed_input/pos_embedding" in arrays
        else "pos_embedding"
    )
    out: Dict[str, torch.Tensor] = {
        "patch_embed.proj.weight": get("embedding/kernel").permute(3, 2, 0, 1),  # HWIO -> OIHW
        "patch_embed.proj.bias": get("embedding/bias"),
        "cls_token": get("cls"),
        "pos_embed": get(pos_key),
        "norm.weight": get("Transformer/encoder_norm/scale"),
        "norm.bias": get("Transformer/encoder_norm/bias"),
    }
    n = 0
    while f"{prefix}Transformer/encoderblock_{n}/LayerNorm_0/scale" in arrays:
        n += 1
    for i in range(n):
        src, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = f"{src}MultiHeadDotProductAttention_{mha}/"
        out[dst + "norm1.weight"] = get(src + "LayerNorm_0/scale")
        out[dst + "norm1.bias"] = get(src + "LayerNorm_0/bias")
        # query/key/value kernel [D, heads, hd] -> [heads*hd, D] rows of the fused qkv
        out[dst + "attn.qkv.weight"] = torch.cat(
            [get(f"{att}{q}/kernel").flatten(1).T for q in ("query", "key", "value")]
        )
        out[dst + "attn.qkv.bias"] = torch.cat(
            [get(f"{att}{q}/bias").reshape(-1) for q in ("query", "key", "value")]
        )
        # out kernel [heads, hd, D] -> [D, heads*hd]
        out[dst + "attn.proj.weight"] = get(att + "out/kernel").flatten(0, 1).T
        out[dst + "attn.proj.bias"] = get(att + "out/bias")
        out[dst + "norm2.weight"] = get(f"{src}LayerNorm_{ln2}/scale")
        out[dst + "norm2.bias"] = get(f"{src}LayerNorm_{ln2}/bias")
        for r in range(2):
            dense = f"{src}MlpBlock_{mlp}/Dense_{r}/"
            out[f"{dst}mlp.fc{r + 1}.weight"] = get(dense + "kernel").T
            out[f"{dst}mlp.fc{r + 1}.bias"] = get(dense + "bias")
    return {k: v.contiguous() for k, v in out.items()}


def _missing_file(path: Path) -> LongtailError:
    return LongtailError(
        f"No pretrained ViT weights at {path.absolute()} ({_KEY}pretrained). longtail downloads "
        f"nothing: save them there yourself and give the path, e.g. where timm is installed and "
        f"online `m = timm.create_model('vit_base_patch16_224.augreg_in21k', pretrained=True)` "
        f"then `safetensors.torch.save_file(m.state_dict(), 'vit_b16_in21k.safetensors')`, or "
        f"take the .npz of Google's vision_transformer release (e.g. ViT-B_16.npz, "
        f"gs://vit_models/imagenet21k/ViT-B_16.npz) or a timm model.safetensors from the Hugging "
        f"Face hub."
    )


def _hf_hub_file(spec: str) -> Path:
    """``hf-hub:timm/<name>``: the repository's model.safetensors through huggingface_hub (if
    installed and online), else LongtailError saying to download the file and give its path."""
    repo = spec[len(HF_PREFIX) :].strip()
    how = (
        f"download model.safetensors of https://huggingface.co/{repo} yourself and set "
        f"{_KEY}pretrained to its path"
    )
    try:
        from huggingface_hub import hf_hub_download  # type: ignore[import-not-found]
    except ImportError:
        raise LongtailError(
            f"{_KEY}pretrained={spec!r} cannot be fetched here (the huggingface_hub package is "
            f"not installed): {how}."
        ) from None
    try:
        return Path(hf_hub_download(repo, "model.safetensors"))
    except Exception as err:  # offline, unknown repository, no such file
        line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise LongtailError(f"{spec!r} cannot be fetched here ({line}): {how}.") from None


def load_vit_pretrained(model: VisionTransformer, path: Union[str, os.PathLike]) -> List[str]:
    """Load a timm ``.safetensors`` / ``.pth`` (or longtail) checkpoint or Google's ``.npz``
    into ``model``; returns the dropped classifier keys of a state-dict file (an .npz: [],
    its head/* and pre_logits/* are never converted).

    Wrapper prefixes (``module.``, ``backbone.``, ...) are stripped, the classifier (``head.*``)
    and the old representation layer (``pre_logits.*``) dropped; ``pos_embed`` is resized to the
    model's grid (bicubic, CLS kept); RGB patch weights go into a 1-channel model summed over the
    channels; prompts missing from the file keep their init. Any other missing, unexpected or
    mis-shaped key raises LongtailError naming the first few."""
    spec = str(path)
    file = _hf_hub_file(spec) if spec.startswith(HF_PREFIX) else Path(path).expanduser()
    if not file.is_file():
        raise _missing_file(file)
    dropped: List[str] = []
    if file.suffix.lower() == ".npz":
        try:
            with np.load(file, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as err:
            raise LongtailError(f"{file} cannot be read as an .npz ({err}).") from None
        state = _npz_convert(arrays, len(model.blocks))
    elif file.suffix.lower() in SUFFIXES:
        state, dropped = backbone_weights(read_state_dict(file), DROPPED_PREFIXES, file)
    else:
        raise LongtailError(
            f"{file}: ViT weights are read from {', '.join(SUFFIXES)} or .npz files; rename it "
            f"or save the state dict as one of them."
        )
    own = model.state_dict()
    pos = state.get("pos_embed")
    if pos is not None and pos.dim() == 3 and pos.shape != own["pos_embed"].shape:
        if pos.shape[-1] == own["pos_embed"].shape[-1]:
            state["pos_embed"] = resample_pos_embed(pos, model.patch_embed.grid_size)
    stem, key = state.get("patch_embed.proj.weight"), "patch_embed.proj.weight"
    if stem is not None and stem.dim() == 4 and stem.shape[1] == 3 and own[key].shape[1] == 1:
        state[key] = stem.float().sum(1, keepdim=True)
    for name in own:
        if "prompt" in name and name not in state:
            state[name] = own[name]
    check_fit(
        own,
        state,
        file,
        model.arch,
        "choose the matching model.backbone (timm's vit_base_patch16_224 weights go with "
        "model.backbone=vit_base_patch16_224); only the classifier (head.*, pre_logits.*) is "
        "ignored.",
    )
    model.load_state_dict(state)
    return dropped


# ----------------------------------------------------------------------------- building
def vit(
    arch: str,
    in_chans: int = 3,
    img_size: int = 224,
    pretrained: Optional[Union[str, os.PathLike]] = None,
    pool: str = "cls",
    prompt_length: int = 0,
    prompt_depth: Optional[int] = None,
    prompt_deep: bool = False,
    prompt_dropout: float = 0.0,
    prompt_init: str = "uniform",
    grad_checkpointing: bool = False,
    drop_path_rate: float = 0.0,
) -> VisionTransformer:
    """Build the ViT ``arch`` (a key of ARCHITECTURES) with its options checked (ConfigError
    naming the key) and ``pretrained`` weights loaded (:func:`load_vit_pretrained`)."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"Unknown ViT {arch!r}. Available: {', '.join(ARCHITECTURES)}.")
    patch, dim, depth, heads = ARCHITECTURES[arch]

    def bad(key: str, want: str, got: Any) -> ConfigError:
        return ConfigError(f"'{_KEY}{key}' must be {want}, got {got!r}.")

    if not _is_int(in_chans) or in_chans < 1:
        raise bad("in_chans", "a positive integer", in_chans)
    if not _is_int(img_size) or img_size < patch or img_size % patch:
        raise bad("img_size", f"a positive multiple of the patch size {patch}", img_size)
    if pool not in POOLS:
        raise bad("pool", " / ".join(POOLS), pool)
    if not _is_int(prompt_length) or prompt_length < 0:
        raise bad("prompt_length", "an integer >= 0", prompt_length)
    if prompt_depth is not None and (not _is_int(prompt_depth) or not 1 <= prompt_depth <= depth):
        raise bad("prompt_depth", f"null or an integer in 1..{depth} (the blocks)", prompt_depth)
    if not isinstance(prompt_deep, bool):
        raise bad("prompt_deep", "true or false", prompt_deep)
    if not prompt_deep and prompt_depth not in (None, 1):
        raise ConfigError(
            f"'{_KEY}prompt_depth' ({prompt_depth}) needs deep prompts ({_KEY}prompt_deep=true): "
            f"shallow prompts enter once, before block 0."
        )
    for key, value in (("prompt_dropout", prompt_dropout), ("drop_path_rate", drop_path_rate)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise bad(key, "a number in [0, 1)", value)
    if prompt_init not in PROMPT_INITS:
        raise bad("prompt_init", " / ".join(PROMPT_INITS), prompt_init)
    if not isinstance(grad_checkpointing, bool):
        raise bad("grad_checkpointing", "true or false", grad_checkpointing)
    if pretrained is not None and (
        not isinstance(pretrained, (str, os.PathLike)) or not str(pretrained).strip()
    ):
        raise bad(
            "pretrained",
            f"the path of a {' / '.join(SUFFIXES)} / .npz file, 'hf-hub:timm/<name>' or null",
            pretrained,
        )
    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        drop_path_rate=float(drop_path_rate),
        pool=pool,
        prompt_length=prompt_length,
        prompt_depth=prompt_depth,
        prompt_deep=prompt_deep,
        prompt_dropout=float(prompt_dropout),
        prompt_init=prompt_init,
        grad_checkpointing=grad_checkpointing,
        arch=arch,
    )
    if pretrained is not None:
        load_vit_pretrained(model, pretrained)
    return model


def _register(arch: str) -> Callable[..., VisionTransformer]:
    patch, dim, depth, heads = ARCHITECTURES[arch]

    def build(
        in_chans: int = 3,
        img_size: int = 224,
        pretrained: Optional[str] = None,
        pool: str = "cls",
        prompt_length: int = 0,
        prompt_depth: Optional[int] = None,
        prompt_deep: bool = False,
        prompt_dropout: float = 0.0,
        prompt_init: str = "uniform",
        grad_checkpointing: bool = False,
        drop_path_rate: float = 0.0,
    ) -> VisionTransformer:
        return vit(
            arch,
            in_chans,
            img_size,
            pretrained,
            pool,
            prompt_length,
            prompt_depth,
            prompt_deep,
            prompt_dropout,
            prompt_init,
            grad_checkpointing,
            drop_path_rate,
        )

    build.__name__ = build.__qualname__ = arch
    build.__doc__ = (
        f"{arch}: patch {patch}, {dim}-d, {depth} blocks, {heads} heads (timm's key layout)."
    )
    BACKBONES.register(arch)(build)
    return build


vit_tiny_patch16_224 = _register("vit_tiny_patch16_224")
vit_small_patch16_224 = _register("vit_small_patch16_224")
vit_base_patch16_224 = _register("vit_base_patch16_224")
vit_base_patch32_224 = _register("vit_base_patch32_224")
vit_large_patch16_224 = _register("vit_large_patch16_224")
