"""Empirical risk minimisation: end-to-end training with the configured loss and sampler.

min_theta E_(x,y)~sampler [ loss(f_theta(x), y) ] — the plain baseline every other method extends.
"""

from longtail.methods.base import METHODS, Method, MethodContext


@METHODS.register("erm")
class ERM(Method):
    """End-to-end training; everything is in :class:`Method`."""

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
