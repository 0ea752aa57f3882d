"""BKD — Balanced Knowledge Distillation (Zhang, Chen, Hu, Peng, Neurocomputing 2023, arXiv
2104.10510): a frozen teacher run distils into the student through a class-balanced target::

    L = base(z_s, y) + alpha * T^2 * mean_i KL(p~_t || softmax(z_s / T))
    p_t = softmax(s * z_t / T),  p~_{t,c} = w_c p_{t,c} / sum_j w_j p_{t,j}      (renorm)
    kd_i = sum_c w_c p_{t,c} log(p_{t,c} / p_{s,c})                               (weighted_kl)

z [B, C] logits, base the run's ``loss`` (plain CE: instance-balanced), s the teacher run's
recorded ``logit_scale`` (a cosine-loss teacher), w = class_balanced_weights(n, beta) from epoch
``reweight_epoch`` on (w = 1 before: plain KD). ``method.teacher`` names a finished run folder;
its model is rebuilt from its own saved config. Options and readings: docs/methods/bkd.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Dict, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from longtail.core.distributed import all_reduce_sum
from longtail.core.errors import ConfigError, LongtailError
from longtail.core.metrics import MetricAccumulator
from longtail.core.modules import load_fitting_state
from longtail.core.run_folder import RunFolder
from longtail.data.loader import Batch
from longtail.losses.base import class_balanced_weights
from longtail.methods.base import METHODS, Method, MethodContext
from longtail.methods.decoupled import data_diffs, eval_outputs
from longtail.models.build import build_model

Variant = Literal["renorm", "weighted_kl"]
# the evaluation numbers recorded for the teacher (those of the student's metrics.json)
TEACHER_METRICS = ("top1", "top5", "many", "medium", "few", "mean_class_acc", "ece", "nll")


# ---------------------------------------------------------------------------------------------
# the distillation term


def balanced_target(
    teacher_logits: torch.Tensor, temperature: float, weight: Optional[torch.Tensor]
) -> torch.Tensor:
    """p~_t [B, C]: softmax(z_t / T), re-weighted by ``weight`` [C] and renormalised per row
    (``weight`` None: the plain softened teacher distribution)."""
    p = F.softmax(teacher_logits.float() / temperature, dim=1)
    if weight is None:
        return p
    p = p * weight.to(p)
    return p / p.sum(dim=1, keepdim=True)


def distillation_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    weight: Optional[torch.Tensor] = None,
    variant: Variant = "renorm",
) -> torch.Tensor:
    """Per-sample KD term [B] in float32, before T^2: ``KL(p~_t || p_s)`` (renorm) or
    ``sum_c w_c p_{t,c} log(p_{t,c} / p_{s,c})`` (weighted_kl); the same with ``weight`` None."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    if variant == "renorm":
        target = balanced_target(teacher_logits, temperature, weight)
        return F.kl_div(log_q, target, reduction="none").sum(dim=1)
    per_class = F.kl_div(
        log_q, balanced_target(teacher_logits, temperature, None), reduction="none"
    )
    if weight is not None:
        per_class = per_class * weight.to(per_class)
    return per_class.sum(dim=1)


# ---------------------------------------------------------------------------------------------
# the teacher run


@dataclass
class Teacher:
    """A finished run used as the teacher: its folder, rebuilt frozen model and logit scale."""

    run_dir: Path
    model: nn.Module
    logit_scale: float
    config: Dict[str, Any]


def _usage(cfg) -> str:
    data = str(cfg.data.dataset).replace("-", "_")  # cifar10-lt -> configs/datasets/cifar10_lt.yaml
    return (
        f"Train the teacher first and pass its run folder, e.g. `longtail train "
        f"configs/methods/ce.yaml data={data} --out runs/ce` then `longtail train "
        f"configs/methods/bkd.yaml data={data} method.teacher=runs/ce`."
    )


def check_teacher_data(cfg, saved: Dict[str, Any], teacher: str) -> None:
    """LongtailError unless the teacher run (its saved config tree) trained on this training set
    (the data options of decoupled.DATA_KEYS, as a stage-1 run is checked)."""
    diffs = data_diffs(cfg, saved)
    if diffs:
        listed = "; ".join(f"data.{k}: teacher {o!r}, this run {m!r}" for k, o, m in diffs)
        fix = " ".join(f"data.{k}={m}" for k, _, m in diffs)
        raise LongtailError(
            f"method.teacher={teacher} was trained on another training set than this bkd run "
            f"({listed}). The teacher distils on this run's images and classes: train it with "
            f"the same data options (add `{fix}` to its command) or pass a matching teacher run."
        )


