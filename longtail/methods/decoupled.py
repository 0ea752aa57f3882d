"""Decoupled classifier learning on a frozen stage-1 representation (Kang et al., ICLR 2020,
facebookresearch/classifier-balancing): cRT, LWS, tau-normalisation and NCM.

A stage-2 run names its stage-1 run folder with the top-level key ``stage1`` (checked by
:func:`load_stage1`: same training set, fitting tensors); backbone and neck stay frozen::

    crt: fresh head, CE;  lws: z_c = f_c (w_c^T x + b_c);  tau_norm: w_c / |w_c|^tau (tau on val)
    ncm: z_c = cos(f(x), m_c), m_c the class mean of L2-normalised training features

``method.name``: crt | lws | tau_norm | ncm (the last two train nothing: ``train.epochs: 0``).
Details, defaults and our choices: docs/methods/decoupled.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from longtail.core.errors import ConfigError, LongtailError
from longtail.core.run_folder import RunFolder
from longtail.data.loader import eval_batches
from longtail.methods.base import METHODS, Method, MethodContext
from longtail.models.classifier import ModelOutput
from longtail.models.heads import LinearHead, LWSHead, NCMHead
from longtail.models.registry import HEADS

# data options that decide the training set: stage 2 must train on stage 1's images.
# data.exclude_classes is left out on purpose: it only removes whole classes from that same
# subset (val and test unchanged), so a residual stage may follow or precede a full one (the
# three-stage pipeline, longtail.engine.pipeline)
DATA_KEYS = (
    "dataset",
    "imbalance_factor",
    "profile",
    "subset_seed",
    "max_per_class",
    "meta_per_class",
    "meta_from",
)
MODEL_KEYS = ("backbone", "backbone_params", "neck", "neck_params", "head", "head_params")
DEFAULT_TAUS = tuple(round(0.1 * i, 10) for i in range(21))  # 0.0, 0.1, ..., 2.0 (tau_norm.py)


# ---------------------------------------------------------------------------------------------
# stage 1


@dataclass
class Stage1:
    """A finished stage-1 run: its folder, final weights and saved config (the raw YAML tree)."""

    run_dir: Path
    weights: Dict[str, torch.Tensor]
    config: Dict[str, Any]


def recipe_name(method: str) -> str:
    """The recipe (configs/methods/<recipe>.yaml) of a registered method: its class attribute
    ``recipe``, else the method's name."""
    try:
        return getattr(METHODS.get(method), "recipe", method)
    except ConfigError:
        return method


def _how_to(cfg, method: str) -> str:
    data = str(cfg.data.dataset).replace("-", "_")  # cifar10-lt -> configs/datasets/cifar10_lt.yaml
    return (
        f"Train stage 1 first and pass its run folder, e.g. `longtail train "
        f"configs/methods/ce.yaml data={data} --out runs/ce` then `longtail train "
        f"configs/methods/{recipe_name(method)}.yaml data={data} stage1=runs/ce`."
    )


def load_stage1(cfg, method: str) -> Stage1:
    """Read the stage-1 run named by ``cfg.stage1``; LongtailError if it is unset, unfinished or
    trained on other data (the message names the key and how to produce a matching run)."""
    if not cfg.stage1:
        raise LongtailError(
            f"method.name={method} builds on a stage-1 run, but the top-level key "
            f"`stage1` is not set. {_how_to(cfg, method)}"
        )
    folder = RunFolder(Path(str(cfg.stage1)).expanduser())
    if not folder.path.is_dir():
        raise LongtailError(f"stage1={cfg.stage1}: no such folder. {_how_to(cfg, method)}")
    if not folder.is_run():
        raise LongtailError(
            f"stage1={cfg.stage1} is not a run folder (no {folder.CONFIG}). {_how_to(cfg, method)}"
        )
    if not folder.has_weights():
        if folder.has_checkpoint():
            raise LongtailError(
                f"stage1={cfg.stage1} has not finished (no {folder.WEIGHTS}, only "
                f"{folder.CHECKPOINT}). Finish it with `longtail train --resume "
                f"{cfg.stage1}`, then run stage 2 again."
            )
        raise LongtailError(
            f"stage1={cfg.stage1} has no weights ({folder.WEIGHTS}). {_how_to(cfg, method)}"
        )
    try:
        saved = folder.config_tree()
    except LongtailError as err:
        raise LongtailError(f"stage1={cfg.stage1}: {err}") from None
    check_same_data(cfg, saved, method)
    try:
        weights = folder.load_weights()
    except Exception as err:  # truncated / not safetensors
        raise LongtailError(
            f"stage1={cfg.stage1}: {folder.WEIGHTS} cannot be read ({err}). Re-run "
            f"stage 1 or pass another stage1 folder."
        ) from None
    run_dir = folder.path
    return Stage1(run_dir, weights, saved)


