"""Joint end-to-end training of a routed multi-expert model ([PROPOSED] reading of the MoE of Zhao,
Chen, Tan, Huang, Zhu, arXiv 2104.06094 v1: the loss on each expert and on the fused logits).
Formula, with z = sum_e r_e(x) z_e the routed logits of ``model.experts = E > 1``:

    L = fused_weight * loss(z, y) + expert_weight * (1/E) sum_e loss(z_e, y)

``loss`` is the configured loss (ALA in configs/methods/ala_moe.yaml). metrics.json gains each
expert's test accuracy, the router's mean weights per shot group and the compute cost:
docs/methods/experts.md.
"""

from __future__ import annotations

from typing import Annotated, Any, Dict, List, Optional

import torch
import torch.nn as nn
from pydantic import Field

from longtail.core.distributed import all_reduce_sum
from longtail.core.errors import ConfigError
from longtail.core.metrics import MetricAccumulator, shot_groups
from longtail.data.loader import Batch
from longtail.methods.base import METHODS, Method, MethodContext
from longtail.methods.decoupled import eval_outputs
from longtail.models.experts import compute_cost

Weight = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
GROUPS = ("many", "medium", "few")


def _no_experts_error(what: str) -> ConfigError:
    return ConfigError(
        f"method.name=experts trains a multi-expert model, but {what}. Set model.experts to "
        f"the number of experts (> 1; configs/methods/ala_moe.yaml uses 3)."
    )


@METHODS.register("experts")
class ExpertsMethod(Method):
    """The loss on the routed logits and on every expert's logits, one optimiser step over all
    (trunk, experts, heads, router). Options: ``fused_weight``, ``expert_weight`` (both 1)."""

    def __init__(self, ctx: MethodContext, fused_weight: Weight = 1.0, expert_weight: Weight = 1.0):
        for key, value in (("fused_weight", fused_weight), ("expert_weight", expert_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"'method.{key}' must be a number >= 0, got {value!r}.")
        if fused_weight == 0 and expert_weight == 0:
            raise ConfigError(
                "method.fused_weight and method.expert_weight are both 0: nothing would be "
                "trained. Give at least one a positive weight (both 1 by default)."
            )
        self.fused_weight, self.expert_weight = float(fused_weight), float(expert_weight)
        super().__init__(ctx)

    def setup_model(self, model: nn.Module) -> None:
        if not callable(getattr(model, "forward_expert", None)):
            raise _no_experts_error(f"model.experts={self.cfg.model.experts} builds a single path")

    # -- the step --------------------------------------------------------------------------------
    def compute_loss(self, batch: Batch) -> torch.Tensor:
        with self.autocast():
            out = self.train_model(batch.images)
        expert_logits = out.extras.get("expert_logits")
        if expert_logits is None:
            raise _no_experts_error("the model's output has no 'expert_logits'")
        total = torch.zeros((), device=out.logits.device)
        if self.fused_weight:
            total = total + self.fused_weight * self.loss(out.logits.float(), batch.labels)
        if self.expert_weight:
            per_expert = [
                self.loss(expert_logits[:, e].float(), batch.labels)
                for e in range(expert_logits.shape[1])
            ]
            total = total + self.expert_weight * torch.stack(per_expert).mean()
        return total

    # -- reports ---------------------------------------------------------------------------------
    @torch.no_grad()
    def expert_report(self) -> Dict[str, Any]:
        """Test-split top-1 and many / medium / few of every expert and of the routed ensemble
        (outputs times the loss's logit scale, as the evaluation), and the router's mean weights
        over the test images of each shot group (by their class's training count)."""
        data, model, info = self.ctx.data, self.model, self.ctx.dist
        test = data.test
        counts = list(data.class_counts)
        num_classes = len(counts)
        num_experts = int(model.num_experts)  # type: ignore[arg-type]
        fn = self.eval_logits_fn()
        routed = MetricAccumulator(num_classes)
        experts = [MetricAccumulator(num_classes) for _ in range(num_experts)]
        # per class: sum of router weights [C, E] and images [C]
        weight_sums = torch.zeros(num_classes, num_experts, dtype=torch.float64)
        images = torch.zeros(num_classes, dtype=torch.float64)
        for out, y in eval_outputs(self, test.images, test.labels, sharded=True):
            logits, per_expert = out.logits.float(), out.extras["expert_logits"].float()
            if fn is not None:
                logits, per_expert = fn(logits), fn(per_expert)
            routed.update(logits, y)
            for e, acc in enumerate(experts):
                acc.update(per_expert[:, e], y)
            labels = y.cpu()
            weight_sums.index_add_(0, labels, out.extras["router_weights"].double().cpu())
            images += torch.bincount(labels, minlength=num_classes).double()
        all_reduce_sum(weight_sums, info)
        all_reduce_sum(images, info)

        def summary(acc: MetricAccumulator) -> Dict[str, Optional[float]]:
            m = acc.reduce(info).compute(counts)
            return {k: m[k] for k in ("top1", *GROUPS)}

        groups = shot_groups(counts)
        mean_weights: Dict[str, Optional[List[float]]] = {}
        for name, classes in (("all", list(range(num_classes))), *groups.items()):
            n = float(images[classes].sum()) if classes else 0.0
            mean_weights[name] = (
                [float(v) for v in weight_sums[classes].sum(0) / n] if n > 0 else None
            )
        return {
            "num_experts": num_experts,
            "fused_weight": self.fused_weight,
            "expert_weight": self.expert_weight,
            "per_expert": [summary(acc) for acc in experts],
            "routed": summary(routed),
            "router_mean_weights": mean_weights,
        }

    def extra_metrics(self) -> Dict[str, Any]:
        data = self.ctx.data
        if data is None:  # a method built without the run's data: nothing to evaluate on
            return {}
        shape = (int(data.in_channels), int(data.image_size), int(data.image_size))
        return {"experts": self.expert_report(), "compute": compute_cost(self.model, shape)}  # type: ignore[arg-type]
