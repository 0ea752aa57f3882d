"""Fine-tuning a previous run: the later stages of the three-stage strategy (Li, Tan, Pan, arXiv
2104.09830, 2021) that train the WHOLE model from the run folder ``stage1`` (checked as
:func:`longtail.methods.decoupled.load_stage1` does), with a fresh optimiser.

``finetune``: train the whole model from ``stage1`` (stage 3a, with a balanced sampler).
``residual``: the same on the residual set (``data.exclude_classes``): the removed classes' logits
are -inf in the training loss only (a (C - k)-way loss, head still C-way; stage 2)::

    z_c <- -inf for c in excluded;  L = loss(z, y)   (evaluation: all C logits, raw head)

Details, and why the loss keeps the full class counts: docs/methods/three_stage.md.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from longtail.core.errors import ConfigError, LongtailError
from longtail.methods.base import METHODS, MethodContext
from longtail.methods.decoupled import Stage1, Stage2Method, load_stage1, load_stage1_weights


def mask_logits(logits: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``logits`` [B, C] with the columns where ``masked`` [C] (bool) is True set to -inf.

    ``masked_fill`` passes no gradient to the filled entries, and softmax gives them probability
    exactly 0 (so CE over the rest equals CE on the unmasked columns alone)."""
    return logits.masked_fill(masked.to(logits.device), float("-inf"))


@METHODS.register("finetune")
class FineTune(Stage2Method):
    """Initialise the whole model (head included) from the ``stage1`` run and train all of it."""

    name = "finetune"

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)

    def stage1(self) -> Stage1:
        if not self.cfg.stage1:
            raise LongtailError(
                f"method.name={self.name} fine-tunes a previous run, but the top-level key `stage1` "
                f"is not set. Run it as a stage of a pipeline (e.g. `longtail train "
                f"configs/methods/three_stage.yaml data=cifar10_lt`), or pass stage1=RUN_DIR of a "
                f"finished run."
            )
        return load_stage1(self.cfg, self.name)

    def setup_model(self, model: nn.Module) -> None:
        load_stage1_weights(self.cfg, model, self.stage1())


@METHODS.register("residual")
class ResidualFineTune(FineTune):
    """``finetune`` on the residual set: the logits of the classes ``data.exclude_classes``
    removed from the training set are masked to -inf before the loss."""

    name = "residual"

    def __init__(self, ctx: MethodContext):
        excluded = list(getattr(ctx.data, "excluded_classes", ()) or ())
        if not excluded:
            raise ConfigError(
                "method.name=residual trains on the residual set and masks the removed "
                "classes' logits, but no class is removed: set data.exclude_classes "
                "('largest' or a list of class ids)."
            )
        self.excluded: List[int] = excluded
        masked = torch.zeros(len(ctx.class_counts), dtype=torch.bool)
        masked[excluded] = True
        self.masked = masked.to(ctx.device)
        super().__init__(ctx)

    def compute_loss(self, batch) -> torch.Tensor:
        with self.autocast():
            out = self.train_model(batch.images)
        return self.loss(mask_logits(out.logits.float(), self.masked), batch.labels)

    def extra_metrics(self):
        return {"masked_classes": list(self.excluded)}
