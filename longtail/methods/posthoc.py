"""Post-hoc logit adjustment (Menon et al., ICLR 2021) of a finished stage-1 run.

Predict ``argmax_c z_c - tau * log pi_c`` with pi the training class prior: no training
(``train.epochs: 0``). tau is picked on the ``val`` split by top-1 over a grid (default
0, 0.1, ..., 2.0, ties to the smaller tau; :func:`longtail.losses.select_tau`), or fixed with
``method.tau``. The tau in use is in the method state and is applied by ``eval_logits_fn``, so
``longtail eval RUN_DIR`` reproduces ``metrics.json``, which also reports the tau = 1 result
(the paper's default) next to the tuned one.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch

from longtail.core.metrics import MetricAccumulator
from longtail.losses import posthoc_adjust, select_tau
from longtail.methods.base import METHODS, MethodContext
from longtail.methods.decoupled import (
    Stage2Method,
    check_taus,
    eval_forward,
    load_stage1_weights,
    require_val,
)

SUMMARY_KEYS = ("top1", "many", "medium", "few", "mean_class_acc")


@METHODS.register("posthoc_la")
class PosthocLogitAdjustment(Stage2Method):
    """Post-hoc logit adjustment of the stage-1 model (its weights are loaded unchanged).

    Options:
        tau: fix tau (e.g. 1.0); None (default) uses the tau picked on val.
        taus: the grid searched on val (default 0, 0.1, ..., 2.0).
    """

    name = "posthoc_la"
    recipe = "la_posthoc"  # configs/methods/la_posthoc.yaml
    trains = False

    def __init__(
        self, ctx: MethodContext, tau: Optional[float] = None, taus: Optional[List[float]] = None
    ):
        self.grid, self.fixed_tau = check_taus(taus, tau, "posthoc_la")
        self.tau: Optional[float] = None
        self.info: Dict[str, Any] = {}
        super().__init__(ctx)

    def setup_model(self, model) -> None:
        load_stage1_weights(self.cfg, model, self.stage1())

    def _summaries(self, split_logits, tau: float) -> Dict[str, Any]:
        out = {}
        for split, batches in split_logits.items():
            acc = MetricAccumulator(len(self.ctx.class_counts))
            for logits, labels in batches:
                acc.update(posthoc_adjust(logits, self.ctx.class_counts, tau), labels)
            m = acc.compute(self.ctx.class_counts)
            out[split] = {k: m[k] for k in SUMMARY_KEYS}
        return out

    def on_train_end(self) -> None:
        data = self.ctx.data
        val = data.val
        split_logits = {}
        for split in ("test", "val"):
            subset = getattr(data, split)
            if subset is not None and len(subset):
                split_logits[split] = [
                    (z, y) for _, z, y in eval_forward(self, subset.images, subset.labels)
                ]
        tuned, table = None, []
        if "val" in split_logits:
            logits = torch.cat([z for z, _ in split_logits["val"]])
            tuned, rows = select_tau(logits, val.labels, self.ctx.class_counts, self.grid)
            table = [{"tau": t, "val_top1": 100.0 * a} for t, a in rows]
        elif self.fixed_tau is None:
            require_val(self, self.name)
        self.tau = self.fixed_tau if self.fixed_tau is not None else tuned
        self.info = {
            "tau": self.tau,
            "tau_source": "val" if self.fixed_tau is None else "method.tau",
            "tau_tuned": tuned,
            "tau_table": table,
            # reported only (never used to choose): the paper's tau = 1 and the val-tuned tau
            "posthoc_tau1": self._summaries(split_logits, 1.0),
            "posthoc_tuned": self._summaries(split_logits, tuned) if tuned is not None else None,
        }

    def eval_logits_fn(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        if self.tau is None:
            return None
        counts, tau = list(self.ctx.class_counts), float(self.tau)
        return lambda logits: posthoc_adjust(logits, counts, tau)

    def extra_metrics(self) -> Dict[str, Any]:
        return dict(self.info)

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["posthoc_la"] = {"tau": self.tau, "info": self.info}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state.get("posthoc_la") or {}
        self.tau, self.info = saved.get("tau"), dict(saved.get("info") or {})
