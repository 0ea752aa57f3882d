"""Check a validated config against the registered components before anything is built or
written: every component name exists, every option key is one the component takes (with a
"did you mean" over the section's settings and the component's options), and components that
state an options model validate the values (ranges, types).

``core.config.validate`` checks the typed settings; the options of a component are the
component's to state, so they are checked here, where the registries are known.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from longtail.core.config import Config, component_sections
from longtail.core.errors import ConfigError
from longtail.core.registry import Registry
from longtail.data.samplers import SAMPLERS
from longtail.hooks import HOOKS
from longtail.losses import LOSSES
from longtail.methods import METHODS
from longtail.models import BACKBONES, HEADS, NECKS
from longtail.models.peft import TUNINGS
from longtail.optim import OPTIMIZERS, SCHEDULES

_FIX = "Fix the key in the YAML file or the override."
REGISTRIES: Dict[str, Registry] = {
    "loss": LOSSES,
    "optim": OPTIMIZERS,
    "schedule": SCHEDULES,
    "sampler": SAMPLERS,
    "method": METHODS,
}


def _unknown_key(key: str, section: str, candidates: Iterable[str], what: str) -> str:
    names = sorted(set(candidates))
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean '{section}.{close[0]}'?" if close else ""
    return f"unknown key '{section}.{key}'.{hint} The keys of {what}: {', '.join(names)}."


def _sections(cfg: Config) -> List[Tuple[str, Registry, str, Dict[str, Any], Set[str]]]:
    """(section, registry, component name, options, typed settings) of every component."""
    out = []
    models = component_sections()
    for section, registry in REGISTRIES.items():
        part = getattr(cfg, section)
        typed = set(models[section].model_fields) - {"name"}
        out.append((section, registry, part.name, part.params(), typed))
    for name, options in cfg.hooks.items():
        out.append((f"hooks.{name}", HOOKS, name, dict(options or {}), set()))
    return out


def option_accepted(cfg: Config, dotted: str) -> Optional[bool]:
    """Whether ``dotted`` (e.g. ``schedule.milestones``) is an option of the component ``cfg``
    chooses for that section; None when the key is no component option (a typed setting,
    another section, or a component that takes any key)."""
    for section, registry, name, options, typed in _sections(cfg):
        prefix = section + "."
        if not dotted.startswith(prefix) or name not in registry:
            continue
        key = dotted[len(prefix) :].split(".")[0]
        if key in typed or key == "name":
            return None
        accepted = registry.option_names(name, options)
        return None if accepted is None else key in accepted
    return None


def check_config(cfg: Config, where: str = "config") -> Config:
    """ConfigError naming the first bad component name or option of ``cfg``; returns ``cfg``."""
    problems = []
    for section, registry, name, options, typed in _sections(cfg):
        if name not in registry:
            close = difflib.get_close_matches(name, registry.names(), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            key = section if section.startswith("hooks.") else f"{section}.name"
            problems.append(
                f"'{key}': no {registry.kind} named {name!r}.{hint} Available: "
                f"{', '.join(registry.names())}."
            )
            continue
        accepted = registry.option_names(name, options)
        unknown = [] if accepted is None else [k for k in options if k not in accepted]
        for key in unknown:
            problems.append(
                _unknown_key(
                    key,
                    section,
                    typed | (accepted or set()),
                    f"{section} with {registry.kind} {name!r}",
                )
            )
        if not unknown:
            try:
                registry.check_options(name, options, section)
            except ConfigError as err:
                problems.append(str(err).removesuffix(_FIX).strip())
    if problems:
        raise ConfigError(
            f"Invalid {where}: "
            + " ".join(problems)
            + " Fix the key in the YAML file or the key=value override."
        )
    return cfg


LISTED: Dict[str, Registry] = {
    **REGISTRIES,
    "hooks": HOOKS,
    "model.backbone": BACKBONES,
    "model.neck": NECKS,
    "model.head": HEADS,
    "model.tuning": TUNINGS,
}


def _summary(entry: Any) -> str:
    """The first sentence of the component's docstring (of its builder for a registered record)."""
    target = getattr(entry, "build", entry) if not isinstance(entry, type) else entry
    doc = inspect.getdoc(target) or inspect.getdoc(inspect.getmodule(target)) or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    end = first.find(". ")
    return first if end < 0 else first[: end + 1]


def describe_components(section: Optional[str] = None) -> List[Dict[str, Any]]:
    """Every registered component a config can name: its section, name, option keys (None: it
    takes any and checks them itself) and the first line of its docstring."""
    out = []
    for key, registry in LISTED.items():
        if section is not None and key != section and not key.startswith(section + "."):
            continue
        for name in registry.names():
            options = registry.option_names(name, {})
            out.append(
                {
                    "section": key,
                    "name": name,
                    "options": None if options is None else sorted(options),
                    "summary": _summary(registry.get(name)),
                }
            )
    return out
