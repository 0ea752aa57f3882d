"""Feature modulation for MFM (Meta Feature Modulator, Wang et al., arXiv 2008.03428, 2020).

h̃_l = γ_l ⊙ h_l + β_l per channel (FiLM-style, broadcast over H x W) on the output of backbone
stages, through forward hooks (:class:`StageModulation`, switched per call with ``active``).
Variants ([PROPOSED], our reading): ``direct`` (free γ_l, β_l) and ``network`` (an MLP from
GAP(h_l), γ_l = 1 + tanh(Δγ_l)); both exactly the identity at initialisation. Saved as
``modulator.safetensors`` with its metadata (:func:`save_modulator`, :func:`load_modulator`).
Details: docs/methods/meta.md.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from longtail.core.errors import ConfigError, LongtailError
from longtail.core.io import save_weights

VARIANTS = ("direct", "network")
FORMAT = "longtail-modulator"


class DirectModulation(nn.Module):
    """Free per-channel γ (init 1) and β (init 0): [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma.to(h.dtype).view(1, -1, 1, 1)
        beta = self.beta.to(h.dtype).view(1, -1, 1, 1)
        return h * gamma + beta


class ModulatorNet(nn.Module):
    """u = GAP(h) -> Linear(C, C/r) -> ReLU -> Linear(C/r, 2C) -> (Δγ, β); γ = 1 + tanh(Δγ).

    The last layer is zero-initialised (weights and bias): identity at the start.
    Shapes: h [B, C, H, W] -> [B, C, H, W] (per-sample γ, β of shape [B, C]).
    """

    def __init__(self, channels: int, hidden_ratio: int = 4):
        super().__init__()
        hidden = max(channels // hidden_ratio, 1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, 2 * channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def params_for(self, h: torch.Tensor):
        """(γ, β), each [B, C], from the pooled features of ``h``."""
        u = F.adaptive_avg_pool2d(h, 1).flatten(1)
        out = self.fc2(F.relu(self.fc1(u.to(self.fc1.weight.dtype))))
        dgamma, beta = out.chunk(2, dim=1)
        return 1.0 + torch.tanh(dgamma), beta

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.params_for(h)
        return h * gamma.to(h.dtype)[:, :, None, None] + beta.to(h.dtype)[:, :, None, None]


class FeatureModulator(nn.Module):
    """One modulation per modulated stage (``stages``: indices into the backbone's stages).

    Parameters are named ``mods.<i>.*`` (i: position in ``stages``). ``forward(i, h)`` modulates
    the output ``h`` of the i-th modulated stage.
    """

    def __init__(
        self,
        channels: Sequence[int],
        stages: Sequence[int],
        variant: str = "network",
        hidden_ratio: int = 4,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"method.variant={variant!r}: use one of {', '.join(VARIANTS)}.")
        if len(channels) != len(stages):
            raise ValueError("one channel count per modulated stage")
        self.variant = variant
        self.stages = [int(s) for s in stages]
        self.channels = [int(c) for c in channels]
        self.hidden_ratio = int(hidden_ratio)
        if variant == "direct":
            self.mods = nn.ModuleList(DirectModulation(c) for c in self.channels)
        else:
            self.mods = nn.ModuleList(ModulatorNet(c, hidden_ratio) for c in self.channels)

    def forward(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.mods[i](h)

    def metadata(self) -> Dict[str, str]:
        return {
            "format": FORMAT,
            "variant": self.variant,
            "stages": json.dumps(self.stages),
            "channels": json.dumps(self.channels),
            "hidden_ratio": str(self.hidden_ratio),
        }


def backbone_stages(backbone: nn.Module) -> tuple[List[nn.Module], List[int]]:
    """The stages of ``backbone`` and their output channels; ConfigError if it exposes none."""
    stages = getattr(backbone, "stages", None)
    channels = getattr(backbone, "stage_channels", None)
    if stages is None or channels is None or len(list(stages)) != len(list(channels)):
        raise ConfigError(
            f"Feature modulation needs a backbone that exposes `stages` and "
            f"`stage_channels` (the CIFAR ResNets do); {type(backbone).__name__} does "
            f"not. Use model.backbone=resnet32 (or resnet20 / resnet8)."
        )
    return list(stages), [int(c) for c in channels]


def resolve_stages(requested: Optional[Sequence[int]], num_stages: int) -> List[int]:
    """``None`` -> every stage; otherwise validated, sorted, unique indices (negatives allowed)."""
    if requested is None:
        return list(range(num_stages))
    out = []
    for s in requested:
        if not isinstance(s, int) or isinstance(s, bool) or not -num_stages <= s < num_stages:
            raise ConfigError(
                f"method.stages has {s!r}; the backbone has {num_stages} stages "
                f"(indices 0..{num_stages - 1})."
            )
        out.append(s % num_stages)
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"method.stages={list(requested)} must list distinct stage indices.")
    return sorted(out)


class StageModulation:
    """Forward hooks that pass the chosen stages' outputs through a :class:`FeatureModulator`.

    Whether a forward pass is modulated: inside ``with mod.active(flag):`` it is ``flag``;
    outside any such block (evaluation, other code) it is ``default`` (MFM: ``modulate_at_test``).
    """

    def __init__(self, backbone: nn.Module, modulator: FeatureModulator, default: bool = False):
        stages, _ = backbone_stages(backbone)
        self.modulator = modulator
        self.default = bool(default)
        self._flag: Optional[bool] = None
        self._handles = [
            stages[s].register_forward_hook(self._hook(i)) for i, s in enumerate(modulator.stages)
        ]

    def _hook(self, i: int):
        def hook(module: nn.Module, inputs, output: torch.Tensor):
            on = self.default if self._flag is None else self._flag
            return self.modulator(i, output) if on else None

        return hook

    @contextlib.contextmanager
    def active(self, flag: bool) -> Iterator[None]:
        previous, self._flag = self._flag, bool(flag)
        try:
            yield
        finally:
            self._flag = previous

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def build_modulator(
    backbone: nn.Module,
    variant: str = "network",
    stages: Optional[Sequence[int]] = None,
    hidden_ratio: int = 4,
) -> FeatureModulator:
    """A :class:`FeatureModulator` fitting ``backbone`` (all stages by default)."""
    all_stages, channels = backbone_stages(backbone)
    chosen = resolve_stages(stages, len(all_stages))
    return FeatureModulator([channels[s] for s in chosen], chosen, variant, hidden_ratio)


def save_modulator(path: Path, modulator: FeatureModulator) -> None:
    save_weights(Path(path), modulator.state_dict(), modulator.metadata())


def load_modulator(
    path: Path, backbone: nn.Module, key: str = "method.modulator"
) -> FeatureModulator:
    """Rebuild a saved modulator and check that it fits ``backbone``'s stages (LongtailError
    naming ``key`` otherwise)."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        path = path / "modulator.safetensors"
    if not path.is_file():
        raise LongtailError(
            f"{key}={path}: no such file. Pass the modulator.safetensors of a finished "
            f"MFM run (or its run folder)."
        )
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:
        raise LongtailError(f"{key}={path} cannot be read ({err}).") from None
    if meta.get("format") != FORMAT:
        raise LongtailError(
            f"{key}={path} is not a modulator written by MFM (format "
            f"{meta.get('format')!r}). Pass RUN_DIR/modulator.safetensors."
        )
    variant, stages = meta["variant"], json.loads(meta["stages"])
    channels, hidden_ratio = json.loads(meta["channels"]), int(meta["hidden_ratio"])
    all_stages, mine = backbone_stages(backbone)
    fits = all(0 <= s < len(mine) and mine[s] == c for s, c in zip(stages, channels))
    if not fits:
        raise LongtailError(
            f"{key}={path} modulates stages {stages} with {channels} channels, but "
            f"this model's stages have {mine} channels. Use a backbone with the "
            f"same stage widths."
        )
    modulator = FeatureModulator(channels, stages, variant, hidden_ratio)
    modulator.load_state_dict(tensors)
    return modulator
