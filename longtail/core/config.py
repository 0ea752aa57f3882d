"""Typed run configuration: YAML files with ``_base_`` inheritance and dotted overrides.

``load_config(path, overrides)`` merges the base files, applies ``key=value`` overrides (values
parsed as YAML), validates the result with pydantic and rejects unknown keys by name.
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Sequence, Tuple, Type, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
    imbalance_factor: Annotated[float, Field(ge=1.0, allow_inf_nan=False)] = 100.0
    profile: Literal["exp", "step"] = "exp"
    subset_seed: Annotated[int, Field(ge=0)] = 0  # 0 = the LDAM-DRW subset every paper uses
    max_per_class: Optional[Annotated[int, Field(ge=1)]] = None  # debugging cap a class
    max_test_per_class: Optional[Annotated[int, Field(ge=1)]] = None
    val_per_class: Annotated[int, Field(ge=0)] = 200  # balanced held-out split (unused images)
    meta_per_class: Annotated[int, Field(ge=0)] = 0  # balanced meta set (meta methods); 0: none
    meta_from: Literal["unused", "before_subset"] = "unused"  # longtail/data/meta.py
    crop_padding: Annotated[int, Field(ge=0, le=64)] = 4  # random crop, zero padding; 0: off
    flip: bool = True  # random horizontal flip
    # residual set: drop these classes' images from the TRAINING set only ("largest": argmax n_c;
    # a list of class ids); val / test and the class counts (losses, shot groups) stay whole
    exclude_classes: Union[Literal["largest"], List[int], None] = None
    # datasets from files (longtail/data/sources.py, docs/data.md): the folder of the split files
    # (default: the data root), a test tree for a folder dataset, the per-sample pipelines run by
    # the loader's workers (longtail/data/transforms.py; None: decoded pixels, augmented on the
    # device by crop_padding / flip), workers, JPEG draft size, and whether to decode the whole set
    # into memory once (None: when untransformed, of one size and under 2 GiB)
    split_dir: Optional[str] = None
    split_file: Optional[str] = None  # a folder dataset listed by split files (paths relative
    val_file: Optional[str] = None  # to its folder) instead of a scan / a seeded val split
    test_file: Optional[str] = None
    test_root: Optional[str] = None
    transform: Optional[str] = None
    transform_params: Dict[str, Any] = Field(default_factory=dict)
    eval_transform: Optional[str] = None
    eval_transform_params: Dict[str, Any] = Field(default_factory=dict)
    num_workers: Annotated[int, Field(ge=0)] = 2
    decode_draft: Optional[Annotated[int, Field(ge=8)]] = None
    in_memory: Optional[bool] = None
    # normalisation (default: the built-in set's own; ImageNet's for a file dataset), e.g. a
    # pretrained backbone's statistics on CIFAR
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None


class ModelConfig(_Strict):
    backbone: str = "resnet32"
    backbone_params: Dict[str, Any] = Field(default_factory=dict)
    neck: str = "identity"
    neck_params: Dict[str, Any] = Field(default_factory=dict)
    head: str = "linear"
    head_params: Dict[str, Any] = Field(default_factory=dict)
    # parameter-efficient tuning (longtail/models/peft.py): a name or a list applied in order
    # (full, linear_probe, bitfit, ssf, lora, adapter, vpt) and its options (per name for a list)
    tuning: Union[str, List[str]] = "full"
    tuning_params: Dict[str, Any] = Field(default_factory=dict)
    # inputs resized (bilinear, on the device) to this side before the backbone, e.g. a
    # pretrained backbone on 32-px images; None: as the data gives them
    input_size: Optional[Annotated[int, Field(ge=8, le=1024)]] = None
    # multi-expert model (longtail/models/experts.py): E > 1 splits the backbone's last stage and
    # the head into E routed experts; expert_params: router_hidden (the router MLP's width, 32)
    experts: Annotated[int, Field(ge=1)] = 1
    expert_params: Dict[str, Any] = Field(default_factory=dict)


class LossConfig(_Open):
    """``loss.name`` and the loss's own options (longtail/losses/)."""

    name: str = "ce"


