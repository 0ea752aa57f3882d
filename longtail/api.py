"""The Python API: train and evaluate runs, and the components for one's own training loop.

``train`` / ``evaluate`` are ``longtail train`` / ``longtail eval`` without the command line (the
same engine functions); ``create_model`` / ``create_loss`` / ``create_sampler`` build the
registered components by name for a loop of one's own. ``docs/api.md`` has the examples.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type, Union, cast

import numpy as np
import torch
import torch.nn as nn
import yaml

from longtail.core.config import (
    Config,
    ModelConfig,
    apply_overrides,
    compose,
    deep_merge,
    get_dotted,
    has_dotted,
    load_config,
    load_yaml_tree,
    split_selectors,
    validate,
)
from longtail.core.errors import ConfigError
from longtail.core.facts import RunFacts
from longtail.data.paths import resolve_data_root
from longtail.data.samplers import SAMPLERS, BaseSampler, build_sampler
from longtail.engine.evaluate_run import evaluate_run
from longtail.engine.pipeline import run_pipeline
from longtail.engine.trainer import fit
from longtail.losses import LOSSES, LongtailLoss
from longtail.losses import create as _create_loss
from longtail.methods import METHODS
from longtail.models import BACKBONES, Classifier, build_model

PathLike = Union[str, "os.PathLike[str]"]
Overrides = Union[Sequence[str], Mapping[str, Any], None]

#: the functions of the top-level API (``longtail.<name>``), in the order ``help`` shows them
FUNCTIONS = (
    "train",
    "evaluate",
    "create_model",
    "create_loss",
    "create_sampler",
    "list_models",
    "list_losses",
    "list_samplers",
    "list_methods",
)


# ------------------------------------------------------------------------------ train / evaluate
def train(
    config: Union[PathLike, Mapping[str, Any]],
    overrides: Overrides = None,
    out: Optional[PathLike] = None,
    data_root: Optional[PathLike] = None,
) -> Dict[str, Any]:
    """Train a run as ``longtail train CONFIG OVERRIDES --out OUT`` does; returns its metrics.

    Args:
        config: a YAML recipe (path), or the config as a dict (its ``_base_`` files relative to
            the working directory).
        overrides: ``["data=cifar10_lt", "train.epochs=2"]`` as on the command line, or a dict
            ``{"data": "cifar10_lt", "train.epochs": 2}`` (strings read as on the command line).
        out: the run folder (default ``runs/<dataset>-<recipe>-<time>``, as the CLI).
        data_root: the data folder (default ``$LONGTAIL_DATA``, else the cache).

    Returns:
        the metrics the run wrote to ``OUT/metrics.json`` (top-1, many / medium / few, ...).
    """
    items = _override_list(overrides)
    selectors, _ = split_selectors(items)
    if isinstance(config, Mapping):
        cfg, source = _config_from_dict(config, items), None
    else:
        source = Path(config)
        cfg = load_config(source, items)
    run_dir = Path(out) if out is not None else default_run_dir(source, selectors)
    root = resolve_data_root(None if data_root is None else Path(data_root))
    if cfg.stages:  # a multi-stage config: OUT/<stage>/ each (longtail.engine.pipeline)
        return run_pipeline(cfg, run_dir, root, overrides=items, source=source)
    metrics = fit(cfg, run_dir, root)
    assert metrics is not None  # None only when asked to stop early (stop_after_epoch)
    return metrics


def evaluate(run_dir: PathLike, data_root: Optional[PathLike] = None) -> Dict[str, Any]:
    """Recompute a finished run's metrics from its saved weights, as ``longtail eval RUN_DIR``:
    the test metrics at the top level, the validation split's under ``"val"``."""
    return evaluate_run(
        Path(run_dir), resolve_data_root(None if data_root is None else Path(data_root))
    )


