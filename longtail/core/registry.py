"""A small name -> builder registry shared by every component family (losses, models, ...).

Components register with a decorator and are built by name from YAML configs; keyword
arguments are checked against the builder's signature so a misspelt option is reported by name.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from typing import Any, Callable, Dict, Iterable, Optional, Set, Type

import pydantic

from longtail.core.errors import ConfigError

# builder parameters that are the run's, not options of the config (a method's context, a
# sampler's labels, a loss's class counts)
_CONTEXT_PARAMS = frozenset({"self", "ctx", "labels", "class_counts", "num_classes", "facts"})


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

    def option_names(self, name: str, options: Dict[str, Any]) -> Optional[Set[str]]:
        """The option keys component ``name`` accepts (None: any; it checks them itself).

        A component states them with ``option_names(options)`` or an ``options_model`` (a
        pydantic model); otherwise they are its builder's keyword parameters."""
        entry = self.get(name)
        if hasattr(entry, "option_names"):
            return entry.option_names(options)
        model = getattr(entry, "options_model", None)
        if model is not None:
            return set(model.model_fields)
        params = inspect.signature(entry).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return None
        return {
            n
            for n, p in params.items()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            and n not in _CONTEXT_PARAMS
        }

    def check_options(self, name: str, options: Dict[str, Any], where: str) -> None:
        """Validate the option values of component ``name`` before anything is built: with its
        ``check_options(options, where)``, else with a pydantic model of its builder's signature
        (types, and the ranges its ``Annotated[..., Field(...)]`` parameters state). Names are
        checked by the caller."""
        entry = self.get(name)
        if hasattr(entry, "check_options"):
            entry.check_options(options, where)
            return
        model = signature_model(entry)
        if model is None:
            return
        try:
            model(**{k: v for k, v in options.items() if k in model.model_fields})
        except pydantic.ValidationError as err:
            seen, lines = set(), []
            for e in err.errors():  # one line per key (a union reports each alternative)
                key = str(e["loc"][0]) if e["loc"] else "?"
                if key not in seen:
                    seen.add(key)
                    lines.append(f"'{where}.{key}': {e['msg']} (got {_short(e.get('input'))})")
            raise ConfigError("; ".join(lines) + ".") from None

    def check_kwargs(
        self, name: str, kwargs: Dict[str, Any], key_prefix: str = "", ignore: Iterable[str] = ()
    ) -> None:
        """Raise a ConfigError naming any keyword the builder does not accept."""
        check_kwargs(
            self.get(name),
            kwargs,
            what=f"{self.kind} {name!r}",
            key_prefix=key_prefix,
            ignore=ignore,
        )

    def build(self, name: str, *args: Any, key_prefix: str = "", **kwargs: Any) -> Any:
        builder = self.get(name)
        check_kwargs(builder, kwargs, what=f"{self.kind} {name!r}", key_prefix=key_prefix)
        return builder(*args, **kwargs)


def check_kwargs(
    builder: Callable[..., Any],
    kwargs: Dict[str, Any],
    what: str,
    key_prefix: str = "",
    ignore: Iterable[str] = (),
) -> None:
    sig = inspect.signature(builder)
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = {
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    unknown = sorted(set(kwargs) - allowed - set(ignore))
    if unknown:
        shown = ", ".join(f"'{key_prefix}{k}'" for k in unknown)
        options = ", ".join(sorted(allowed - {"self", "class_counts", "num_classes"})) or "none"
        raise ConfigError(f"Unknown option {shown} for {what}. Its options are: {options}.")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 15] + f"... ({len(text)} chars)"


_MODELS: Dict[Any, Any] = {}


def signature_model(builder: Callable[..., Any]) -> Optional[Type[pydantic.BaseModel]]:
    """A pydantic model of a builder's keyword options (annotations and defaults of its
    signature, the run's context parameters left out); None if it cannot be made."""
    if builder in _MODELS:
        return _MODELS[builder]
    target = getattr(builder, "__init__") if isinstance(builder, type) else builder  # noqa: B009
    try:
        hints = typing.get_type_hints(target, include_extras=True)
        params = inspect.signature(builder).parameters
    except (NameError, TypeError, ValueError):
        _MODELS[builder] = None
        return None
    fields: Dict[str, Any] = {}
    for name, p in params.items():
        if name in _CONTEXT_PARAMS or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[name] = (hints.get(name, Any), default)
    model = pydantic.create_model(
        f"{getattr(builder, '__name__', 'Component')}Options",
        __config__=pydantic.ConfigDict(arbitrary_types_allowed=True),
        **fields,
    )
    _MODELS[builder] = model
    return model


def import_submodules(package: str, path: Iterable[str]) -> None:
    """Import every module of a package (its ``__name__`` and ``__path__``), so each registers
    its components: adding a component is adding its file."""
    for module in pkgutil.iter_modules(list(path)):
        importlib.import_module(f"{package}.{module.name}")
