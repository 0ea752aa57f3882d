"""Typed run configuration: YAML files with ``_base_`` inheritance and dotted overrides.

``load_config(path, overrides)`` merges the base files, applies ``key=value`` overrides (values
parsed as YAML), validates the result with pydantic and rejects unknown keys by name.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from longtail.core.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _Open(BaseModel):
    """A section whose extra keys are the options of a registered component (checked at build)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    def params(self) -> Dict[str, Any]:
        return dict(self.model_extra or {})


class DataConfig(_Strict):
    dataset: str = "cifar10-lt"
    imbalance_factor: float = 100.0
    profile: Literal["exp", "step"] = "exp"
    subset_seed: int = 0                    # 0 = the LDAM-DRW subset every paper uses
    max_per_class: Optional[int] = None     # debugging cap on training images per class
    max_test_per_class: Optional[int] = None
    val_per_class: int = 200                # balanced held-out split from unused training images
    meta_per_class: int = 0                 # balanced meta set (meta-learning methods); 0 = none
    meta_from: Literal["unused", "before_subset"] = "unused"  # longtail/data/meta.py
    sampler: str = "instance"
    sampler_params: Dict[str, Any] = Field(default_factory=dict)
    crop_padding: int = 4                   # random crop with zero padding; 0 disables
    flip: bool = True                       # random horizontal flip
    # residual set: drop these classes' images from the TRAINING set only ("largest": argmax n_c;
    # a list of class ids); val / test and the class counts (losses, shot groups) stay whole
    exclude_classes: Union[Literal["largest"], List[int], None] = None


class ModelConfig(_Strict):
    backbone: str = "resnet32"
    backbone_params: Dict[str, Any] = Field(default_factory=dict)
    neck: str = "identity"
    neck_params: Dict[str, Any] = Field(default_factory=dict)
    head: str = "linear"
    head_params: Dict[str, Any] = Field(default_factory=dict)


class LossConfig(_Open):
    name: str = "ce"


class MLRSNetOptions(_Strict):
    """``optim.mlrsnet.*``: the learned schedule of ``optim.schedule=mlrsnet``
    (longtail/optim/mlrsnet.py)."""

    mode: Optional[Literal["meta_train", "transfer"]] = None  # None: transfer iff checkpoint
    checkpoint: Optional[str] = None        # mlrsnet.safetensors (or its run folder) for transfer
    hidden: int = Field(50, ge=1)           # width of the LSTM-style cell
    meta_every: int = Field(300, ge=1)      # meta_train: one update of the net every N steps
    meta_batch_size: int = Field(128, ge=1)  # meta images per update (global, split over ranks)
    meta_lr: float = Field(1e-3, gt=0.0)    # Adam on the net's weights
    meta_weight_decay: float = Field(1e-4, ge=0.0)
    gamma: Optional[float] = Field(None, gt=0.0)  # fixed lr scale instead of the initial-loss rule
    gamma_images: Optional[int] = Field(None, ge=1)  # training images for that loss (None: all)


class OptimConfig(_Strict):
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    schedule: str = "step"                  # step | cosine | constant | mlrsnet
    warmup_epochs: float = 5.0
    milestones: List[int] = Field(default_factory=lambda: [160, 180])
    gamma: float = 0.01                     # step factor at each milestone (0.01, then 1e-4)
    min_lr: float = 0.0                     # cosine floor
    grad_clip: Optional[float] = None       # max global grad norm
    # sam / rsam (longtail/optim/sam.py): wrappers around base_optimizer, driven by the step closure
    base_optimizer: str = "sgd"             # the optimiser sam / rsam wrap (a registered name)
    rho: float = Field(0.05, ge=0.0)        # neighbourhood radius (SAM |e|; RSAM noise scale)
    sam_adaptive: bool = False              # sam: ASAM scaling, e = rho w^2 g / | |w| g |
    rsam_dis_mul: float = Field(0.1, ge=0.0)  # rsam: GNM-PT's dis_mul (noise x rho x dis_mul)
    rsam_decay_epoch: Optional[int] = Field(None, ge=1)  # rsam: noise x0.5 from this 0-based
    #                                         epoch on (GNM-PT reweight_epoch + 1); None: loss.drw_epoch
    rsam_fix_epoch0_quirk: bool = False     # rsam: factor 1 at epoch 0 (GNM-PT's formula gives 2)
    mlrsnet: MLRSNetOptions = Field(default_factory=MLRSNetOptions)  # schedule: mlrsnet