def _override_list(overrides: Overrides) -> List[str]:
    """``key=value`` strings from a list of them or a dict (values written back as YAML)."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{key}={_as_yaml(value)}" for key, value in overrides.items()]
    if isinstance(overrides, (str, bytes)):
        raise ConfigError(
            f"overrides={overrides!r}: give a list of 'key=value' strings (e.g. "
            f"['data=cifar10_lt', 'train.epochs=2']) or a dict, not one string."
        )
    items = list(overrides)
    bad = [item for item in items if not isinstance(item, str)]
    if bad:
        raise ConfigError(
            f"overrides: every item must be a 'key=value' string, got {bad[0]!r}; or pass a "
            f"dict such as {{'train.epochs': 2}}."
        )
    return items


def _as_yaml(value: Any) -> str:
    """An override value as text that parses back to it (a string is kept as written)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):  # a numpy scalar: its Python value
        value = value.item()
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    return text.removesuffix("\n...\n").strip()


def _config_from_dict(tree: Mapping[str, Any], items: Sequence[str]) -> Config:
    """A dict config as :func:`longtail.core.config.load_config` composes a file: its
    ``_base_`` files (relative to the working directory) under it, the selected dataset / model
    files under both, then the dotted overrides, validated."""
    selectors, rest = split_selectors(items)
    recipe = dict(tree)
    bases = recipe.pop("_base_", [])
    merged: Dict[str, Any] = {}
    for base in [bases] if isinstance(bases, (str, Path)) else list(bases):
        merged = deep_merge(merged, load_yaml_tree(Path(base)))
    recipe = deep_merge(merged, recipe)
    if "data" in selectors and has_dotted(recipe, "data.dataset"):
        fixed = get_dotted(recipe, "data.dataset")
        raise ConfigError(
            f"The config already fixes the dataset (data.dataset: {fixed}), so "
            f"data={selectors['data']} cannot choose it. Drop one of them."
        )
    composed = deep_merge(compose(None, selectors, require_dataset=False), recipe)
    return validate(apply_overrides(composed, rest), source="config (dict)")


def default_run_dir(source: Optional[Path], selectors: Mapping[str, str]) -> Path:
    """``runs/<dataset>-<recipe>-<time>``, the CLI's default run folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if source is None:
        prefix = Path(selectors["data"]).stem if "data" in selectors else "config"
        return Path("runs") / f"{prefix}-{stamp}"
    prefix = Path(selectors["data"]).stem if "data" in selectors else source.parent.name
    return Path("runs") / f"{prefix}-{source.stem}-{stamp}"


# ------------------------------------------------------------------------ components, by name
class LogitsModel(nn.Module):
    """A longtail classifier for one's own loop: ``forward(x)`` gives the logits [B, C],
    ``forward_features(x)`` the classifier input [B, D] (as timm's models).

    ``classifier`` is the :class:`longtail.models.Classifier` inside (backbone -> neck -> head,
    its ``forward`` returning logits, features and extras); a run's ``model.safetensors`` loads
    into it: ``model.classifier.load_state_dict(safetensors.torch.load_file(path))``.
    """

    def __init__(self, classifier: Classifier, num_classes: int):
        super().__init__()
        self.classifier = classifier
        self.num_classes = int(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> logits [B, num_classes]."""
        return self.classifier(x).logits

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> features [B, D] (the head's input)."""
        return self.classifier.forward_features(x)


def create_model(
    name: str,
    num_classes: int,
    pretrained: Optional[PathLike] = None,
    in_chans: int = 3,
    **options: Any,
) -> LogitsModel:
    """The backbone ``name`` (:func:`list_models`) with a head for ``num_classes`` classes.

    Args:
        pretrained: a weights file for the backbone (``.safetensors`` / ``.pth`` / ``.npz``, the
            ImageNet backbones and ViTs; nothing is downloaded).
        in_chans: input channels (1 for MNIST).
        options: keys of the config's ``model`` section (``head="cosine"``, ``neck=...``,
            ``input_size=224``, ``tuning="lora"``, ``experts=3``, their ``*_params``); any other
            keyword is an option of the backbone (``model.backbone_params``).
    """
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, (int, np.integer))
        or num_classes < 1
    ):
        raise ConfigError(
            f"create_model: num_classes must be an integer >= 1, got {num_classes!r}."
        )
    if "backbone" in options:
        raise ConfigError("create_model: the backbone is the first argument (name), not backbone=.")
    fields = {k: options.pop(k) for k in list(options) if k in ModelConfig.model_fields}
    backbone_params = {**dict(fields.pop("backbone_params", None) or {}), **options}
    if pretrained is not None:
        backbone_params["pretrained"] = os.fspath(pretrained)
    tree = {"model": {"backbone": name, "backbone_params": backbone_params, **fields}}
    cfg = validate(tree, source="create_model options").model
    return LogitsModel(build_model(cfg, int(num_classes), in_chans), int(num_classes))


