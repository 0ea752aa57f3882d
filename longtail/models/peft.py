"""Parameter-efficient tuning of a pretrained backbone: what trains, and the small modules added.

``model.tuning`` names one tuning (or a list applied in order), ``model.tuning_params`` its
options; :func:`apply_tuning` runs once after the Classifier is built. The backbone is frozen
first, then each tuning marks its own parameters trainable or inserts trainable modules, so a
list trains the union of what its tunings train. The head and the neck always train.

- ``full``: every backbone parameter trains (plain fine-tuning).
- ``linear_probe``: nothing of the backbone trains; it stays in eval mode (BN statistics and
  dropout frozen), as :meth:`Classifier.freeze_backbone`.
- ``bitfit`` (Ben Zaken, Goldberg, Ravfogel, ACL 2022): only the bias terms train (those of
  linear / conv layers and of the norm layers).
- ``ssf`` (Lian, Zhou, Feng, Wang, NeurIPS 2022): after each linear, conv and norm layer a
  learnable per-channel y = gamma * x + beta (gamma = 1, beta = 0 at init); mergeable into the
  layer before it for inference.
- ``lora`` (Hu et al., ICLR 2022): W x + (alpha / r) B A x on the targeted linear layers,
  A [r, in] Kaiming-uniform, B [out, r] zero (the identity at init); mergeable.
- ``adapter``: AdaptFormer (Chen et al., NeurIPS 2022) on a transformer: each block's MLP
  becomes mlp(x) + s * up(relu(down(x))), up zero-initialised; on a CNN with ``blocks()`` the
  same bottleneck made of 1x1 convolutions in parallel to each residual block.
- ``vpt`` (Jia et al., ECCV 2022): learnable prompt tokens (``backbone.enable_prompts``);
  only they train.

LIFT (Shi et al., ICML 2024) fine-tunes pretrained models on long-tailed data with these
lightweight tunings and a classifier initialised from class means (:func:`class_mean_init`).

BatchNorm statistics: tunings that freeze the backbone's weights also freeze its BN running
statistics by default (``norm_stats: frozen``): each BN layer's class is swapped for a subclass
whose ``train()`` always keeps it in eval mode (same parameters, buffers and state-dict keys),
so ``model.train()`` cannot turn the statistics back on.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Dict, Iterable, List, Literal, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from longtail.core.errors import ConfigError
from longtail.core.registry import Registry

TUNINGS = Registry("tuning")

# the config key of the options of the tuning being applied (for error messages)
_WHERE: contextvars.ContextVar[str] = contextvars.ContextVar("where", default="model.tuning_params")

NormStats = Literal["frozen", "train"]


def _key(name: str) -> str:
    return f"{_WHERE.get()}.{name}"


# ----------------------------------------------------------------------------- modules
class LoRALinear(nn.Module):
    """``base(x) + scale * B A dropout(x)``, scale = alpha / rank (LoRA, Hu et al. 2022).

    ``lora_A`` [rank, in] Kaiming-uniform (a = sqrt 5, as nn.Linear), ``lora_B`` [out, rank]
    zero: the identity at init. The wrapped layer keeps its keys under ``base.`` (``qkv.base.weight``).
    ``freeze_base`` stops its gradients (``apply_tuning`` has frozen it already and passes False).
    Shapes: [..., in] -> [..., out].
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 8,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        freeze_base: bool = True,
    ):
        super().__init__()
        self.base = base
        self.rank = int(rank)
        self.scale = float(rank if alpha is None else alpha) / self.rank
        w = base.weight
        self.lora_A = nn.Parameter(
            torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if freeze_base:
            base.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code reading ``layer.weight`` keeps working)."""
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, [out, in]."""
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(
            F.linear(self.dropout(x), self.lora_A), self.lora_B
        )

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain nn.Linear with W + scale B A (the same function without dropout)."""
        b = self.base
        out = nn.Linear(
            b.in_features,
            b.out_features,
            bias=b.bias is not None,
            device=b.weight.device,
            dtype=b.weight.dtype,
        )
        out.weight.copy_(b.weight + self.delta_weight().to(b.weight.dtype))
        if b.bias is not None:
            out.bias.copy_(b.bias)
        out.weight.requires_grad_(b.weight.requires_grad)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


class SSF(nn.Module):
    """``gamma * base(x) + beta`` per channel (SSF, Lian et al. 2022): ``channel_dim`` -1 for
    linear / LayerNorm outputs ([..., C] tokens), 1 for conv / BN outputs ([B, C, H, W]).

    ``scale`` (gamma) init 1, ``shift`` (beta) init 0: the identity at init. The wrapped layer
    keeps its keys under ``base.``."""

    def __init__(self, base: nn.Module, channels: int, channel_dim: int):
        super().__init__()
        self.base = base
        self.channel_dim = int(channel_dim)
        ref = next(base.parameters(), None)
        kw: Dict[str, Any] = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        self.scale = nn.Parameter(torch.ones(channels, **kw))
        self.shift = nn.Parameter(torch.zeros(channels, **kw))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base(*args, **kwargs)
        if self.channel_dim == -1 or y.dim() == 2:
            return y * self.scale + self.shift
        shape = [1] * y.dim()
        shape[self.channel_dim] = -1
        return y * self.scale.view(shape) + self.shift.view(shape)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """The wrapped layer with gamma and beta folded into its weight and bias:
        W' = gamma W (per output channel), b' = gamma b + beta (a bias is added where missing;
        a BN or LayerNorm without affine parameters gets them). Modifies the base in place."""
        base = self.base
        if isinstance(base, SSF | LoRALinear):
            base = base.merge()
        g, beta = self.scale, self.shift
        if isinstance(base, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm):
            affine = getattr(base, "affine", None)
            if affine is None:
                affine = getattr(base, "elementwise_affine", False)
            if not affine:
                raise TypeError(f"SSF.merge: {type(base).__name__} has no affine parameters")
            base.weight.mul_(g)
            if base.bias is None:
                raise TypeError(f"SSF.merge: {type(base).__name__} has no bias")
            base.bias.mul_(g).add_(beta)
            return base
        if isinstance(base, nn.Linear | nn.Conv2d):
            shape = [-1] + [1] * (base.weight.dim() - 1)
            base.weight.mul_(g.view(shape))
            if base.bias is None:
                base.bias = nn.Parameter(beta.clone(), requires_grad=False)
            else:
                base.bias.mul_(g).add_(beta)
            return base
        raise TypeError(f"SSF.merge: cannot fold into {type(base).__name__}")


class BottleneckAdapter(nn.Module):
    """up(relu(down(norm(x)))), down Kaiming-uniform (a = sqrt 5), up and all biases zero.

    ``conv``: 1x1 convolutions on [B, C, H, W] maps instead of linear layers on [..., C] tokens.
    ``norm='in'`` (tokens only) puts a LayerNorm(C) on the input (AdaptFormer's ``in`` option).
    Parameters: 2 C dim + dim + C (+ 2 C with the norm)."""

    def __init__(self, channels: int, dim: int, conv: bool = False, norm: str = "none", ref=None):
        super().__init__()
        kw: Dict[str, Any] = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        self.norm = nn.LayerNorm(channels, **kw) if norm == "in" else nn.Identity()
        if conv:
            self.down: nn.Module = nn.Conv2d(channels, dim, 1, **kw)
            self.up: nn.Module = nn.Conv2d(dim, channels, 1, **kw)
        else:
            self.down = nn.Linear(channels, dim, **kw)
            self.up = nn.Linear(dim, channels, **kw)
        for layer in (self.down, self.up):
            nn.init.zeros_(layer.bias)  # type: ignore[arg-type]
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(self.norm(x))))


class ParallelAdapter(nn.Module):
    """``base(x) + scale * adapter(x)`` (AdaptFormer's parallel adapter; around a transformer
    MLP or a CNN residual block whose input and output shapes are equal). The wrapped module
    keeps its keys under ``base.``."""

    def __init__(self, base: nn.Module, adapter: nn.Module, scale: float):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.adapter(x)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


# ------------------------------------------------------------------ frozen BN statistics
class _FrozenStats(nn.Module):
    """Mixin of a BN layer that stays in eval mode: running statistics neither used from the
    batch nor updated, whatever ``train()`` is asked."""

    def train(self, mode: bool = True) -> _FrozenStats:
        return super().train(False)


_FROZEN_CLASSES: Dict[type, type] = {}


def _frozen_class(cls: type) -> type:
    if issubclass(cls, _FrozenStats):
        return cls
    if cls not in _FROZEN_CLASSES:
        name = f"FrozenStats{cls.__name__}"
        new = type(name, (_FrozenStats, cls), {"__module__": __name__, "__qualname__": name})
        globals().setdefault(name, new)  # picklable by name
        _FROZEN_CLASSES[cls] = new
    return _FROZEN_CLASSES[cls]


def freeze_norm_stats(module: nn.Module) -> int:
    """Keep every BatchNorm layer of ``module`` in eval mode from now on (across
    ``model.train()``); returns how many. Parameters, buffers and keys are unchanged."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _FrozenStats):
            m.__class__ = _frozen_class(type(m))
            m.eval()
            n += 1
    return n


# ----------------------------------------------------------------------------- helpers
def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _linear_names(root: nn.Module) -> List[str]:
    return [n for n, m in root.named_modules() if isinstance(m, nn.Linear)]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _as_list(value: Union[str, Sequence[str]]) -> List[str]:
    return [value] if isinstance(value, str) else list(value)


def _norm_stats(model: nn.Module, norm_stats: str) -> None:
    if norm_stats == "frozen":
        freeze_norm_stats(model.backbone)  # type: ignore[arg-type]


def _backbone(model: nn.Module) -> nn.Module:
    return model.backbone  # type: ignore[return-value]


def _head(model: nn.Module) -> nn.Module:
    return model.head  # type: ignore[return-value]


# ----------------------------------------------------------------------------- tunings
@TUNINGS.register("full")
def full(model: nn.Module, /) -> None:
    """Fine-tune every backbone parameter (BN statistics train too)."""
    _backbone(model).requires_grad_(True)


@TUNINGS.register("linear_probe")
def linear_probe(model: nn.Module, /) -> None:
    """Train the head (and neck) only: the backbone frozen and in eval mode."""
    model.freeze_backbone()  # type: ignore[operator]


@TUNINGS.register("bitfit")
def bitfit(model: nn.Module, /, norm_stats: NormStats = "frozen") -> None:
    """Train the backbone's bias terms (linear, conv and norm biases) only (BitFit)."""
    for name, p in _backbone(model).named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(True)
    _norm_stats(model, norm_stats)


SSF_TYPES: Dict[str, Any] = {
    "Linear": (nn.Linear, -1),
    "Conv2d": (nn.Conv2d, 1),
    "LayerNorm": (nn.LayerNorm, -1),
    "BatchNorm2d": (nn.BatchNorm2d, 1),
}


@TUNINGS.register("ssf")
def ssf(
    model: nn.Module,
    /,
    targets: Union[str, Sequence[str]] = ("Linear", "Conv2d", "LayerNorm", "BatchNorm2d"),
    norm_stats: NormStats = "frozen",
) -> None:
    """Per-channel scale and shift after each linear, conv and norm layer of the backbone (SSF);
    ``targets`` restricts the layer types."""
    names = _as_list(targets)
    bad = [t for t in names if t not in SSF_TYPES]
    if bad or not names:
        raise ConfigError(
            f"'{_key('targets')}': {bad or names} is not a list of layer types; "
            f"use some of {', '.join(SSF_TYPES)}."
        )
    kinds = [SSF_TYPES[t] for t in names]
    root = _backbone(model)
    found: List[tuple] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if isinstance(child, SSF):
                continue
            # a LoRA-wrapped linear is one linear operation: scale after it, not inside
            probe = nn.Linear if isinstance(child, LoRALinear) else type(child)
            for cls, dim in kinds:
                if issubclass(probe, cls):
                    found.append((name, child, dim))
                    break
            else:
                walk(child, name + ".")

    walk(root, "")
    if not found:
        raise ConfigError(f"'{_key('targets')}': the backbone has no {', '.join(names)} layer.")
    for name, layer, dim in found:
        if isinstance(layer, LoRALinear | nn.Linear):
            channels = layer.out_features
        elif isinstance(layer, nn.Conv2d):
            channels = layer.out_channels
        elif isinstance(layer, nn.LayerNorm):
            channels = int(math.prod(layer.normalized_shape))
        else:
            channels = layer.num_features
        _replace(root, name, SSF(layer, channels, dim))
    _norm_stats(model, norm_stats)


@TUNINGS.register("lora")
def lora(
    model: nn.Module,
    /,
    rank: Annotated[int, Field(ge=1)] = 8,
    alpha: Optional[Annotated[float, Field(gt=0, allow_inf_nan=False)]] = None,
    targets: Union[str, Sequence[str]] = ("qkv",),
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0,
    norm_stats: NormStats = "frozen",
) -> None:
    """Low-rank updates (alpha / rank) B A on the backbone's linear layers whose names end with
    one of ``targets`` (e.g. qkv, proj, fc1, fc2) (LoRA)."""
    root = _backbone(model)
    names = _as_list(targets)
    linears = _linear_names(root)
    chosen: List[str] = []
    for t in names:
        hits = [n for n in linears if _matches(n, t) or _matches(n, t + ".base")]
        if not hits:
            shown = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ConfigError(
                f"'{_key('targets')}': no linear layer of the backbone is named {t!r}. "
                f"Its linear layers end with: {', '.join(shown) or 'none'}."
            )
        chosen += [n for n in hits if n not in chosen]
    for name in chosen:
        layer = root.get_submodule(name)
        parent_name = name.rpartition(".")[0]
        if parent_name and isinstance(root.get_submodule(parent_name), LoRALinear):
            continue  # already adapted
        _replace(
            root,
            name,
            LoRALinear(layer, rank, alpha, dropout, freeze_base=False),  # type: ignore[arg-type]
        )
    _norm_stats(model, norm_stats)


def _mlp_modules(root: nn.Module) -> List[str]:
    return [
        n
        for n, m in root.named_modules()
        if n.rsplit(".", 1)[-1] == "mlp" and not isinstance(m, ParallelAdapter)
    ]


@TUNINGS.register("adapter")
def adapter(
    model: nn.Module,
    /,
    dim: Annotated[int, Field(ge=1)] = 64,
    scale: Annotated[float, Field(allow_inf_nan=False)] = 0.1,
    norm: Literal["none", "in"] = "none",
    norm_stats: NormStats = "frozen",
) -> None:
    """Bottleneck adapters (AdaptFormer): mlp(x) + scale * up(relu(down(x))) around each
    transformer block's ``mlp``, or a parallel 1x1-conv bottleneck per residual block of a CNN
    with ``blocks()``."""
    root = _backbone(model)
    mlps = _mlp_modules(root)
    if mlps:
        for name in mlps:
            mlp = root.get_submodule(name)
            lin = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
            if not lin or lin[0].in_features != lin[-1].out_features:
                raise ConfigError(
                    f"adapter: {name} of the backbone is not a token MLP of equal input and "
                    "output width."
                )
            width = lin[0].in_features
            module = BottleneckAdapter(width, dim, norm=norm, ref=lin[0].weight)
            _replace(root, name, ParallelAdapter(mlp, module, scale))
    elif callable(getattr(root, "blocks", None)):
        if norm != "none":
            raise ConfigError(f"'{_key('norm')}': a CNN adapter takes no norm; use none.")
        index = {id(m): n for n, m in root.named_modules()}
        blocks = list(root.blocks())  # type: ignore[operator]
        if not blocks:
            raise ConfigError("adapter: the backbone's blocks() returned no block.")
        for block in blocks:
            convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
            if not convs or convs[0].in_channels != convs[-1].out_channels:
                raise ConfigError(
                    f"adapter: block {index.get(id(block), '?')} of the backbone does not keep "
                    "its channel count; blocks() must return blocks of equal input and output shape."
                )
            module = BottleneckAdapter(convs[0].in_channels, dim, conv=True, ref=convs[0].weight)
            _replace(root, index[id(block)], ParallelAdapter(block, module, scale))
    else:
        raise ConfigError(
            f"model.tuning=adapter needs a backbone with transformer blocks (modules named mlp, "
            f"a ViT) or residual blocks (a blocks() method); {type(root).__name__} has neither."
        )
    _norm_stats(model, norm_stats)


@TUNINGS.register("vpt")
def vpt(
    model: nn.Module,
    /,
    length: Annotated[int, Field(ge=1)] = 10,
    depth: Optional[Annotated[int, Field(ge=1)]] = None,
    deep: bool = False,
) -> None:
    """Visual prompt tuning: ``length`` learnable prompt tokens (in the first ``depth`` blocks
    when ``deep``); only parameters named ``*prompt*`` of the backbone train (VPT)."""
    root = _backbone(model)
    enable = getattr(root, "enable_prompts", None)
    if not callable(enable):
        raise ConfigError(
            "vpt needs a backbone with prompts (a ViT: model.backbone=vit_*); "
            f"{type(root).__name__} has no enable_prompts."
        )
    before = {id(p) for p in root.parameters()}
    enable(length, depth, deep)
    for name, p in root.named_parameters():
        if "prompt" in name:
            p.requires_grad_(True)
        elif id(p) not in before:
            p.requires_grad_(False)


# ----------------------------------------------------------------------------- applying
@dataclass
class TuningReport:
    """What :func:`apply_tuning` did: the tunings in order, their options, the parameter counts
    after it (:func:`parameter_counts`) and the modules it inserted (by type)."""

    tunings: List[str]
    params: Dict[str, Dict[str, Any]]
    counts: Dict[str, Any]
    inserted: Dict[str, int] = field(default_factory=dict)


def _inserted(model: nn.Module) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, LoRALinear | SSF | ParallelAdapter | _FrozenStats):
            k = "FrozenStatsBN" if isinstance(m, _FrozenStats) else type(m).__name__
            out[k] = out.get(k, 0) + 1
    return out