class TrainConfig(_Strict):
    epochs: int = 200
    batch_size: int = 128                   # global batch, split over DDP ranks
    drop_last: bool = False
    eval_every: int = 0                     # evaluate every N epochs (0: only at the end)
    eval_batch_size: int = 512
    amp: Literal["none", "bf16", "fp16"] = "none"
    device: str = "auto"                    # auto | cpu | cuda | cuda:N
    channels_last: bool = True             # NHWC: ~1.3x faster ResNet-32 training on CPU (benchmarks)
    compile: bool = False
    num_threads: Optional[int] = None       # torch intra-op threads (None: torch default)
    progress: bool = True
    checkpoint_every: int = 1               # epochs between resumable checkpoints


class MethodConfig(_Open):
    name: str = "erm"


class StageConfig(_Strict):
    """One stage of a multi-stage config (``stages:``; see :mod:`longtail.engine.pipeline`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")   # its folder: RUN_DIR/<name>/
    config: Optional[str] = None            # a YAML file merged on top of the pipeline's settings
    overrides: Dict[str, Any] = Field(default_factory=dict)   # {dotted.key: value} or sections
    lr_scale: Optional[float] = Field(default=None, gt=0)      # optim.lr = x * the pipeline's
    epochs_scale: Optional[float] = Field(default=None, gt=0)  # epochs = x * the pipeline's


class Config(_Strict):
    seed: int = 0
    stage1: Optional[str] = None            # run folder of a previous stage (decoupled, ...)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    stages: Optional[List[StageConfig]] = None   # a pipeline: `longtail train` runs them in order

    def to_dict(self) -> Dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# loading


def deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (dicts merge, everything else replaces)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist. Pass the path of a YAML file such as "
                          f"configs/cifar10_lt/ce.yaml.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {path} is not valid YAML: {err}. Fix the syntax.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of keys, not {type(data).__name__}.")
    return data


def load_yaml_tree(path: Path, _seen: Sequence[Path] = ()) -> Dict[str, Any]:
    """Read a YAML config and merge its ``_base_`` files (paths relative to it), bases first."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"Config {path} inherits from itself through _base_.")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: Dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml_tree(path.parent / base, (*_seen, path)))
    return deep_merge(merged, data)


_MISSING = object()


def get_dotted(tree: Dict[str, Any], dotted: str, default: Any = None) -> Any:
    """``tree["a"]["b"]`` for ``"a.b"``; ``default`` where a part is missing."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def has_dotted(tree: Dict[str, Any], dotted: str) -> bool:
    return get_dotted(tree, dotted, _MISSING) is not _MISSING


def apply_overrides(tree: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (``1e-3``, ``[1, 2]``, ``null``)."""
    tree = dict(tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} is not of the form key=value (e.g. train.epochs=2).")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"Override key {key!r} is malformed; use dotted names like optim.lr=0.05.")
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"Override {key!r}: '{'.'.join(parts[:i + 1])}' is a value, not a section.")
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = value
    return tree


def _suggest(loc: Sequence[Any]) -> str:
    """'did you mean' for an unknown key, from the fields of the section it sits in."""
    model: Any = Config
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        model = field.annotation
    names = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return f" Did you mean '{'.'.join(map(str, (*loc[:-1], close[0])))}'?" if close else ""


def validate(tree: Dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                lines.append(f"unknown key '{key}'.{_suggest(e['loc'])}")
            else:
                lines.append(f"'{key}': {e['msg']} (got {e.get('input')!r}).")
        raise ConfigError(f"Invalid {source}: " + "; ".join(lines) +
                          " Fix the key in the YAML file or the key=value override.") from None


def load_config(path: Optional[str | Path], overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (with _base_ inheritance), apply overrides, validate."""
    tree = load_yaml_tree(Path(path)) if path is not None else {}
    tree = apply_overrides(tree, overrides)
    return validate(tree, source=f"config {path}" if path else "config")
