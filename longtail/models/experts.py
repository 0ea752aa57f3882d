"""Multi-expert classifier with instance-aware routing: the [PROPOSED] reading of the MoE of Zhao,
Chen, Tan, Huang, Zhu, "Improving Long-Tailed Classification from Instance Level" (arXiv 2104.06094
v1; v2 / AAAI 2022 keeps only the ALA loss). Shapes, with h = backbone.forward_map(x) [B, C', H', W']
the shared trunk (the backbone without its last stage):

    f_e = neck(GAP(stage_e(h))) [B, D],  z_e = head_e(f_e) [B, C],  e = 1..E
    r(x) = softmax(W2 relu(W1 GAP(h) + b1) + b2) [B, E]  (rows sum to 1)
    logits = sum_e r_e z_e [B, C],  features = sum_e r_e f_e [B, D]

Discussion, options and the compute report: docs/methods/experts.md.
"""

from __future__ import annotations

import copy
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from longtail.core.errors import ConfigError
from longtail.models.classifier import Classifier, ModelOutput
from longtail.models.registry import BACKBONES

#: ``model.expert_params`` keys and their defaults
EXPERT_DEFAULTS: Dict[str, Any] = {"router_hidden": 32}


def expert_options(params: Dict[str, Any]) -> Dict[str, Any]:
    """Validated ``model.expert_params`` (ConfigError naming the key), defaults filled in."""
    unknown = sorted(set(params) - set(EXPERT_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"unknown key 'model.expert_params.{unknown[0]}'. The keys of model.expert_params: "
            f"{', '.join(sorted(EXPERT_DEFAULTS))}."
        )
    out = {**EXPERT_DEFAULTS, **params}
    hidden = out["router_hidden"]
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ConfigError(
            f"'model.expert_params.router_hidden' must be an integer >= 1 (the router MLP's "
            f"hidden width), got {hidden!r}."
        )
    return out


def supporting_backbones() -> List[str]:
    """The registered backbones whose builder returns a module with ``pop_last_stage``."""
    names = []
    for name in BACKBONES.names():
        try:
            returned = typing.get_type_hints(BACKBONES.get(name)).get("return")
        except Exception:  # noqa: BLE001 - a builder whose hints do not resolve: not listed
            continue
        if isinstance(returned, type) and hasattr(returned, "pop_last_stage"):
            names.append(name)
    return names


class ExpertHeads(nn.ModuleList):
    """The E heads of a :class:`MultiExpertClassifier` (``model.head``): parameter counts and the
    head checks of the engine see all of them; ``normalized`` is the first head's."""

    @property
    def normalized(self) -> bool:
        return bool(getattr(self[0], "normalized", False))


class Router(nn.Module):
    """Instance-aware router: pooled shared features [B, C'] -> expert weights [B, E] (softmax)."""

    def __init__(self, in_features: int, num_experts: int, hidden: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_experts)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.fc2(F.relu(self.fc1(pooled))), dim=1)


class MultiExpertClassifier(Classifier):
    """Shared trunk (``backbone``, last stage popped), E expert stages (``experts``), the shared
    ``neck``, E heads (``head``, an :class:`ExpertHeads`) and the ``router``.

    ``forward`` returns ``ModelOutput(logits [B, C], features [B, D], extras)`` with extras
    ``expert_logits`` [B, E, C] and ``router_weights`` [B, E]."""

    head: ExpertHeads

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        heads: Sequence[nn.Module],
        experts: Sequence[nn.Module],
        router: Router,
        input_size: Optional[int] = None,
    ):
        if len(heads) != len(experts) or len(experts) < 2:
            raise ValueError(
                f"need E >= 2 experts and as many heads, got {len(experts)}, {len(heads)}"
            )
        super().__init__(backbone, neck, ExpertHeads(heads), input_size=input_size)
        self.experts = nn.ModuleList(experts)
        self.router = router

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    # -- parts -----------------------------------------------------------------------------------
    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> the shared trunk's feature map [B, C', H', W']."""
        return self.backbone.forward_map(self.resize_input(x))  # type: ignore[operator]

    def expert_features(self, shared: torch.Tensor, e: int) -> torch.Tensor:
        """Shared map -> expert ``e``'s classifier input [B, D]."""
        pooled = F.adaptive_avg_pool2d(self.experts[e](shared), 1).flatten(1)
        return self.neck(pooled)

    def route(self, shared: torch.Tensor) -> torch.Tensor:
        """Shared map -> router weights [B, E]."""
        return self.router(F.adaptive_avg_pool2d(shared, 1).flatten(1))

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> ModelOutput:
        shared = self.forward_shared(x)
        weights = self.route(shared)
        feats = [self.expert_features(shared, e) for e in range(self.num_experts)]
        logits = torch.stack([head(f) for head, f in zip(self.head, feats)], dim=1)  # [B, E, C]
        w = weights.to(logits.dtype)
        fused = (w[:, :, None] * logits).sum(1)
        features = (w[:, :, None] * torch.stack(feats, dim=1).to(logits.dtype)).sum(1)
        return ModelOutput(fused, features, {"expert_logits": logits, "router_weights": weights})

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> the router-weighted expert features [B, D] (as ``forward``)."""
        return self.forward(x).features

    def forward_expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e`` alone (trunk, its stage and head; no router): logits [B, C]."""
        return self.head[e](self.expert_features(self.forward_shared(x), e))

    # -- decoupled training ----------------------------------------------------------------------
    def freeze_backbone(self) -> None:
        """Freeze everything before the heads: the trunk, the expert stages and the router."""
        super().freeze_backbone()
        for part in (self.experts, self.router):
            part.requires_grad_(False)
            part.eval()

    def train(self, mode: bool = True) -> "MultiExpertClassifier":
        super().train(mode)
        if getattr(self, "_backbone_frozen", False):
            self.experts.eval()
            self.router.eval()
        return self