def _split_params(
    names: List[str], params: Optional[Dict[str, Any]], single: bool
) -> Dict[str, Dict[str, Any]]:
    params = dict(params or {})
    if single:
        return {names[0]: params}
    extra = sorted(set(params) - set(names))
    if extra:
        raise ConfigError(
            f"'model.tuning_params.{extra[0]}': with a list model.tuning the options are given "
            f"per tuning ({', '.join(f'model.tuning_params.{n}' for n in names)}); "
            f"{extra[0]!r} is not in model.tuning."
        )
    out = {}
    for n in names:
        opts = params.get(n) or {}
        if not isinstance(opts, dict):
            raise ConfigError(f"'model.tuning_params.{n}' must be a mapping of options.")
        out[n] = dict(opts)
    return out


def apply_tuning(
    model: nn.Module,
    tuning: Union[str, Sequence[str]] = "full",
    params: Optional[Dict[str, Any]] = None,
) -> TuningReport:
    """Apply ``tuning`` (a name, or a list applied in order) to a built Classifier in place.

    ``params``: the options of the tuning for a single name; for a list, one mapping per name
    (``{"vpt": {...}, "lora": {...}}``). Options are checked (names, types, ranges) before
    anything changes; errors name ``model.tuning_params.<key>``. The backbone is frozen first
    (except for a lone ``full``) and each tuning adds what it trains; head and neck are not
    touched (they train)."""
    single = isinstance(tuning, str)
    names = [tuning] if isinstance(tuning, str) else list(tuning)
    if not names:
        raise ConfigError("'model.tuning' is an empty list; name a tuning, e.g. full.")
    for n in names:
        if not isinstance(n, str) or n not in TUNINGS:
            raise ConfigError(
                f"'model.tuning': no tuning named {n!r}. Available: {', '.join(TUNINGS.names())}."
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"'model.tuning' names a tuning twice: {names}.")
    if len(names) > 1 and {"full", "linear_probe"} & set(names):
        raise ConfigError(
            f"'model.tuning': full and linear_probe are used alone, not in a list ({names})."
        )
    per = _split_params(names, params, single)
    for n in names:
        where = "model.tuning_params" if single else f"model.tuning_params.{n}"
        TUNINGS.check_kwargs(n, per[n], key_prefix=where + ".")
        TUNINGS.check_options(n, per[n], where)
    if names != ["full"]:
        _backbone(model).requires_grad_(False)
    for n in names:
        token = _WHERE.set("model.tuning_params" if single else f"model.tuning_params.{n}")
        try:
            TUNINGS.get(n)(model, **per[n])
        finally:
            _WHERE.reset(token)
    return TuningReport(names, per, parameter_counts(model), _inserted(model))


