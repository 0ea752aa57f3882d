"""Class-balanced loss by effective number of samples (Cui et al., CVPR 2019) around any loss.
Formula: w_c = (1 - beta) / (1 - beta^{n_c}) normalised to sum C; L = base(z, y; w) with the base
loss's own weighting convention (``base: ce`` -> CE(z, y; w), ``base: focal`` -> Focal(z, y; w, gamma))."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Set

import torch
import torch.nn as nn
from pydantic import ValidationError

from longtail.core.errors import ConfigError
from longtail.core.registry import signature_model
from longtail.losses.base import LOSSES, Beta, Epoch, resolve_beta


@LOSSES.register("cb")
class ClassBalancedLoss(nn.Module):
    """Class-balanced weights on a registered base loss (``loss.base``, default ``ce``); the keys
    of ``loss`` that ``cb`` does not know are the base loss's options (e.g. ``gamma``).

    Logits [B, C] float and targets [B] int64 -> scalar. The base applies the weights as it does
    for DRW: ``ce`` with the weighted-mean convention ``sum_i w_{y_i} l_i / sum_i w_{y_i}``
    (``F.cross_entropy(weight=w)``, as LDAM-DRW's ``Reweight`` rule); ``focal`` per-sample weighted
    CE modulated by ``(1 - exp(-ce_i))^gamma``, plain mean.

    The weights are active from epoch 0. With ``drw_epoch`` set they are deferred instead: no
    weights before ``drw_epoch``, the same ``beta`` weights from then on (``drw_beta`` may be given
    but must then equal ``beta``).
    """

    registry_name = "cb"
    needs_class_counts = True
    requires_normalized_head = False  # per instance: the base loss's
    OWN = ("beta", "base", "drw_epoch", "drw_beta")

    @classmethod
    def option_names(cls, options: Dict[str, Any]) -> Optional[Set[str]]:
        """Its own options and those of the base loss it wraps."""
        base = options.get("base", "ce")
        names = LOSSES.option_names(base, {}) if base in LOSSES and base != "cb" else set()
        return None if names is None else set(cls.OWN) | names

    @classmethod
    def check_options(cls, options: Dict[str, Any], where: str) -> None:
        own = {k: v for k, v in options.items() if k in cls.OWN}
        model = signature_model(cls)
        if model is not None:
            try:
                model(**own)
            except ValidationError as err:
                raise ConfigError(
                    "; ".join(
                        f"'{where}.{e['loc'][0]}': {e['msg']} (got {e.get('input')!r})"
                        for e in err.errors()
                    )
                    + "."
                ) from None
        base = options.get("base", "ce")
        if base in LOSSES and base != "cb":
            LOSSES.check_options(
                base, {k: v for k, v in options.items() if k not in cls.OWN}, where
            )

    def __init__(
        self,
        class_counts: Optional[Sequence[float]] = None,
        beta: Beta = 0.9999,
        base: str = "ce",
        drw_epoch: Optional[Epoch] = None,
        drw_beta: Optional[Beta] = None,
        **base_options: Any,
    ):
        super().__init__()
        if base == self.registry_name:
            raise ConfigError(
                "'loss.base' cannot be 'cb' itself: name the loss to re-weight (e.g. ce or focal)."
            )
        if class_counts is None:
            raise ConfigError(
                "'loss.class_counts' is missing: the class-balanced weights are "
                "computed from the number of training images per class."
            )
        if base not in LOSSES:
            raise ConfigError(
                f"'loss.base' = {base!r} is not a registered loss; use one of "
                f"{', '.join(n for n in LOSSES.names() if n != self.registry_name)}."
            )
        beta = resolve_beta(beta, drw_beta, 0.9999, drw_epoch, "cb")
        # the base's own DRW switch carries the weights: from epoch 0, or from drw_epoch
        self.base_loss = LOSSES.build(
            base,
            class_counts=class_counts,
            key_prefix="loss.",
            drw_epoch=0 if drw_epoch is None else drw_epoch,
            drw_beta=beta,
            **base_options,
        )
        self.beta, self.base = beta, base
        self.drw_epoch = drw_epoch  # the run's re-weighting epoch (None: from the start)
        self.requires_normalized_head = getattr(self.base_loss, "requires_normalized_head", False)

    def __getattr__(self, name: str) -> Any:
        """The base loss's settings read through (``loss.gamma`` of a focal base)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_loss"), name)

    def set_epoch(self, epoch: int) -> None:
        self.base_loss.set_epoch(epoch)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.base_loss(logits, targets)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, base={self.base!r}, drw_epoch={self.drw_epoch}"
