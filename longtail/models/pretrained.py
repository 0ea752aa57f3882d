"""Pretrained weights read by path: ``.pth`` / ``.pt`` / ``.bin`` (``torch.load(weights_only=True)``)
or ``.safetensors``, unwrapped from training checkpoints, wrapper prefixes stripped, classifier keys
dropped, and every other key matched by name and shape (errors name the first mismatches).
Nothing is downloaded. Shared by every pretrained backbone (ResNets, MobileNetV2,
EfficientNet-Lite, ViT).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple, Union

import torch
import torch.nn as nn

from longtail.core.errors import ConfigError, LongtailError
from longtail.core.io import load_weights

_KEY = "model.backbone_params."
SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# wrappers whose prefix a checkpoint's keys may carry: DDP / DataParallel, Lightning-style
# modules, a longtail Classifier (or any model holding the net as .backbone), torch.compile
WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "_orig_mod.")
# classifier weights: torchvision's / timm's fc, a longtail Classifier's head (re-initialised)
CLASSIFIER_PREFIXES = ("fc.", "head.")
# training checkpoints that hold the state dict under one of these keys
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "net")


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_state(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` / ``.pt`` / ``.bin`` (``torch.load(weights_only=True)``) or
    ``.safetensors`` file, unwrapped from a training checkpoint's ``state_dict`` / ``model``
    entry; LongtailError naming the file and the fix. Nothing is downloaded."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LongtailError(
            f"No pretrained weights at {path.absolute()} ({_KEY}pretrained). longtail downloads "
            f"nothing: "
            f"save the state dict there yourself, e.g. where torchvision is installed "
            f"`torch.save(torchvision.models.resnet50(weights='IMAGENET1K_V1').state_dict(), "
            f"'resnet50.pth')`, or take timm's model.safetensors (e.g. timm/resnet50.a1_in1k on "
            f"the Hugging Face hub), then give its path."
        )
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise LongtailError(
            f"{path}: pretrained weights are read from {', '.join(SUFFIXES)} files; "
            f"rename it or save the state dict as one of them."
        )
    try:
        if suffix == ".safetensors":
            obj: Any = load_weights(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, or a pickle of objects other than tensors
        hint = (
            ""
            if suffix == ".safetensors"
            else " It is read with torch.load(weights_only=True), which refuses pickled objects "
            "(e.g. a whole saved model): save `model.state_dict()` instead."
        )
        raise LongtailError(
            f"{path} cannot be read as pretrained weights ({_first_line(err)}).{hint}"
        ) from None
    for _ in range(3):  # {"state_dict": {...}}, {"model": {...}}, possibly nested
        if _is_state(obj) or not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not _is_state(obj):
        what = (
            f"a {type(obj).__name__}"
            if not isinstance(obj, Mapping)
            else f"a mapping with keys {', '.join(map(str, list(obj)[:6]))}"
        )
        raise LongtailError(
            f"{path} holds {what}, not a state dict of tensors. Save `model.state_dict()` "
            f"(or a checkpoint with it under 'state_dict' or 'model')."
        )
    return dict(obj)


def strip_prefixes(key: str) -> str:
    """``key`` without its leading wrapper prefixes (``module.``, ``model.``, ``backbone.``,
    ``_orig_mod.``, in any order and number): ``module.backbone.conv1.weight`` -> ``conv1.weight``."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def check_common(in_chans: object, pretrained: object) -> None:
    """ConfigError naming ``in_chans`` or ``pretrained`` (the options every CNN backbone takes)
    where either is malformed."""
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ConfigError(f"'{_KEY}in_chans' must be a positive integer, got {in_chans!r}.")
    if pretrained is not None and (
        not isinstance(pretrained, (str, os.PathLike)) or not str(pretrained).strip()
    ):
        raise ConfigError(
            f"'{_KEY}pretrained' must be the path of a {' / '.join(SUFFIXES)} file (or null), "
            f"got {pretrained!r}."
        )


def backbone_weights(
    state: Mapping[str, torch.Tensor], classifier_prefixes: Tuple[str, ...], path: Any
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """``state`` with wrapper prefixes stripped and classifier keys (``classifier_prefixes``)
    left out; returns the weights and the dropped keys. Two keys that become one: LongtailError."""
    weights: Dict[str, torch.Tensor] = {}
    dropped: List[str] = []
    for key, value in state.items():
        name = strip_prefixes(key)
        if name.startswith(classifier_prefixes):
            dropped.append(key)
            continue
        if name in weights:
            raise LongtailError(
                f"{path}: two keys become {name!r} once their prefixes are stripped; "
                f"save the backbone's own state dict."
            )
        weights[name] = value
    return weights, dropped


def check_fit(
    own: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    path: Any,
    arch: str,
    advice: str,
) -> None:
    """LongtailError naming the first missing, unexpected and mis-shaped keys of ``weights``
    against the model's ``own`` state dict (``advice``: what to do about it)."""
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first: {', '.join(missing[:4])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:4])})")
    if shapes:
        shown = ", ".join(
            f"{k}: file {list(weights[k].shape)}, {arch} {list(own[k].shape)}" for k in shapes[:2]
        )
        parts.append(f"{len(shapes)} of another shape ({shown})")
    raise LongtailError(
        f"The weights in {path} do not fit backbone {arch}: {'; '.join(parts)}. The file holds "
        f"another architecture or naming: {advice}"
    )


def load_pretrained(
    backbone: nn.Module,
    path: Union[str, os.PathLike],
    classifier_prefixes: Tuple[str, ...] = CLASSIFIER_PREFIXES,
    stem_key: str = "conv1.weight",
) -> List[str]:
    """Load a torchvision / timm (or longtail) checkpoint at ``path`` into ``backbone``.

    Wrapper prefixes are stripped (:func:`strip_prefixes`) and classifier keys (``fc.*``,
    ``head.*``) dropped; every other key must match: LongtailError naming the first missing,
    unexpected and mis-shaped keys. Two leniencies: BN ``num_batches_tracked`` may be missing
    (files saved before PyTorch 0.4.1), and RGB ``conv1`` weights go into a 1-channel stem
    summed over their input channels (a 1-channel input x then gives what the RGB net gives
    for x repeated in three channels). Returns the dropped classifier keys.
    """
    state = read_state_dict(path)
    arch = getattr(backbone, "arch", type(backbone).__name__)
    own = backbone.state_dict()
    weights, dropped = backbone_weights(state, classifier_prefixes, path)
    stem = weights.get(stem_key)
    if (
        stem is not None
        and stem_key in own
        and stem.dim() == 4
        and stem.shape[1] == 3
        and own[stem_key].shape[1] == 1
        and stem.shape[0] == own[stem_key].shape[0]
    ):
        weights[stem_key] = stem.float().sum(1, keepdim=True)
    for key in own:
        if key.endswith("num_batches_tracked") and key not in weights:
            weights[key] = own[key]
    check_fit(
        own,
        weights,
        path,
        arch,
        f"choose the matching model.backbone (torchvision's or timm's resnet50 weights go with "
        f"model.backbone=resnet50); only classifier keys "
        f"({', '.join(p + '*' for p in classifier_prefixes)}) are ignored.",
    )
    backbone.load_state_dict(weights)
    return dropped