def merge_tuning(model: nn.Module) -> nn.Module:
    """Fold every LoRA and SSF module of ``model`` into the layer it wraps (for inference:
    the same function, plain layers); in place, returns ``model``. Adapters and prompts stay."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear | SSF):
            try:
                current = model.get_submodule(name)
            except AttributeError:
                continue  # inside a module merged already
            if current is m:
                _replace(model, name, m.merge())
    return model


# ----------------------------------------------------------------------------- optimiser
def _unique(params: Iterable[nn.Parameter]) -> List[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def parameter_counts(model: nn.Module) -> Dict[str, Any]:
    """Parameter counts (each tensor once): total, trainable, trainable_backbone, head (all
    the head's) and trainable_fraction."""
    params = _unique(model.parameters())
    backbone = {id(p) for p in _backbone(model).parameters()}
    head = _unique(_head(model).parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {
        "total": total,
        "trainable": trainable,
        "trainable_backbone": sum(
            p.numel() for p in params if p.requires_grad and id(p) in backbone
        ),
        "head": sum(p.numel() for p in head),
        "trainable_fraction": trainable / total if total else 0.0,
    }


# ----------------------------------------------------------------------------- LIFT head init
@torch.no_grad()
def class_mean_init(
    head: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    normalize_features: bool = True,
) -> torch.Tensor:
    """Set ``head.weight`` [C, D] to the class means of ``features`` [N, D] (labels [N] in
    0..C-1), LIFT's classifier initialisation (Shi et al. 2024).

    m_c = mean of the L2-normalised features of class c (raw features with
    ``normalize_features=False``, as LIFT's code averages); a normalised head (cosine) gets
    w_c = m_c / |m_c|, a linear head w_c = m_c and a zero bias. A class without samples keeps
    its weights. Returns the per-class counts [C] (long)."""
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"class_mean_init needs a head with a [C, D] weight, not {type(head).__name__}"
        )
    num_classes, dim = weight.shape
    if features.dim() != 2 or features.shape[1] != dim or labels.shape != (features.shape[0],):
        raise ValueError(
            f"class_mean_init: features [N, {dim}] and labels [N] expected, got "
            f"{list(features.shape)} and {list(labels.shape)}"
        )
    labels = labels.long().to(features.device)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"class_mean_init: labels outside 0..{num_classes - 1}")
    f = features.double()
    if normalize_features:
        f = F.normalize(f, dim=1)
    sums = torch.zeros(num_classes, dim, dtype=f.dtype, device=f.device).index_add_(0, labels, f)
    counts = torch.bincount(labels, minlength=num_classes)
    seen = counts > 0
    means = sums[seen] / counts[seen, None].to(f.dtype)
    if getattr(head, "normalized", False):
        means = F.normalize(means, dim=1)
    idx = seen.nonzero().squeeze(1).to(weight.device)
    weight[idx] = means.to(device=weight.device, dtype=weight.dtype)
    bias = getattr(head, "bias", None)
    if isinstance(bias, torch.Tensor) and not getattr(head, "normalized", False):
        bias[idx] = 0
    return counts.cpu()