class SamplerConfig(_Open):
    """``sampler.name`` and the sampler's own options (longtail/data/samplers.py)."""

    name: str = "instance"


class OptimConfig(_Open):
    """``optim.name``, the settings every optimiser has, and the optimiser's own options (e.g.
    ``momentum`` for sgd, ``rho`` for sam / rsam), validated by the optimiser (longtail/optim/)."""

    name: str = "sgd"
    lr: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.1
    weight_decay: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 2e-4
    grad_clip: Optional[Annotated[float, Field(gt=0.0, allow_inf_nan=False)]] = None  # max norm
    # the head's own lr / weight decay (None: optim.lr / optim.weight_decay), e.g. a fresh
    # classifier on a tuned pretrained backbone
    head_lr: Optional[Annotated[float, Field(ge=0.0, allow_inf_nan=False)]] = None
    head_weight_decay: Optional[Annotated[float, Field(ge=0.0, allow_inf_nan=False)]] = None


class ScheduleConfig(_Open):
    """``schedule.name``, the warm-up every schedule has, and the schedule's own options (e.g.
    ``milestones`` / ``gamma`` for step, ``min_lr`` for cosine): longtail/optim/schedules.py."""

    name: str = "step"
    warmup_epochs: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 5.0


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # train.compile's torch modes


class TrainConfig(_Strict):
    epochs: Annotated[int, Field(ge=0)] = 200
    batch_size: Annotated[int, Field(ge=1)] = 128  # global batch, split over DDP ranks
    accumulate_steps: Annotated[int, Field(ge=1)] = 1  # micro-batches a step (accumulated)
    drop_last: bool = False
    eval_every: Annotated[int, Field(ge=0)] = 0  # evaluate every N epochs (0: only at the end)
    eval_batch_size: Annotated[int, Field(ge=1)] = 512
    # auto: bf16 autocast where it is faster than fp32 (longtail/optim/precision.py), resolved
    # when the run is built and recorded resolved in its config.yaml
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")] = "auto"  # cuda:N
    channels_last: bool = True  # NHWC: ~1.3x faster ResNet-32 training on CPU (benchmarks)
    # torch.compile of the training model: false, or its mode (true = "default")
    compile: Union[bool, Literal["default", "reduce-overhead", "max-autotune"]] = False
    num_threads: Optional[Annotated[int, Field(ge=1)]] = None  # torch threads (None: default)
    progress: bool = True
    checkpoint_every: Annotated[int, Field(ge=1)] = 1  # epochs between resumable checkpoints
    # experiment loggers (longtail/engine/loggers.py, docs/logging.md): none, one name or a list
    # of csv | tensorboard | wandb | mlflow; their settings (project, name, tracking_uri, mode, ...)
    logger: Union[str, List[str]] = "none"
    logger_params: Dict[str, Any] = Field(default_factory=dict)
    # a shortened run: scale every epoch-valued setting (warm-up, milestones, *_epoch options)
    # from nominal_epochs (the epochs the recipe is written for) to train.epochs, as `longtail
    # bench` does (longtail/core/scale.py); applied once, then recorded as false with the scaled
    # values (longtail/engine/config_check.py)
    rescale_schedule: bool = False
    nominal_epochs: Optional[Annotated[int, Field(ge=1)]] = None

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_mode(cls, value: Any) -> Any:
        if isinstance(value, bool) or value in COMPILE_MODES:
            return value
        raise ValueError(
            "must be false, true (= default) or a torch.compile mode: " + ", ".join(COMPILE_MODES)
        )

    @property
    def compile_mode(self) -> Optional[str]:
        """The ``mode`` passed to torch.compile (None: train.compile=false, not compiled)."""
        if self.compile is False:
            return None
        return "default" if self.compile is True else self.compile