def create_loss(
    name: str, class_counts: Optional[Sequence[float]] = None, **options: Any
) -> LongtailLoss:
    """The loss ``name`` (:func:`list_losses`); ``class_counts``: training images per class.

    ``loss(logits, targets)`` gives the scalar loss; call ``loss.set_epoch(epoch)`` at the start
    of each epoch (deferred re-weighting, ``drw_epoch=``). Losses with
    ``requires_normalized_head`` (LDAM, GCL) expect cosine logits: ``create_model(...,
    head="cosine")``.
    """
    return cast(LongtailLoss, _create_loss(name, class_counts, **options))


def create_sampler(
    name: str,
    labels: Any,
    class_counts: Optional[Sequence[int]] = None,
    seed: int = 0,
    **options: Any,
) -> BaseSampler:
    """The sampler ``name`` (:func:`list_samplers`) over a dataset with these ``labels``.

    A ``torch.utils.data.Sampler``: ``DataLoader(dataset, sampler=s, batch_size=B)``; each pass
    is the next epoch (``s.set_epoch(e)`` chooses it). ``labels``: the class of every item (a
    list, array or tensor); ``class_counts``: per class (default: counted from ``labels``).
    Options a run would supply (``batch_size`` of ``b3rs``, ``total_epochs`` of
    ``progressive``) must be given here.
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(
            f"create_sampler: labels must be a 1-D list of integer classes, got "
            f"{labels.dtype} of shape {labels.shape}."
        )
    counts = np.bincount(labels) if class_counts is None else class_counts
    cls = cast(Type[BaseSampler], SAMPLERS.get(name))
    missing = [option for option in cls.run_facts if option not in options]
    if missing:
        raise ConfigError(
            f"Sampler {name!r} takes {', '.join(missing)} from the run in a config; give "
            f"{' and '.join(f'{m}=...' for m in missing)} to create_sampler."
        )
    return build_sampler(name, labels, counts, RunFacts(seed=seed), **options)


def list_models() -> List[str]:
    """The backbone names :func:`create_model` accepts."""
    return BACKBONES.names()


def list_losses() -> List[str]:
    """The loss names :func:`create_loss` accepts (``loss.name`` in a config)."""
    return LOSSES.names()


def list_samplers() -> List[str]:
    """The sampler names :func:`create_sampler` accepts (``sampler.name`` in a config)."""
    return SAMPLERS.names()


def list_methods() -> List[str]:
    """The training methods a config can name (``method.name``)."""
    return METHODS.names()


def _component_classes() -> Dict[str, type]:
    """Every registered loss and sampler class by its class name, and the base classes."""
    out: Dict[str, type] = {
        "LongtailLoss": LongtailLoss,
        "BaseSampler": BaseSampler,
        "LogitsModel": LogitsModel,
    }
    for registry in (LOSSES, SAMPLERS):
        for entry in map(registry.get, registry.names()):
            if isinstance(entry, type):  # the first of two same-named classes (tests forbid it)
                out.setdefault(entry.__name__, entry)
    return out


#: the classes the package offers at its top level (``from longtail import LDAMLoss``)
CLASSES: Dict[str, type] = _component_classes()
__all__ = [*FUNCTIONS, *sorted(CLASSES)]