def _finished_folder(cfg, teacher: str) -> RunFolder:
    folder = RunFolder(Path(teacher).expanduser())
    if not folder.path.is_dir():
        raise LongtailError(f"method.teacher={teacher}: no such folder. {_usage(cfg)}")
    if not folder.is_run():
        raise LongtailError(
            f"method.teacher={teacher} is not a run folder (no {folder.CONFIG}). {_usage(cfg)}"
        )
    stages = folder.config_tree().get("stages")
    if stages:  # a multi-stage run: its model is its last stage's (engine/pipeline.py)
        return _finished_folder(cfg, str(folder.path / str(stages[-1]["name"])))
    if not (folder.is_finished() and folder.has_weights()):
        if folder.has_checkpoint():
            raise LongtailError(
                f"method.teacher={teacher} has not finished (no {folder.METRICS} / "
                f"{folder.WEIGHTS}, only {folder.CHECKPOINT}). Finish it with `longtail train "
                f"--resume {teacher}`, then train the student again."
            )
        raise LongtailError(
            f"method.teacher={teacher} has not finished (no {folder.WEIGHTS} or "
            f"{folder.METRICS}). {_usage(cfg)}"
        )
    return folder


def load_teacher(cfg, teacher: Optional[str], num_classes: int, in_chans: int) -> Teacher:
    """Rebuild the finished run ``teacher`` (its own model config, final weights) on the CPU,
    frozen and in eval mode; LongtailError when it is missing, unfinished, trained on other data
    or for another number of classes. The global RNG is left as it was."""
    if not teacher:
        raise ConfigError(
            f"method.name=bkd distils a finished teacher run, but 'method.teacher' is not set. "
            f"{_usage(cfg)}"
        )
    folder = _finished_folder(cfg, str(teacher))
    saved = folder.config_tree()
    check_teacher_data(cfg, saved, str(teacher))
    metrics = folder.read_metrics()
    if metrics is None:
        raise LongtailError(
            f"method.teacher={teacher}: {folder.metrics_path} cannot be read. Train the teacher "
            f"again."
        )
    counts = metrics.get("class_counts")
    if isinstance(counts, list) and len(counts) != num_classes:
        raise LongtailError(
            f"method.teacher={teacher} predicts {len(counts)} classes, this run has "
            f"{num_classes}. Pass a teacher trained on this dataset. {_usage(cfg)}"
        )
    scale = metrics.get("logit_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise LongtailError(
            f"method.teacher={teacher}: {folder.METRICS} records logit_scale={scale!r}, not a "
            f"positive number. Train the teacher again."
        )
    try:
        teacher_cfg = folder.load_config()
    except LongtailError as err:
        raise LongtailError(f"method.teacher={teacher}: {err}") from None
    weights = folder.load_weights()
    with torch.random.fork_rng(devices=[]):  # the student's run draws what it would without BKD
        model = build_model(teacher_cfg.model, num_classes, in_chans)
    try:
        load_fitting_state(model, weights, str(folder.weights_path))
    except LongtailError as err:
        raise LongtailError(f"method.teacher={teacher}: {err}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return Teacher(folder.path, model, float(scale), saved)


# ---------------------------------------------------------------------------------------------
# the method


@METHODS.register("bkd")
class BalancedKnowledgeDistillation(Method):
    """Distil the frozen ``teacher`` run into the student with a class-balanced KD target.

    Options:
        teacher: a finished run folder (any model; same training data and classes).
        alpha: weight of the KD term (0: exactly the base loss, no teacher forward).
        temperature: T of both softmaxes; the term is multiplied by T^2.
        beta: effective-number beta of the class weights w.
        reweight_epoch: 0-based epoch from which w is used (before: w = 1, plain KD); None never.
        variant: ``renorm`` (re-weighted, renormalised target: the reference code) or
            ``weighted_kl`` (per-class weighted KL, no renormalisation: the paper's formula).
    """

    def __init__(
        self,
        ctx: MethodContext,
        teacher: Optional[str] = None,
        alpha: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 1.0,
        temperature: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 2.0,
        beta: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9999,
        reweight_epoch: Optional[Annotated[int, Field(ge=0)]] = 0,
        variant: Variant = "renorm",
    ):
        if variant not in ("renorm", "weighted_kl"):
            raise ConfigError(f"method.variant={variant!r}: use renorm or weighted_kl.")
        if ctx.data is None:
            raise ConfigError("method.name=bkd needs the run's data (MethodContext.data).")
        self.teacher_path = teacher
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.beta, self.reweight_epoch, self.variant = float(beta), reweight_epoch, variant
        super().__init__(ctx)  # setup_model loads the teacher
        self.class_weight = class_balanced_weights(ctx.class_counts, self.beta).to(self.device)
        self.weight: Optional[torch.Tensor] = self._weight_at(0)
        self._kd_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._kd_count = 0
        self._pending = 0  # samples of this step still to record (not SAM's second closure)
        self._cache: Optional[Dict[Any, torch.Tensor]] = None  # teacher logits within one step
        self._teacher_metrics: Optional[Dict[str, Any]] = None

    # -- model -------------------------------------------------------------------------------
    def setup_model(self, model: nn.Module) -> None:
        data = self.ctx.data
        t = load_teacher(self.cfg, self.teacher_path, len(self.ctx.class_counts), data.in_channels)
        fmt = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        teacher = t.model.to(self.device, memory_format=fmt)  # type: ignore[call-overload]
        self.teacher: nn.Module = teacher
        self.teacher_dir, self.teacher_scale = t.run_dir, t.logit_scale
        self.teacher_config = t.config

    def _weight_at(self, epoch: int) -> Optional[torch.Tensor]:
        on = self.reweight_epoch is not None and epoch >= self.reweight_epoch
        return self.class_weight if on else None

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's float32 logits (x its run's logit scale), under the run's autocast."""
        with self.autocast():
            z = self.teacher(images).logits
        return z.float() * self.teacher_scale

    # -- the step ----------------------------------------------------------------------------
    def compute_loss(self, batch: Batch) -> torch.Tensor:
        if self.alpha == 0:
            return super().compute_loss(batch)
        key = (batch.images.data_ptr(), tuple(batch.images.shape))
        z_t = self._cache.get(key) if self._cache is not None else None
        if z_t is None:
            z_t = self.teacher_logits(batch.images)
            if self._cache is not None:  # sam / rsam evaluate the step's closure twice
                self._cache[key] = z_t
        with self.autocast():
            out = self.train_model(batch.images)
        z_s = out.logits.float()
        base = self.loss(z_s, batch.labels)
        with torch.autocast(self.device.type, enabled=False):
            kd = distillation_terms(z_s, z_t, self.temperature, self.weight, self.variant)
            kd = kd.mean() * self.temperature**2
        n = batch.labels.numel()
        if self._pending >= n:  # the step's first evaluation, at the current weights
            self._kd_sum += kd.detach().double() * n
            self._kd_count += n
            self._pending -= n
        return base + self.alpha * kd

    def train_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        self._pending, self._cache = batch.labels.numel(), {}
        try:
            return {"loss": self.optim.update(self.compute_loss, batch)}
        finally:
            self._pending, self._cache = 0, None

    # -- hooks -------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.teacher.eval()
        self.weight = self._weight_at(epoch)
        self._kd_sum.zero_()
        self._kd_count = 0

    def on_epoch_end(self, epoch: int) -> Dict[str, float]:
        if self.alpha == 0:
            return {}
        both = torch.stack(
            [self._kd_sum.cpu(), torch.tensor(float(self._kd_count), dtype=torch.float64)]
        )
        all_reduce_sum(both, self.ctx.dist)
        if both[1] == 0:
            return {}
        return {"kd_loss": float(both[0] / both[1])}

    def evaluate_teacher(self) -> Dict[str, Any]:
        """The teacher's test / val metrics on this run's splits (the evaluation's batches,
        autocast and numbers; DDP ranks evaluate shards and all-reduce the sums)."""
        data, dist = self.ctx.data, self.ctx.dist
        out: Dict[str, Any] = {
            "run": str(self.teacher_dir),
            "logit_scale": self.teacher_scale,
            "model": {k: self.teacher_config.get("model", {}).get(k) for k in ("backbone", "head")},
        }
        for split in ("test", "val"):
            subset = getattr(data, split, None)
            if subset is None or len(subset) == 0:
                continue
            acc = MetricAccumulator(len(data.class_counts))
            for o, y in eval_outputs(
                self, subset.images, subset.labels, model=self.teacher, sharded=True
            ):
                acc.update(o.logits.float() * self.teacher_scale, y)
            metrics = acc.reduce(dist).compute(data.class_counts)
            out[split] = {k: metrics[k] for k in TEACHER_METRICS}
        return out

    def extra_metrics(self) -> Dict[str, Any]:
        if self._teacher_metrics is None:
            self._teacher_metrics = self.evaluate_teacher()
        options: Dict[str, Any] = {
            "alpha": self.alpha,
            "temperature": self.temperature,
            "beta": self.beta,
            "reweight_epoch": self.reweight_epoch,
            "variant": self.variant,
        }
        return {"teacher": self._teacher_metrics, "bkd": options}