class MethodConfig(_Open):
    """``method.name`` and the method's own options (longtail/methods/)."""

    name: str = "erm"


class StageConfig(_Strict):
    """One stage of a multi-stage config (``stages:``; see :mod:`longtail.engine.pipeline`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # its folder: RUN_DIR/<name>/
    config: Optional[str] = None  # a YAML file merged on top of the pipeline's settings
    overrides: Dict[str, Any] = Field(default_factory=dict)  # {dotted.key: value} or sections
    lr_scale: Optional[float] = Field(default=None, gt=0)  # optim.lr = x * the pipeline's
    epochs_scale: Optional[float] = Field(default=None, gt=0)  # epochs = x * the pipeline's


class Config(_Strict):
    seed: Annotated[int, Field(ge=0)] = 0
    stage1: Optional[str] = None  # run folder of a previous stage (decoupled, ...)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    # training hooks by name, each with its own options (longtail/hooks/), e.g. {mlrsnet: {...}}
    hooks: Dict[str, Dict[str, Any]] = Field(default_factory=dict)
    stages: Optional[List[StageConfig]] = None  # a pipeline: `longtail train` runs them in order

    def to_dict(self) -> Dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# keys that moved, for the message that rejects the old name
MOVED = {
    "optim.schedule": "schedule.name",
    "optim.warmup_epochs": "schedule.warmup_epochs",
    "optim.milestones": "schedule.milestones",
    "optim.gamma": "schedule.gamma",
    "optim.min_lr": "schedule.min_lr",
    "optim.base_optimizer": "optim.base",
    "optim.sam_adaptive": "optim.adaptive",
    "optim.rsam_dis_mul": "optim.dis_mul",
    "optim.rsam_decay_epoch": "optim.decay_epoch",
    "optim.rsam_fix_epoch0_quirk": "optim.fix_epoch0_quirk",
    "optim.mlrsnet": "hooks.mlrsnet",
    "data.sampler": "sampler.name",
    "data.sampler_params": "sampler (its options are keys of the sampler section)",
}


def component_sections() -> Dict[str, Type[_Open]]:
    """Sections that name a registered component (``name``) and hold its own options."""
    return {
        key: f.annotation
        for key, f in Config.model_fields.items()
        if isinstance(f.annotation, type) and issubclass(f.annotation, _Open)
    }


def switch_component(tree: Dict[str, Any], section: str, name: Any) -> bool:
    """The override ``section=NAME`` (e.g. ``sampler=class_balanced``): choose another component
    with its default options, keeping the section's typed settings (``optim.lr``, ...). Returns
    False when ``section`` is not a component section (then it is an ordinary override)."""
    model = component_sections().get(section)
    if model is None or not isinstance(name, str):
        return False
    current = tree.get(section)
    old = current if isinstance(current, dict) else {}
    kept = {k: v for k, v in old.items() if k in model.model_fields and k != "name"}
    tree[section] = {"name": name, **kept}
    return True


def diff_trees(
    old: Dict[str, Any], new: Dict[str, Any], prefix: str = ""
) -> Dict[str, Tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` of every leaf where two config trees differ
    (a key missing on one side has the value None there)."""
    out: Dict[str, Tuple[Any, Any]] = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(diff_trees(a, b, f"{prefix}{key}."))
        elif a != b:
            out[f"{prefix}{key}"] = (a, b)
    return out


# --------------------------------------------------------------------------------------------
# loading


