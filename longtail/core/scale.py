"""Shorten (or lengthen) a run's schedule: every epoch-valued setting scaled with ``train.epochs``.

``scale_epochs(cfg, n)`` maps a config written for ``E = cfg.train.epochs`` epochs onto ``n``
epochs with the ratio ``r = n / E``. Epoch-valued settings are found by name, in every component
section (``loss``, ``optim``, ``schedule``, ``sampler``, ``method``, ``hooks.*``) and in
``model.*_params``: a key named ``epochs`` or ending in ``_epoch`` / ``_epochs``, or ending in
``milestones``. A component that adds an epoch-valued option names it so.

==============================  ============================================================
``train.epochs``                ``n``
integer epochs                  ``round(v r)``, clamped to ``[1, n - 1]`` when ``0 < v < E``
(``drw_epoch``, ...)            (a phase inside the schedule stays inside it); ``v <= 0`` is
                                kept and ``v >= E`` maps to ``round(v r) >= n`` (still
                                "never"). 200 -> 8: ``drw_epoch`` 160 -> 6.
float epochs                    ``v r`` (4 decimals): ``schedule.warmup_epochs`` 5 -> 0.2 for
(``warmup_epochs``)             200 -> 8. The per-epoch ``step`` schedule runs epoch e at lr x
                                e/w while e <= w, so w <= 1 means no warm-up; ``cosine`` warms
                                up per step and keeps a fractional warm-up.
integer lists (milestones)      each ``m`` -> ``round(m r)`` clamped to ``[1, n - 1]``, then
                                made strictly increasing (a milestone that lands on the one
                                before moves one epoch later, possibly to ``n`` where it no
                                longer applies). 200 -> 8: ``[160, 180]`` -> ``[6, 7]``.
``train.eval_every``            ``round(k r)``; 0 (evaluate only at the end) when it rounds
                                to 0. 200 -> 8: 10 -> 0.
==============================  ============================================================

``round`` is round-half-up (``floor(x + 0.5)``). ``train.checkpoint_every`` is not scaled (it is
about resumability, not the schedule). A config with ``train.epochs: 0`` (a post-hoc stage that
trains nothing: tau-norm, NCM, post-hoc LA) is returned unchanged.
"""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any, Dict, List, Tuple, Union

from longtail.core.config import Config, get_dotted, validate
from longtail.core.errors import ConfigError

# sections whose options may hold epoch-valued settings (found by key name)
_SECTIONS = (
    "loss",
    "optim",
    "schedule",
    "sampler",
    "method",
    "model.backbone_params",
    "model.neck_params",
    "model.head_params",
)
_EPOCH_KEY = re.compile(r"(^epochs?$|_epochs?$)")
_MILESTONE_KEY = re.compile(r"(^|_)milestones$")

Tree = Dict[str, Any]


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _scale_start(v: int, old: int, new: int) -> int:
    """An integer epoch that starts (or ends) a phase: keep a phase inside the schedule inside."""
    if v <= 0:
        return v
    scaled = _round(v * new / old)
    if v < old:
        scaled = min(max(scaled, 1), max(new - 1, 1))
    return scaled


def _scale_milestones(values: List[int], old: int, new: int) -> List[int]:
    out: List[int] = []
    for v in sorted(values):
        m = _scale_start(int(v), old, new)
        if out and m <= out[-1] and v > 0:
            m = out[-1] + 1
        out.append(m)
    return out


def _scale_value(value: Any, old: int, new: int) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return _scale_start(value, old, new)
    if isinstance(value, float):
        return round(value * new / old, 4)
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return _scale_milestones(list(value), old, new)
    return value


def _set(tree: Tree, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _as_config(cfg: Union[Config, Tree]) -> Config:
    return cfg if isinstance(cfg, Config) else validate(copy.deepcopy(cfg), "config")


def scaled_settings(cfg: Union[Config, Tree], new_epochs: int) -> Dict[str, Tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` for every epoch-valued setting that changes."""
    if isinstance(new_epochs, bool) or not isinstance(new_epochs, int) or new_epochs < 1:
        raise ConfigError(f"epochs must be a positive integer, got {new_epochs!r}.")
    tree = _as_config(cfg).to_dict()
    old = int(tree["train"]["epochs"])
    if old <= 0 or new_epochs == old:
        return {}
    changes: Dict[str, Tuple[Any, Any]] = {"train.epochs": (old, new_epochs)}
    every = int(tree["train"]["eval_every"])
    changes["train.eval_every"] = (
        every,
        max(_round(every * new_epochs / old), 0) if every > 0 else every,
    )
    sections = list(_SECTIONS) + [f"hooks.{name}" for name in tree.get("hooks") or {}]
    for section in sections:
        options = get_dotted(tree, section)
        if not isinstance(options, dict):
            continue
        for key, value in options.items():
            if _EPOCH_KEY.search(key) or _MILESTONE_KEY.search(key):
                changes[f"{section}.{key}"] = (value, _scale_value(value, old, new_epochs))
    return {k: (a, b) for k, (a, b) in changes.items() if a != b}


def scale_epochs(cfg: Union[Config, Tree], new_epochs: int) -> Union[Config, Tree]:
    """``cfg`` with ``train.epochs = new_epochs`` and every epoch-valued setting scaled (see the
    module docstring). Returns a new Config for a Config, a new (complete) dict for a dict."""
    config = _as_config(cfg)
    tree = config.to_dict()
    for key, (_, new) in scaled_settings(config, new_epochs).items():
        _set(tree, key, new)
    out = validate(tree, "scaled config")
    return out if isinstance(cfg, Config) else out.to_dict()


def epoch_overrides(cfg: Union[Config, Tree], new_epochs: int) -> List[str]:
    """The ``key=value`` overrides that turn ``cfg`` into ``scale_epochs(cfg, new_epochs)``
    (values written as JSON, which the YAML override parser reads back unchanged)."""
    return [
        f"{key}={json.dumps(new)}" for key, (_, new) in scaled_settings(cfg, new_epochs).items()
    ]