def _same(a: Any, b: Any) -> bool:
    if (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
    return a == b


def data_diffs(cfg, saved: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(key, saved value, this run's value) for each option of DATA_KEYS on which an earlier
    run (its saved config tree) trained on another training set than this run."""
    theirs = saved.get("data") or {}
    defaults = type(cfg.data)()
    diffs = []
    for key in DATA_KEYS:
        mine = getattr(cfg.data, key)
        other = theirs.get(key, getattr(defaults, key))
        if not _same(mine, other):
            diffs.append((key, other, mine))
    return diffs


def check_same_data(cfg, saved: Dict[str, Any], method: str) -> None:
    """LongtailError unless stage 1 (its saved config tree) trained on this run's training set."""
    diffs = data_diffs(cfg, saved)
    if diffs:
        listed = "; ".join(f"data.{k}: stage 1 {o!r}, this run {m!r}" for k, o, m in diffs)
        fix = " ".join(f"data.{k}={m}" for k, _, m in diffs)
        raise LongtailError(
            f"stage1={cfg.stage1} was trained on another training set than this {method} run "
            f"({listed}). Stage 2 must reuse stage 1's images: train stage 1 with the same data "
            f"options (add `{fix}` to its command) or pass a matching stage1 folder."
        )


def _model_diffs(cfg, saved: Dict[str, Any], keys: Sequence[str]) -> List[str]:
    theirs = saved.get("model") or {}
    defaults = type(cfg.model)()
    out = []
    for key in keys:
        mine, other = getattr(cfg.model, key), theirs.get(key, getattr(defaults, key))
        if mine != other:
            out.append(f"model.{key}: stage 1 {other!r}, this run {mine!r}")
    return out


def load_stage1_weights(
    cfg,
    model: nn.Module,
    stage1: Stage1,
    *,
    skip_head: bool = False,
    allow_missing: Iterable[str] = (),
) -> None:
    """Copy stage 1's tensors into ``model`` after checking keys and shapes.

    ``skip_head``: load everything but ``head.*`` (the head is replaced or refilled);
    ``allow_missing``: this run's keys stage 1 lacks on purpose (``head.scales`` of LWS).
    """
    keep = (lambda k: not k.startswith("head.")) if skip_head else (lambda k: True)
    own = {k: v for k, v in model.state_dict().items() if keep(k)}
    theirs = {k: v for k, v in stage1.weights.items() if keep(k)}
    missing = sorted(set(own) - set(theirs) - set(allow_missing))
    unexpected = sorted(set(theirs) - set(own))
    shapes = sorted(
        k for k in set(own) & set(theirs) if tuple(own[k].shape) != tuple(theirs[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} tensor(s) differ in shape (e.g. '{k}': stage 1 "
                f"{list(theirs[k].shape)}, this run {list(own[k].shape)})"
            )
        if missing:
            parts.append(f"{len(missing)} missing in stage 1 (e.g. '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} not in this run's model (e.g. '{unexpected[0]}')")
        keys = [k for k in MODEL_KEYS if not (skip_head and k.startswith("head"))]
        diffs = _model_diffs(cfg, stage1.config, keys)
        why = f" The configs differ in: {'; '.join(diffs)}." if diffs else ""
        raise LongtailError(
            f"The weights of stage1={cfg.stage1} do not fit this run's model: {', '.join(parts)}."
            f"{why} Use stage 1's model settings (model.*) for stage 2, or pass a stage1 folder "
            f"trained with this model."
        )
    model.load_state_dict(theirs, strict=False)


def freeze_features(model: nn.Module) -> None:
    """Freeze backbone and neck: no gradients, BatchNorm statistics frozen (eval mode)."""
    model.freeze_backbone()
    for p in model.neck.parameters():
        p.requires_grad_(False)
    model.neck.eval()


def feature_dim(model: nn.Module) -> int:
    return int(getattr(model.neck, "out_features", model.backbone.num_features))


def fresh_head(cfg, model: nn.Module, num_classes: int) -> nn.Module:
    """A newly initialised head of the configured type on ``model``'s features (stage 2).
    A linear head gets the reference's fresh ``nn.Linear`` init, U(+-1/sqrt(D)) (LinearHead's
    kaiming-normal start gives logits ~2.5x larger: a far higher initial loss on stage-1
    features)."""
    m = cfg.model
    head = HEADS.build(
        m.head, feature_dim(model), num_classes, key_prefix="model.head_params.", **m.head_params
    )
    if isinstance(head, nn.Linear):
        nn.Linear.reset_parameters(head)
    return head


# ---------------------------------------------------------------------------------------------
# evaluation-path helpers (same batching, autocast and memory format as engine.evaluate)


def eval_outputs(
    method: Method,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    model: Optional[nn.Module] = None,
    sharded: bool = False,
) -> Iterator[Tuple[ModelOutput, torch.Tensor]]:
    """(model output, labels) per evaluation batch of the whole image set, ``model`` (default:
    the method's) in eval mode, without gradients.

    Batches, normalisation and autocast are those of :func:`longtail.engine.evaluate.evaluate`,
    so numbers computed from these equal the final evaluation's; ``sharded``: this DDP rank's
    share of the batches (reduce the sums over ranks), else the whole set on this process.
    """
    model = method.model if model is None else model
    cfg, data, dist = method.cfg, method.ctx.data, method.ctx.dist
    was_training = model.training
    model.eval()
    try:
        for b in eval_batches(
            images,
            labels,
            cfg.train.eval_batch_size,
            data.mean,
            data.std,
            method.device,
            dist.rank if sharded else 0,
            dist.world_size if sharded else 1,
            channels_last=cfg.train.channels_last,
        ):
            with torch.no_grad(), method.autocast():
                out = model(b.images)
            yield out, b.labels
    finally:
        model.train(was_training)


def eval_forward(
    method: Method, images: torch.Tensor, labels: torch.Tensor
) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(features, float32 logits, labels) per evaluation batch of the whole image set, on this
    process (:func:`eval_outputs`)."""
    for out, y in eval_outputs(method, images, labels):
        yield out.features, out.logits.float(), y


def pct(correct: float, total: float) -> float:
    """Accuracy in percent, computed as the evaluation does (100 * correct / total)."""
    return 100.0 * float(correct) / float(total)


def check_taus(
    taus: Optional[Sequence[float]], tau: Optional[float], method: str
) -> Tuple[List[float], Optional[float]]:
    """Validate the ``method.taus`` grid and the fixed ``method.tau`` (None: pick on val)."""

    def number(v, key):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise ConfigError(f"'method.{key}' of {method} must be a finite number, got {v!r}.")
        return float(v)

    if taus is None:
        grid = list(DEFAULT_TAUS)
    else:
        if not isinstance(taus, (list, tuple)) or not taus:
            raise ConfigError(
                f"'method.taus' of {method} must be a non-empty list of numbers, got {taus!r}."
            )
        grid = sorted({round(number(t, "taus"), 10) for t in taus})
    return grid, (None if tau is None else number(tau, "tau"))


def require_val(method: Method, name: str):
    val = method.ctx.data.val if method.ctx.data is not None else None
    if val is None or len(val) == 0:
        raise LongtailError(
            f"method.name={name} picks tau on the val split, but this run has none "
            f"(data.val_per_class={method.cfg.data.val_per_class}). Set "
            f"data.val_per_class > 0, or fix tau with method.tau=VALUE."
        )
    return val


# ---------------------------------------------------------------------------------------------
# methods


class Stage2Method(Method):
    """Base of the methods built on a stage-1 run: ``setup_model`` loads and checks it.

    ``trains = False`` methods refuse ``train.epochs > 0`` and do their work in ``on_train_end``.
    """

    name = "stage2"
    trains = True

    def __init__(self, ctx: MethodContext):
        if not self.trains and ctx.cfg.train.epochs != 0:
            raise ConfigError(
                f"method.name={self.name} trains nothing: set train.epochs=0 "
                f"(configs/methods/{recipe_name(self.name)}.yaml does), got train.epochs="
                f"{ctx.cfg.train.epochs}."
            )
        super().__init__(ctx)

    def stage1(self) -> Stage1:
        return load_stage1(self.cfg, self.name)


class FrozenFeatureMethod(Stage2Method):
    """cRT / LWS: train (part of) the head on the frozen stage-1 backbone and neck."""

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.model.neck.eval()  # the trainer's .train() switched it back; the backbone stays eval

    def head_logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.ctx.dist.enabled:
            # DDP synchronises the head's gradients only through its own forward; the frozen
            # backbone records no graph there either (none of its inputs requires grad)
            with self.autocast():
                return self.train_model(images).logits
        with torch.no_grad(), self.autocast():
            features = self.model.forward_features(images)
        with self.autocast():
            return self.model.head(features)

    def compute_loss(self, batch) -> torch.Tensor:
        return self.loss(self.head_logits(batch.images).float(), batch.labels)


@METHODS.register("crt")
class ClassifierRetraining(FrozenFeatureMethod):
    """cRT: re-initialise the configured head (``model.head``; a linear head gets nn.Linear's
    default init, as the reference) and train only it on frozen stage-1 features, with the
    configured loss (CE) and sampler (class_balanced)."""

    name = "crt"

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)

    def setup_model(self, model: nn.Module) -> None:
        load_stage1_weights(self.cfg, model, self.stage1(), skip_head=True)
        freeze_features(model)
        model.head = fresh_head(self.cfg, model, len(self.ctx.class_counts))

    def trainable_parameters(self):
        return [p for p in self.model.head.parameters() if p.requires_grad]


@METHODS.register("lws")
class LearnableWeightScaling(FrozenFeatureMethod):
    """LWS: keep stage-1 W, b; learn only per-class scales f (init 1) of ``model.head: lws``."""

    name = "lws"

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)

    def setup_model(self, model: nn.Module) -> None:
        if not isinstance(model.head, LWSHead):
            raise ConfigError(
                f"method.name=lws learns per-class scales of an LWS head: set "
                f"model.head=lws (configs/methods/lws.yaml does), got "
                f"model.head={self.cfg.model.head}."
            )
        load_stage1_weights(self.cfg, model, self.stage1(), allow_missing={"head.scales"})
        freeze_features(model)
        for p in model.head.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            model.head.scales.fill_(1.0)
        model.head.scales.requires_grad_(True)

    def trainable_parameters(self):
        return [self.model.head.scales]

    def extra_metrics(self) -> Dict[str, Any]:
        return {"lws_scales": [float(s) for s in self.model.head.scales.detach().cpu()]}


def tau_normalize(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """w_c / |w_c|^tau per row (tau = 0: ``weight`` unchanged, bit for bit)."""
    if tau == 0:
        return weight.clone()
    norms = weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return weight / norms.pow(tau)


@METHODS.register("tau_norm")
class TauNormalization(Stage2Method):
    """tau-normalisation of the stage-1 linear head: w_c <- w_c / |w_c|^tau, bias dropped.

    Options:
        tau: fix tau (skip the search); None (default) picks it on the ``val`` split.
        taus: the grid searched (default 0, 0.1, ..., 2.0), by val top-1, ties to the smaller tau.

    ``on_train_end`` writes the normalised weights into the head (and zeros its bias), so
    ``model.safetensors`` holds them; the chosen tau and the val table are in the method state
    and ``metrics.json``. It always starts from the stage-1 weights, so running it again (resume of
    a finished run) gives the same head.
    """

    name = "tau_norm"
    trains = False

    def __init__(
        self, ctx: MethodContext, tau: Optional[float] = None, taus: Optional[List[float]] = None
    ):
        self.grid, self.fixed_tau = check_taus(taus, tau, "tau_norm")
        self.tau: Optional[float] = None
        self.table: List[Dict[str, float]] = []
        super().__init__(ctx)

    def setup_model(self, model: nn.Module) -> None:
        head = model.head
        if not isinstance(head, LinearHead) or isinstance(head, LWSHead):
            raise ConfigError(
                f"method.name=tau_norm rescales the rows of a linear head: set "
                f"model.head=linear (as stage 1), got model.head={self.cfg.model.head}."
            )
        load_stage1_weights(self.cfg, model, self.stage1())
        self.stage1_weight = head.weight.detach().clone()

    def _set_tau(self, tau: float) -> None:
        head = self.model.head
        with torch.no_grad():
            head.weight.copy_(tau_normalize(self.stage1_weight.to(head.weight.device), tau))
            if head.bias is not None:
                head.bias.zero_()

    def on_train_end(self) -> None:
        val = self.ctx.data.val if self.ctx.data is not None else None
        if self.fixed_tau is None:
            val = require_val(self, self.name)
        self.table = []
        if val is not None and len(val):
            batches = list(eval_forward(self, val.images, val.labels))
            head = self.model.head
            for tau in self.grid:
                self._set_tau(tau)
                correct = 0
                with torch.no_grad():
                    for features, _, labels in batches:
                        with self.autocast():
                            logits = head(features)
                        correct += int((logits.float().argmax(1) == labels).sum())
                self.table.append({"tau": tau, "val_top1": pct(correct, len(val))})
        if self.fixed_tau is not None:
            self.tau = self.fixed_tau
        else:
            best = max(self.table, key=lambda r: r["val_top1"])  # first maximum: smaller tau
            self.tau = best["tau"]
        self._set_tau(self.tau)

    def extra_metrics(self) -> Dict[str, Any]:
        return {
            "tau": self.tau,
            "tau_source": "val" if self.fixed_tau is None else "method.tau",
            "tau_table": self.table,
        }

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["tau_norm"] = {"tau": self.tau, "table": self.table}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state.get("tau_norm") or {}
        self.tau, self.table = saved.get("tau"), list(saved.get("table") or [])


@METHODS.register("ncm")
class NearestClassMean(Stage2Method):
    """NCM: logits from the distance of a feature to each class mean of the stage-1 features of
    the (un-augmented) training images, as ``model.head: ncm`` defines it (cosine to normalised
    means by default; the decoupling code's centred Euclidean form with head options
    ``metric: euclidean, center: true``). The means are the head's buffers, so
    ``model.safetensors`` holds them."""

    name = "ncm"
    trains = False

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)

    def setup_model(self, model: nn.Module) -> None:
        if not isinstance(model.head, NCMHead):
            raise ConfigError(
                f"method.name=ncm needs model.head=ncm (configs/methods/ncm.yaml sets it), "
                f"got model.head={self.cfg.model.head}."
            )
        load_stage1_weights(self.cfg, model, self.stage1(), skip_head=True)

    def on_train_end(self) -> None:
        train = self.ctx.data.train
        head = self.model.head
        if head.center:  # the decoupling code's cl2n: centre by the mean training feature first
            total = torch.zeros(head.feature_mean.shape, dtype=torch.float64)
            for features, _, _ in eval_forward(self, train.images, train.labels):
                total += features.double().sum(0).cpu()
            with torch.no_grad():
                head.feature_mean.copy_((total / len(train)).to(head.feature_mean.dtype))
        sums = torch.zeros_like(head.means, dtype=torch.float64)
        counts = torch.zeros(head.means.shape[0], dtype=torch.float64, device=sums.device)
        for features, _, labels in eval_forward(self, train.images, train.labels):
            f = head.embed(features.float()).double()
            sums.index_add_(0, labels.to(sums.device), f.to(sums.device))
            counts += torch.bincount(labels, minlength=len(counts)).to(counts)
        with torch.no_grad():
            head.means.copy_((sums / counts.clamp_min(1).unsqueeze(1)).to(head.means.dtype))