def deep_merge(base: Dict[str, Any], update: Dict[str, Any], _top: bool = True) -> Dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (dicts merge, everything else replaces).

    A component section (loss, optim, schedule, sampler, method) whose ``name`` the update changes
    starts from the new component's defaults: the old component's own options are dropped, the
    section's typed settings (``optim.lr``, ``schedule.warmup_epochs``) are kept.
    """
    out = dict(base)
    sections = component_sections() if _top else {}
    for key, value in update.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            if key in sections and "name" in value and value["name"] != old.get("name"):
                old = {k: v for k, v in old.items() if k in sections[key].model_fields}
            out[key] = deep_merge(old, value, _top=False)
        else:
            out[key] = value
    return out


MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; anything near a megabyte is not one
MAX_ALIASES = 20  # YAML aliases (*name) a config may use: no "billion laughs" (expansion <~ 2000x)


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses alias bombs: at most MAX_ALIASES alias references."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases = getattr(self, "aliases", 0) + 1
            if self.aliases > MAX_ALIASES:
                raise ConfigError(
                    f"uses more than {MAX_ALIASES} YAML aliases (*name); a config "
                    f"needs none. Write the values out."
                )
        return super().compose_node(parent, index)


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` with the alias limit; ConfigError naming ``source`` on bad YAML."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as err:
        raise ConfigError(f"{source} {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(
            f"{source} is not valid YAML: {_short(err, 300)}. Fix the syntax."
        ) from None


def override_value(raw: str, item: str) -> Any:
    """The value of a ``key=value`` override, parsed as YAML (``1e-3``, ``[1, 2]``, ``null``);
    text that is not valid YAML stays a string. An empty value is None."""
    if raw == "":
        return None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"Override {item[:40]!r}... is {len(raw)} characters; pass a file.")
    try:
        return yaml.load(raw, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as err:
        raise ConfigError(f"Override {_short(item, 60)} {err}") from None
    except yaml.YAMLError:
        return raw


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (an error message never prints megabytes)."""
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= limit else text[: limit - 15] + f"... ({len(text)} chars)"


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"Config file {path} does not exist. Pass the path of a YAML file such as "
            f"configs/methods/ce.yaml."
        )
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"Config file {path} is {size / 1e6:.1f} MB; a config is a few KB of "
            f"YAML. Pass the right file."
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"Config file {path} is not UTF-8 text (byte {err.start} is "
            f"{path.read_bytes()[err.start : err.start + 1]!r}). Save it as UTF-8."
        ) from None
    data = parse_yaml(text, f"Config file {path}")
    if data is None:
        warnings.warn(f"config file {path} is empty: it sets nothing", stacklevel=2)
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file {path} must hold a mapping of keys, not {type(data).__name__}."
        )
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
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(
            f"Config file {path}: _base_ must be a file path or a list of file "
            f"paths (relative to the file), got {_short(bases)}."
        )
    merged: Dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml_tree(path.parent / base, (*_seen, path)))
    return deep_merge(merged, data)


# Composition: ``longtail train RECIPE data=NAME model=NAME key=value ...`` merges, lowest first,
# the dataset file (configs/datasets/NAME.yaml, with the model and schedule it inherits), the model
# file (configs/models/NAME.yaml), the recipe (with its _base_ chain), then the dotted overrides.
# A *selector* is an override whose key has no dot and names one of these folders.
SELECTORS = {"data": "datasets", "model": "models"}
_PROJECT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
_SELECTOR_WHAT = {"data": "dataset", "model": "model"}


def selector_of(item: str) -> Optional[tuple]:
    """``("data", "cifar100_lt")`` for the override ``data=cifar100_lt``; None for any other
    override (a dotted key, or ``data=`` given a mapping such as ``data={flip: false}``)."""
    if not isinstance(item, str) or "=" not in item:
        return None
    key, raw = item.split("=", 1)
    if key.strip() not in SELECTORS:
        return None
    value = override_value(raw, item)
    return (key.strip(), value) if isinstance(value, str) and value else None


def split_selectors(overrides: Sequence[str]) -> tuple:
    """``({"data": NAME, ...}, [the other overrides, in order])``; a repeated selector: the last."""
    selectors: Dict[str, str] = {}
    rest: List[str] = []
    for item in overrides:
        sel = selector_of(item)
        if sel is None:
            rest.append(item)
        else:
            selectors[sel[0]] = sel[1]
    return selectors, rest