def _reinitialised(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every ``reset_parameters`` called (a fallback init)."""
    fresh = copy.deepcopy(module)
    for m in fresh.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return fresh


def to_multi_expert(
    model: Classifier,
    num_experts: int,
    *,
    router_hidden: int = 32,
    new_stage: Optional[Callable[[], nn.Module]] = None,
    new_head: Optional[Callable[[], nn.Module]] = None,
    backbone_name: Optional[str] = None,
) -> MultiExpertClassifier:
    """Turn a built single-path Classifier into a :class:`MultiExpertClassifier` of E experts.

    The backbone's last stage becomes expert 0 and its head head 0; experts (heads) 1..E-1 come
    from ``new_stage()`` (``new_head()``), e.g. the last stage of a freshly built backbone (its
    own random init, or the same pretrained weights), or else from deep copies re-initialised
    with their modules' ``reset_parameters``."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 2:
        raise ConfigError(f"'model.experts' must be an integer >= 2 here, got {num_experts!r}.")
    backbone = model.backbone
    if not callable(getattr(backbone, "pop_last_stage", None)):
        name = backbone_name or type(backbone).__name__
        raise ConfigError(
            f"model.experts={num_experts} copies the backbone's last stage per expert, but "
            f"model.backbone={name} has no stage to split off (no pop_last_stage). Use one of "
            f"{', '.join(supporting_backbones())}, or set model.experts=1."
        )
    stage0 = backbone.pop_last_stage()  # type: ignore[operator]
    stages = [stage0] + [
        new_stage() if new_stage is not None else _reinitialised(stage0)
        for _ in range(num_experts - 1)
    ]
    head0 = model.head
    heads = [head0] + [
        new_head() if new_head is not None else _reinitialised(head0)
        for _ in range(num_experts - 1)
    ]
    router = Router(int(backbone.num_features), num_experts, router_hidden)  # type: ignore[arg-type]
    return MultiExpertClassifier(
        backbone, model.neck, heads, stages, router, input_size=model.input_size
    )


# ------------------------------------------------------------------------------------------------
# compute cost


def count_flops(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> int:
    """FLOPs of ``fn(x)`` as torch.utils.flop_counter counts them (2 per multiply-add of the
    matrix products and convolutions; element-wise work is not counted)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(x)
    return int(counter.get_total_flops())


def _params(modules: Sequence[nn.Module]) -> int:
    return sum({id(p): p.numel() for m in modules for p in m.parameters()}.values())


def compute_cost(model: MultiExpertClassifier, input_shape: Tuple[int, ...]) -> Dict[str, Any]:
    """Parameters and FLOPs per image of the MoE and of the single model it extends (trunk, expert
    0 and head 0: one expert, no router), on one input of ``input_shape`` = (C, H, W)."""
    device = next(model.parameters()).device
    x = torch.zeros(1, *input_shape, device=device)
    was_training = model.training
    model.eval()
    try:
        flops = count_flops(model, x)
        single_flops = count_flops(lambda t: model.forward_expert(t, 0), x)
    finally:
        model.train(was_training)
    params = _params([model])
    single = _params([model.backbone, model.neck, model.experts[0], model.head[0]])
    return {
        "num_experts": model.num_experts,
        "input_shape": list(input_shape),
        "params": params,
        "flops_per_image": flops,
        "single_params": single,
        "single_flops_per_image": single_flops,
        "ratio": flops / single_flops if single_flops else None,
        "params_ratio": params / single if single else None,
    }


__all__ = [
    "ExpertHeads",
    "MultiExpertClassifier",
    "Router",
    "compute_cost",
    "count_flops",
    "expert_options",
    "supporting_backbones",
    "to_multi_expert",
]
