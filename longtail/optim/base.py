"""The optimiser registry: each optimiser states its own facts in an :class:`OptimInfo` (as timm's
``OptimInfo``): its builder, the pydantic model of its options (the extra keys of the ``optim``
section) and whether its ``step`` must evaluate the loss closure itself (sam, rsam)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Type, cast

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from longtail.core.errors import ConfigError
from longtail.core.facts import RunFacts
from longtail.core.registry import Registry


class Options(BaseModel):
    """Base of a component's options: unknown keys are refused by name."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class OptimInfo:
    """``build(params, cfg, options, facts)`` -> optimizer; ``cfg`` is the ``optim`` section
    (``lr``, ``weight_decay``), ``options`` its extra keys validated by ``options_model``."""

    name: str
    build: Callable[..., torch.optim.Optimizer]
    options_model: Type[Options]
    needs_closure: bool = False  # step(closure, base_step) evaluates the closure itself
    base_key: Optional[str] = None  # the option naming a wrapped optimiser: the keys this one does
    #                                 not know are that optimiser's options (sam, rsam: "base")

    def _split(self, options: Dict[str, Any]):
        own = {k: v for k, v in options.items() if k in self.options_model.model_fields}
        rest = {k: v for k, v in options.items() if k not in own}
        base = (
            options.get(self.base_key, self.options_model.model_fields[self.base_key].default)
            if self.base_key
            else None
        )
        return own, rest, base

    def option_names(self, options: Dict[str, Any]) -> Set[str]:
        own, rest, base = self._split(options)
        names = set(self.options_model.model_fields)
        if base is not None and base in OPTIMIZERS:
            names |= optim_info(base).option_names(rest)
        return names

    def check_options(self, options: Dict[str, Any], where: str) -> None:
        own, rest, base = self._split(options)
        if base is None:
            parse_options(self.options_model, options, where)
            return
        parse_options(self.options_model, own, where)
        info = optim_info(base)
        if info.needs_closure:
            raise ConfigError(
                f"{where}.{self.base_key}={base} cannot be wrapped by {self.name}: "
                f"the base must be a plain optimiser such as sgd."
            )
        info.check_options(rest, where)


OPTIMIZERS = Registry("optimizer")


def register_optimizer(info: OptimInfo) -> OptimInfo:
    # Registry types its entries as callables (core/registry.py); OPTIMIZERS holds OptimInfo records
    OPTIMIZERS.register(info.name)(info)  # type: ignore[arg-type]
    return info


def parse_options(model: Type[Options], values: Dict[str, Any], where: str) -> Options:
    """``model(**values)`` with a ConfigError that names each bad key under ``where``."""
    try:
        return model(**values)
    except ValidationError as err:
        lines = []
        allowed = ", ".join(model.model_fields) or "none"
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                lines.append(f"unknown option '{where}.{key}' (its options: {allowed})")
            else:
                lines.append(f"'{where}.{key}': {e['msg']} (got {e.get('input')!r})")
        raise ConfigError(
            "; ".join(lines) + ". Fix the key in the YAML file or the override."
        ) from None


def optim_info(name: str) -> OptimInfo:
    return cast(OptimInfo, OPTIMIZERS.get(name))  # only register_optimizer adds entries


def build_optimizer(
    cfg, params: Iterable[torch.nn.Parameter], facts: RunFacts = RunFacts(), **fact_values: Any
) -> torch.optim.Optimizer:
    """The optimizer named by ``optim.name`` for a run described by ``facts`` (``fact_values``
    replace single facts, e.g. ``seed=3``); every param group remembers its lr as ``base_lr``."""
    if fact_values:
        facts = dataclasses.replace(facts, **fact_values)
    info = optim_info(cfg.name)
    options = parse_options(info.options_model, cfg.params(), "optim")
    optimizer = info.build(list(params), cfg, options, facts)
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    return optimizer


def param_groups(
    params: Iterable[torch.nn.Parameter],
    own: Iterable[torch.nn.Parameter],
    lr: Optional[float] = None,
    weight_decay: Optional[float] = None,
) -> List[Any]:
    """``params`` as optimiser groups: those also in ``own`` (e.g. the head's, with
    ``optim.head_lr`` / ``optim.head_weight_decay``) in a second group with that ``lr`` /
    ``weight_decay`` where given. Neither given: the plain parameter list, one group."""
    params = list(params)
    if lr is None and weight_decay is None:
        return params
    mine = {id(p) for p in own}
    rest = [p for p in params if id(p) not in mine]
    special: Dict[str, Any] = {"params": [p for p in params if id(p) in mine], "name": "head"}
    if lr is not None:
        special["lr"] = lr
    if weight_decay is not None:
        special["weight_decay"] = weight_decay
    groups = [{"params": rest, "name": "tuned"}, special]
    return [g for g in groups if g["params"]]


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr to base_lr * factor; returns the first group's lr."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
