"""Classifier initialised from class means of the (pretrained, frozen) features, LIFT's option
(Shi et al., ICML 2024): before training, w_c = mean of the L2-normalised features of class c's
training images (normalised again for a cosine head; a linear head's bias is zeroed).

``hooks: {class_mean_init: {}}`` (options: ``batch_size``). Runs once before the first epoch
on every rank (the same images in the same order: the same weights), not on resume (the
checkpoint holds the trained head). Features are those the head sees (after the neck), computed
in eval mode without gradients on the training split as the run's loader stores it (in-memory
sets unaugmented; a set on disk through its training transform).
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from longtail.core.errors import ConfigError
from longtail.data.loader import eval_batches
from longtail.hooks.base import HOOKS, Hook
from longtail.models.peft import class_mean_init


@HOOKS.register("class_mean_init")
class ClassMeanInit(Hook):
    def __init__(self, facts: Any, batch_size: int = 256):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(
                f"hooks.class_mean_init.batch_size must be a positive integer, got {batch_size!r}."
            )
        self.batch_size = batch_size
        self.counts: list = []

    def before_run(self, run: Any) -> None:
        model = run.method.model
        train = run.data.train
        was_training = model.training
        model.eval()
        feats, labels = [], []
        with torch.no_grad():
            for batch in eval_batches(
                train.images, train.labels, self.batch_size, run.data.mean, run.data.std, run.device
            ):
                feats.append(model.forward_features(batch.images).float())
                labels.append(batch.labels)
        model.train(was_training)
        counts = class_mean_init(model.head, torch.cat(feats), torch.cat(labels))
        self.counts = [int(c) for c in counts]

    def metrics(self, run: Any) -> Dict[str, Any]:
        return {"class_mean_init": {"classes_initialised": sum(c > 0 for c in self.counts)}}
