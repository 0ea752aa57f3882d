"""Training strategies, registered by name (``method.name`` in the config)."""

from longtail.methods import erm  # noqa: F401  (registers)
from longtail.methods import decoupled, posthoc  # noqa: F401  (registers crt, lws, tau_norm, ncm, posthoc_la)
from longtail.methods import mfm  # noqa: F401  (registers mfm)
from longtail.methods import finetune  # noqa: F401  (registers finetune, residual)
from longtail.methods.base import METHODS, Method, MethodContext, build_method

__all__ = ["METHODS", "Method", "MethodContext", "build_method"]
