"""MFS, memory-augmented feature sampling (Feng, Zhong, Huang, ICCV 2021; LOCE), adapted to image
classification; used with the equilibrium loss (``loss.name=ebl``), whose running class scores
s_c it reads.

Per-class FIFO queues of detached head inputs (features [C, Q, D], fill counts, write pointers).
Each step: draw ``sampled_num_classes`` classes with replacement, P(c) ∝ 1 / (s_c + 1e-7) over the
classes whose queue is non-empty, then ``sampled_num_features`` features of each uniformly with
replacement from its queue; the head sees them after the batch::

    logits = head(cat(features(x), memory));  L = EBL(logits, cat(y, memory classes))

``mode``: decoupled (stage-1 backbone and neck frozen, fresh head, queues pre-filled by one pass
over the training set) | end_to_end (everything trains from epoch 0, queues filled as it goes).
Options, order of the updates, checkpoint contents: docs/methods/equilibrium.md.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Dict, Iterable, Literal, Tuple, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from longtail.core.distributed import all_reduce_sum
from longtail.core.errors import ConfigError
from longtail.data.loader import Batch
from longtail.methods.base import METHODS, Method, MethodContext
from longtail.methods.decoupled import (
    eval_forward,
    feature_dim,
    freeze_features,
    fresh_head,
    load_stage1,
    load_stage1_weights,
)
from longtail.models.classifier import Classifier

#: added to s_c before inverting it (the reference's 10e-8)
INVERSE_EPS = 1e-7
MODES = ("decoupled", "end_to_end")


def memory_seed(seed: int, rank: int) -> int:
    """The seed of a rank's MFS generator: its own stream, independent of torch's global one."""
    return int(np.random.SeedSequence([int(seed), int(rank), 0x4D4653]).generate_state(1)[0])


class FeatureMemory:
    """Per-class FIFO queues of features, and the class-then-feature sampler of MFS.

    ``features`` [C, Q, D] float32 (slot j of class c valid iff j < ``fill[c]``), ``fill`` and
    ``ptr`` (next slot to write) int64 [C], all on ``device``; the draws come from ``generator``
    (a torch.Generator on ``device``). One more slot per class, never read, takes the features a
    batch drops (more than Q of one class): the enqueue runs on the device without a host sync.
    """

    def __init__(
        self, num_classes: int, queue_size: int, dim: int, device: torch.device, seed: int
    ):
        self.num_classes, self.queue_size, self.dim = int(num_classes), int(queue_size), int(dim)
        self.device = torch.device(device)
        self._slots = torch.zeros(num_classes, queue_size + 1, dim, device=self.device)
        self.fill = torch.zeros(num_classes, dtype=torch.long, device=self.device)
        self.ptr = torch.zeros(num_classes, dtype=torch.long, device=self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.any_filled = False  # host-side: no draw (and no sync) while every queue is empty

    @property
    def features(self) -> torch.Tensor:
        """The queues [C, Q, D] (a view)."""
        return self._slots[:, : self.queue_size]

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Push features [B, D] of classes labels [B] in batch order; a class keeps its last Q."""
        if labels.numel() == 0:
            return
        q = self.queue_size
        labels = labels.to(self.device).long()
        onehot = F.one_hot(labels, self.num_classes)
        n = onehot.sum(0)  # [C] this batch's count per class
        rank = (onehot.cumsum(0) - 1).gather(1, labels.view(-1, 1)).squeeze(1)  # order in class
        skip = (n - q).clamp_min(0)[labels]  # the first n_c - Q of a class would be overwritten
        kept = rank >= skip
        slot = torch.where(kept, (self.ptr[labels] + rank - skip) % q, torch.full_like(rank, q))
        self._slots[labels, slot] = features.detach().to(self._slots.device, torch.float32)
        written = n.clamp_max(q)
        self.ptr = (self.ptr + written) % q
        self.fill = (self.fill + written).clamp_max(q)
        self.any_filled = True

    def class_probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """P(c) ∝ 1 / (s_c + 1e-7) over the classes with a non-empty queue, float64 [C]."""
        inverse = 1.0 / (scores.detach().to(self.device, torch.float64) + INVERSE_EPS)
        weights = torch.where(self.fill > 0, inverse, torch.zeros_like(inverse))
        return weights / weights.sum()

    @torch.no_grad()
    def sample_classes(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """k classes int64 [k], drawn with replacement by :meth:`class_probabilities`."""
        if k == 0 or not self.any_filled:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        return torch.multinomial(
            self.class_probabilities(scores), k, replacement=True, generator=self.generator
        )

    @torch.no_grad()
    def sample(
        self, scores: torch.Tensor, k: int, per_class: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(features [k * per_class, D] float32, labels [k * per_class]): k classes, then
        ``per_class`` of each one's stored features uniformly with replacement."""
        classes = self.sample_classes(scores, k if per_class > 0 else 0)
        if classes.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long, device=self.device)
            return self._slots.new_zeros(0, self.dim), empty
        fill = self.fill[classes].unsqueeze(1)  # [k, 1], >= 1
        u = torch.rand(
            (classes.numel(), per_class),
            generator=self.generator,
            device=self.device,
            dtype=torch.float64,
        )
        slot = torch.minimum((u * fill).long(), fill - 1)
        rows = classes.unsqueeze(1).expand_as(slot)
        return self._slots[rows, slot].reshape(-1, self.dim), rows.reshape(-1)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "features": self.features.detach().cpu().clone(),
            "fill": self.fill.cpu().clone(),
            "ptr": self.ptr.cpu().clone(),
            "any_filled": self.any_filled,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        shape = tuple(state["features"].shape)
        if shape != tuple(self.features.shape):
            raise ValueError(
                f"the saved MFS queues have shape {list(shape)}, this run's "
                f"{list(self.features.shape)} (classes, queue_size, feature dim)"
            )
        self.features.copy_(state["features"].to(self.device))
        self.fill.copy_(state["fill"].to(self.device))
        self.ptr.copy_(state["ptr"].to(self.device))
        self.any_filled = bool(state["any_filled"])
        self.generator.set_state(state["generator"].cpu())


@METHODS.register("mfs")
class MemoryFeatureSampling(Method):
    """MFS with the EBL class scores; see the module docstring and docs/methods/equilibrium.md."""

    name = "mfs"
    recipe = "ebl_mfs"  # configs/methods/ebl_mfs.yaml (named in the stage-1 hints)

    def __init__(
        self,
        ctx: MethodContext,
        mode: Literal["decoupled", "end_to_end"] = "decoupled",
        queue_size: Annotated[int, Field(ge=1)] = 80,
        sampled_num_classes: Annotated[int, Field(ge=0)] = 8,
        sampled_num_features: Annotated[int, Field(ge=0)] = 4,
        memory_instances: Literal["class", "feature"] = "class",
    ):
        if mode not in MODES:
            raise ConfigError(
                f"method.mode={mode!r}: use decoupled (a stage-1 run, frozen features, fresh "
                f"head: configs/methods/ebl_mfs.yaml) or end_to_end (ebl_mfs_e2e.yaml)."
            )
        for key, value, low in (
            ("queue_size", queue_size, 1),
            ("sampled_num_classes", sampled_num_classes, 0),
            ("sampled_num_features", sampled_num_features, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"'method.{key}' must be an integer >= {low}, got {value!r}.")
        if memory_instances not in ("class", "feature"):
            raise ConfigError(
                f"method.memory_instances={memory_instances!r}: use class (the memory features "
                f"of a class drawn in a step update s as one instance, as the reference) or "
                f"feature (each one counts)."
            )
        num_classes = len(ctx.class_counts)
        scores = getattr(ctx.loss, "class_scores", None)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (num_classes,):
            raise ConfigError(
                f"method.name=mfs draws memory classes by the loss's running class scores "
                f"(1 / s_c), but loss.name={ctx.cfg.loss.name} keeps none (no class_scores "
                f"tensor of {num_classes} entries): use loss.name=ebl (the equilibrium loss; "
                f"configs/methods/ebl_mfs.yaml and ebl_mfs_e2e.yaml set it)."
            )
        if "score_weights" not in inspect.signature(ctx.loss.forward).parameters:
            raise ConfigError(
                f"method.name=mfs weighs the memory features in the update of the class scores "
                f"(loss(logits, targets, score_weights=...)), which loss.name={ctx.cfg.loss.name} "
                f"does not take: use loss.name=ebl."
            )
        self.mode = mode
        self.memory_instances = memory_instances
        self.decoupled = mode == "decoupled"
        self.sampled_num_classes, self.sampled_num_features = (
            sampled_num_classes,
            sampled_num_features,
        )
        super().__init__(ctx)  # setup_model: stage 1 and the fresh head (decoupled)
        self.memory = FeatureMemory(
            num_classes,
            queue_size,
            feature_dim(self.model),
            self.device,
            memory_seed(ctx.cfg.seed, ctx.dist.rank),
        )
        self.prefilled = not self.decoupled  # end_to_end: queues fill as training goes
        self.steps = 0
        self.sampled = torch.zeros(num_classes, dtype=torch.long)  # all ranks, finished epochs
        self._epoch_sampled = torch.zeros(num_classes, dtype=torch.long, device=self.device)

    @property
    def class_scores(self) -> torch.Tensor:
        """The loss's running class scores s [C] (checked in ``__init__``)."""
        return cast(torch.Tensor, self.loss.class_scores)

    @property
    def net(self) -> Classifier:
        """The bare model, typed (backbone -> neck -> head)."""
        return cast(Classifier, self.model)

    # -- model -------------------------------------------------------------------------------
    def setup_model(self, model: nn.Module) -> None:
        if not self.decoupled:
            return
        load_stage1_weights(self.cfg, model, load_stage1(self.cfg, self.name), skip_head=True)
        freeze_features(model)
        model.head = fresh_head(self.cfg, model, len(self.ctx.class_counts))

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        if self.decoupled:
            return [p for p in self.net.head.parameters() if p.requires_grad]
        return super().trainable_parameters()

    @torch.no_grad()
    def prefill(self) -> None:
        """One pass over the training images (evaluation path: not augmented) into the queues:
        each class's queue ends with the features of its last min(n_c, Q) images."""
        train = self.ctx.data.train
        for features, _, labels in eval_forward(self, train.images, train.labels):
            self.memory.enqueue(features, labels)
        self.prefilled = True

    # -- hooks -------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        if not self.prefilled:
            self.prefill()
        if self.decoupled:
            self.net.neck.eval()  # the trainer's .train() switched it back; backbone stays eval
        self._epoch_sampled.zero_()

    def on_epoch_end(self, epoch: int) -> Dict[str, float]:
        counts = self._epoch_sampled.cpu()
        all_reduce_sum(counts, self.ctx.dist)
        self.sampled += counts
        scores = self.class_scores.detach().float().cpu()
        return {
            "mfs_memory_features": float(counts.sum()),
            "ebl_score_min": float(scores.min()),
            "ebl_score_max": float(scores.max()),
        }

    def extra_metrics(self) -> Dict[str, Any]:
        return {
            "mfs": {
                "mode": self.mode,
                "queue_size": self.memory.queue_size,
                "sampled_num_classes": self.sampled_num_classes,
                "sampled_num_features": self.sampled_num_features,
                "steps": self.steps,
                "class_scores": [float(s) for s in self.class_scores.detach().cpu()],
                "sampled_class_histogram": [int(n) for n in self.sampled],
                "queue_fill": [int(n) for n in self.memory.fill.cpu()],
            }
        }

    # -- the step ----------------------------------------------------------------------------
    def _logits(
        self, images: torch.Tensor, memory: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits [B + M, C], features [B, D]) of a batch followed by M memory features."""
        if self.train_model is not self.model:
            # DDP (or torch.compile): the batch goes through the wrapper, so DDP synchronises the
            # head's gradients; the memory through the bare head (the same per-sample map)
            with self.autocast():
                out = self.train_model(images)
                extra = self.net.head(memory.to(out.features.dtype))
            return torch.cat([out.logits.float(), extra.float()]), out.features
        with torch.set_grad_enabled(not self.decoupled and torch.is_grad_enabled()):
            with self.autocast():
                features = self.net.forward_features(images)
        with self.autocast():
            logits = self.net.head(torch.cat([features, memory.to(features.dtype)]))
        return logits.float(), features

    def memory_weights(self, labels: torch.Tensor) -> torch.Tensor:
        """The instances each memory feature counts as in the update of s, float64 [M]:
        ``class``: 1 / k_c for the k_c features of class c drawn this step; ``feature``: 1."""
        ones = torch.ones(labels.shape, dtype=torch.float64, device=labels.device)
        if self.memory_instances == "feature":
            return ones
        per_class = torch.zeros(
            len(self.ctx.class_counts), dtype=torch.float64, device=labels.device
        )
        per_class.index_add_(0, labels, ones)
        return ones / per_class[labels]

    def train_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        # the memory of this step is drawn once, before its forward (s and the queues as the
        # previous step left them), and split over micro-batches in proportion
        mem_x, mem_y = self.memory.sample(
            self.class_scores, self.sampled_num_classes, self.sampled_num_features
        )
        self._epoch_sampled.index_add_(0, mem_y, torch.ones_like(mem_y))
        mem_w = self.memory_weights(mem_y)
        parts = len(self.optim.micro_batches(batch))
        total = int(mem_y.numel())
        calls = 0

        def loss_fn(part: Batch) -> torch.Tensor:
            nonlocal calls
            i, first = calls % parts, calls < parts  # later closure calls (sam): no enqueue
            calls += 1
            lo, hi = total * i // parts, total * (i + 1) // parts
            logits, features = self._logits(part.images, mem_x[lo:hi])
            if first:
                self.memory.enqueue(features, part.labels)
            weights = torch.cat([torch.ones_like(part.labels, dtype=mem_w.dtype), mem_w[lo:hi]])
            labels = torch.cat([part.labels, mem_y[lo:hi]])
            return self.loss(logits, labels, score_weights=weights)

        loss = self.optim.update(loss_fn, batch)
        self.steps += 1
        return {"loss": loss}

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()  # the loss's class_scores
        state["mfs"] = {
            "memory": self.memory.state_dict(),
            "prefilled": self.prefilled,
            "steps": self.steps,
            "sampled": self.sampled.clone(),
        }
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        mine = state["mfs"]
        self.memory.load_state_dict(mine["memory"])
        self.prefilled, self.steps = bool(mine["prefilled"]), int(mine["steps"])
        self.sampled = mine["sampled"].clone().long()
        if self.ctx.dist.rank > 0:
            # the checkpoint holds rank 0's queues and generator: another rank re-seeds its own
            # stream (the straight run's draws are not restored under DDP)
            self.memory.generator.manual_seed(
                memory_seed(self.cfg.seed + self.steps, self.ctx.dist.rank)
            )