def selector_folders(kind: str, near: Optional[Path] = None) -> List[Path]:
    """Where ``kind=NAME`` is looked up: the ``datasets/`` (``models/``) folder of the first folder
    from ``near`` (the recipe's folder) upwards that has one, then ./configs/, then the project's."""
    sub = SELECTORS[kind]
    out: List[Path] = []
    if near is not None:
        near = Path(near).resolve()
        for parent in (near, *near.parents):
            if (parent / sub).is_dir():
                out.append(parent / sub)
                break
    out += [Path.cwd() / "configs" / sub, _PROJECT_CONFIGS / sub]
    return list(dict.fromkeys(p.resolve() for p in out))


def _natural(name: str) -> list:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def selector_names(kind: str, near: Optional[Path] = None) -> List[str]:
    """The names ``kind=NAME`` accepts (file stems of its folders), e.g. cifar10_lt, cifar100_lt."""
    names = {p.stem for d in selector_folders(kind, near) if d.is_dir() for p in d.glob("*.yaml")}
    return sorted(names, key=_natural)


def find_selected(kind: str, value: str, near: Optional[Path] = None) -> Path:
    """The file of the selector ``kind=value``: a name of its folder or a path to a YAML file."""
    what = _SELECTOR_WHAT[kind]
    names = ", ".join(selector_names(kind, near)) or "none found"
    if value.endswith((".yaml", ".yml")) or "/" in value or "\\" in value:
        path = Path(value).expanduser()
        candidates = (
            [path]
            if path.is_absolute()
            else [Path.cwd() / path] + ([Path(near) / path] if near is not None else [])
        )
        for candidate in candidates:
            if candidate.is_file():
                return candidate.resolve()
        raise ConfigError(
            f"{kind}={value}: no such {what} file (looked for "
            f"{', '.join(str(c) for c in candidates)}). Give a YAML file or one of "
            f"the {what} names: {names}."
        )
    folders = selector_folders(kind, near)
    for folder in folders:
        if (folder / f"{value}.yaml").is_file():
            return (folder / f"{value}.yaml").resolve()
    raise ConfigError(
        f"Unknown {what} {kind}={value}: no {value}.yaml in "
        f"{', '.join(str(f) for f in folders)}. Available: {names} (or a path to a "
        f"YAML file)."
    )


def setting_file(path: Path, dotted: str, _seen: Sequence[Path] = ()) -> Optional[Path]:
    """The file of ``path``'s _base_ chain whose value of ``dotted`` wins (None: no file sets it)."""
    path = Path(path).resolve()
    if path in _seen:
        return None
    data = _read_yaml(path)
    if has_dotted({k: v for k, v in data.items() if k != "_base_"}, dotted):
        return path
    bases = data.get("_base_", [])
    for base in reversed([bases] if isinstance(bases, str) else list(bases)):
        found = setting_file(path.parent / base, dotted, (*_seen, path))
        if found is not None:
            return found
    return None


