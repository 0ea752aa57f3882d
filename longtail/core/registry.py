"""A small name -> builder registry shared by every component family (losses, models, ...).

Components register with a decorator and are built by name from YAML configs; keyword
arguments are checked against the builder's signature so a misspelt option is reported by name.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, Callable, Dict, Iterable

from longtail.core.errors import ConfigError


class Registry:
    """Maps names to builders (classes or functions).

    Example::

        LOSSES = Registry("loss")

        @LOSSES.register("ce")
        class CrossEntropy(nn.Module): ...

        LOSSES.build("ce", reduction="mean")
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._items:
            raise ConfigError(
                f"Unknown {self.kind} {name!r}. Available: {', '.join(sorted(self._items))}."
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def check_kwargs(self, name: str, kwargs: Dict[str, Any], key_prefix: str = "",
                     ignore: Iterable[str] = ()) -> None:
        """Raise a ConfigError naming any keyword the builder does not accept."""
        check_kwargs(self.get(name), kwargs, what=f"{self.kind} {name!r}",
                     key_prefix=key_prefix, ignore=ignore)

    def build(self, name: str, *args: Any, key_prefix: str = "", **kwargs: Any) -> Any:
        builder = self.get(name)
        check_kwargs(builder, kwargs, what=f"{self.kind} {name!r}", key_prefix=key_prefix)
        return builder(*args, **kwargs)


def check_kwargs(builder: Callable[..., Any], kwargs: Dict[str, Any], what: str,
                 key_prefix: str = "", ignore: Iterable[str] = ()) -> None:
    sig = inspect.signature(builder)
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = {n for n, p in params.items()
               if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    unknown = sorted(set(kwargs) - allowed - set(ignore))
    if unknown:
        shown = ", ".join(f"'{key_prefix}{k}'" for k in unknown)
        options = ", ".join(sorted(allowed - {"self", "class_counts", "num_classes"})) or "none"
        raise ConfigError(f"Unknown option {shown} for {what}. Its options are: {options}.")




def import_submodules(package: str, path: Iterable[str]) -> None:
    """Import every module of a package (its ``__name__`` and ``__path__``), so each registers
    its components: adding a component is adding its file."""
    for module in pkgutil.iter_modules(list(path)):
        importlib.import_module(f"{package}.{module.name}")
