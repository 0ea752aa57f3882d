"""Training hooks, registered by name (``hooks:`` in the config)."""

from longtail.hooks import mlrsnet  # noqa: F401  (registers mlrsnet)
from longtail.hooks.base import HOOKS, Hook, build_hooks

__all__ = ["HOOKS", "Hook", "build_hooks"]
