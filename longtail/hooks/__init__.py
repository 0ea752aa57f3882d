"""Training hooks, registered by name (``hooks:`` in the config)."""

from longtail.core.registry import import_submodules
from longtail.hooks.base import HOOKS, Hook, build_hooks

import_submodules(__name__, __path__)  # every module registers its hooks: a new one is a file

__all__ = ["HOOKS", "Hook", "build_hooks"]
