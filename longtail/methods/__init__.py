"""Training strategies, registered by name (``method.name`` in the config)."""

from longtail.core.registry import import_submodules
from longtail.methods.base import METHODS, Method, MethodContext, build_method

import_submodules(__name__, __path__)  # every module registers its methods: a new one is a file

__all__ = ["METHODS", "Method", "MethodContext", "build_method"]