def compose(
    path: Optional[str | Path], selectors: Dict[str, str], require_dataset: bool = True
) -> Dict[str, Any]:
    """The merged tree of the selected dataset file, the selected model file and the recipe
    ``path`` (lowest first). ConfigError: an unknown name; a recipe that names no dataset without
    ``data=`` (``require_dataset``); ``data=`` with a recipe whose _base_ chain fixes the dataset."""
    unknown = sorted(set(selectors) - set(SELECTORS))
    if unknown:
        raise ConfigError(
            f"Unknown selector {unknown[0]}=...; the selectors are "
            f"{', '.join(f'{k}=NAME' for k in SELECTORS)}."
        )
    near = Path(path).resolve().parent if path is not None else None
    recipe = load_yaml_tree(Path(path)) if path is not None else {}
    tree: Dict[str, Any] = {}
    data = selectors.get("data")
    if data is not None:
        selected = find_selected("data", data, near)
        if path is not None and has_dotted(recipe, "data.dataset"):
            where = setting_file(Path(path), "data.dataset") or Path(path)
            raise ConfigError(
                f"{path} already fixes the dataset (data.dataset: {get_dotted(recipe, 'data.dataset')}, "
                f"set in {where}), so data={data} cannot choose it. Drop data={data}, or run a "
                f"recipe that names no dataset (configs/methods/) with data={data}."
            )
        tree = load_yaml_tree(selected)
    if selectors.get("model") is not None:
        tree = deep_merge(tree, load_yaml_tree(find_selected("model", selectors["model"], near)))
    tree = deep_merge(tree, recipe)
    if require_dataset and path is not None and not has_dotted(tree, "data.dataset"):
        names = selector_names("data", near)
        raise ConfigError(
            f"{path} names no dataset: name the dataset: add data=NAME (available: "
            f"{', '.join(names) or 'none found'}), e.g. longtail train {path} "
            f"data={names[0] if names else 'NAME'}."
        )
    return tree


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
            raise ConfigError(
                f"Override {item!r} is not of the form key=value (e.g. train.epochs=2)."
            )
        key, raw = item.split("=", 1)
        value = override_value(raw, item)
        parts = key.strip().split(".")
        if selector_of(item) is not None:
            raise ConfigError(
                f"{item!r} selects a {_SELECTOR_WHAT[parts[0]]} file: it is given with a "
                f"recipe (longtail train RECIPE {item}), not applied to a config."
            )
        if len(parts) == 1 and switch_component(tree, parts[0], value):
            continue
        if not all(parts):
            raise ConfigError(
                f"Override key {key!r} is malformed; use dotted names like optim.lr=0.05."
            )
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"Override {key!r}: '{'.'.join(parts[: i + 1])}' is a value, not a section."
                )
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
    moved = [k for k in MOVED if has_dotted(tree, k)]
    if moved:
        raise ConfigError(
            f"Invalid {source}: "
            + "; ".join(f"'{k}' has moved: use '{MOVED[k]}'" for k in moved)
            + "."
        )
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden" and key in MOVED:
                lines.append(f"'{key}' has moved: use '{MOVED[key]}'.")
            elif e["type"] == "extra_forbidden":
                lines.append(f"unknown key '{key}'.{_suggest(e['loc'])}")
            else:
                lines.append(f"'{key}': {e['msg']} (got {_short(e.get('input'))}).")
        raise ConfigError(
            f"Invalid {source}: "
            + "; ".join(lines)
            + " Fix the key in the YAML file or the key=value override."
        ) from None


def load_config_tree(
    path: Optional[str | Path], overrides: Sequence[str] = (), require_dataset: bool = True
) -> Dict[str, Any]:
    """The unvalidated tree of :func:`load_config`: :func:`compose` with the selectors of
    ``overrides`` (``data=NAME``, ``model=NAME``), then the other overrides applied."""
    selectors, rest = split_selectors(overrides)
    composed = compose(path, selectors, require_dataset)
    tree = apply_overrides(composed, rest)
    # train.rescale_schedule: the recipe's own train.epochs is the length its settings were
    # written for (unless train.nominal_epochs says otherwise)
    written = get_dotted(composed, "train.epochs")
    if (
        get_dotted(tree, "train.rescale_schedule") is True
        and get_dotted(tree, "train.nominal_epochs") is None
        and written is not None
    ):
        tree = deep_merge(tree, {"train": {"nominal_epochs": written}})
    return tree


def load_config(path: Optional[str | Path], overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (with _base_ inheritance), compose it with the selected dataset / model
    files (``data=NAME`` / ``model=NAME`` in ``overrides``), apply the dotted overrides, validate."""
    tree = load_config_tree(path, overrides)
    return validate(tree, source=f"config {path}" if path else "config")
