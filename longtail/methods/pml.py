"""PML — Progressive Margin Loss (Deng, Liu, Wang, Wang, Yu, Sun, CVPR 2021).

Per-class statistics gathered over the epoch (no gradient): prototypes c_k (running feature mean),
intra-class φ_k += cosd(f, c_k^old)·cosd(f, c_k^new), inter-class ψ = cosd(c, c) [C, C]. A margin
network g (:class:`~longtail.models.margin_net.MarginNet`) turns them into margins [B, C]::

    μ = minmax(g([c; φ])) · C,   σ = softplus(g([c; φ])) + 1e-3       (sigma_mode: raw = the code's)
    m_p(i, k) = N(k; μ_{y_i}, σ_{y_i})                                  ordinal margin (ordinal only)
    m_l = g([Δc; Δφ; Δψ])                                               variational margin (this batch)
    M = margin_scale · ramp(epoch) · standardise_k(m_p + mix · m_l),    p = softmax(z − M) (training)

Ordinal (``ordinal: true``): L = KL(q ‖ p) + l1_weight · |Σ_k k p_k − y|, q_k ∝ N(k; y, label_sigma).
Nominal (default): L = loss(z − M, y), the configured loss, with M from m_l alone. Evaluation: z.
Formulas, options and the readings chosen: docs/methods/pml.md.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Dict, Literal, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from longtail.core.errors import ConfigError
from longtail.data.loader import Batch
from longtail.losses.base import check_number
from longtail.methods.base import METHODS, Method, MethodContext
from longtail.methods.decoupled import eval_forward
from longtail.models.margin_net import MarginNet

NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]

SIGMA_FLOOR = 1e-3  # σ = softplus(raw) + SIGMA_FLOOR
EPS = 1e-12  # the min-max range and the per-sample std are clamped to it (all-zero margins stay 0)


# ---------------------------------------------------------------------------------------------
# statistics


def cosine_distance_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a_i, b_i) per row, clipped to [0, 2]; 1 where either row is the zero vector."""
    na, nb = a.norm(dim=1), b.norm(dim=1)
    dist = (1.0 - (a * b).sum(1) / (na * nb).clamp_min(1e-300)).clamp(0.0, 2.0)
    return torch.where((na == 0) | (nb == 0), torch.ones_like(dist), dist)


def cosine_distance_matrix(c: torch.Tensor, mode: str = "exact") -> torch.Tensor:
    """ψ_jk = 1 - c_j·c_k / (|c_j| |c_k|) [C, C] (``mode="code"``: / |c_j|², the reference
    code's row normalisation), clipped to [0, 2]; 1 where a row is zero, 0 on the diagonal."""
    norms = c.norm(dim=1)
    denom = norms[:, None] * (norms[None, :] if mode == "exact" else norms[:, None])
    dist = (1.0 - (c @ c.T) / denom.clamp_min(1e-300)).clamp(0.0, 2.0)
    zero = (norms == 0)[:, None] | (norms == 0)[None, :]
    dist = torch.where(zero, torch.ones_like(dist), dist)
    return dist.fill_diagonal_(0.0)


class ClassStatistics:
    """The epoch's class statistics (float64, no gradient): prototypes c [C, D], counts n [C],
    intra-class φ [C], inter-class ψ [C, C]. :meth:`observe` adds a batch, sample by sample in
    batch order (the reference's loop, vectorised), and returns the margin network's inputs."""

    def __init__(self, num_classes: int, device: torch.device, inter_distance: str = "exact"):
        self.num_classes, self.device = int(num_classes), device
        self.inter_distance = inter_distance
        self.proto: Optional[torch.Tensor] = None  # allocated on the first batch (D known then)
        self.count = torch.zeros(self.num_classes, dtype=torch.float64, device=device)
        self.intra = torch.zeros(self.num_classes, dtype=torch.float64, device=device)
        self.inter = torch.zeros(
            self.num_classes, self.num_classes, dtype=torch.float64, device=device
        )

    def reset(self) -> None:
        if self.proto is not None:
            self.proto.zero_()
        self.count.zero_()
        self.intra.zero_()
        self.inter.zero_()

    @torch.no_grad()
    def observe(
        self, features: torch.Tensor, labels: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Add a batch ([B, D] features, [B] labels); returns V = [c; φ] [C, D + 1] and
        ΔV = [Δc; Δφ; Δψ] [C, D + 1 + C] (the change over this batch), float32."""
        f = features.detach().to(torch.float64)
        y = labels.detach().long()
        C = self.num_classes
        if self.proto is None:
            self.proto = torch.zeros(C, f.shape[1], dtype=torch.float64, device=self.device)
        if f.shape[1] != self.proto.shape[1]:
            raise ValueError(
                f"features have {f.shape[1]} dims, the prototypes {self.proto.shape[1]}"
            )
        proto0, intra0, inter0 = self.proto.clone(), self.intra.clone(), self.inter.clone()

        # order the batch by class (stable: batch order within a class) and give every sample
        # the sum of the features of its class that come before it in the batch
        order = torch.sort(y, stable=True).indices
        ys, fs = y[order], f[order]
        per_class = torch.bincount(ys, minlength=C)
        start = (torch.cumsum(per_class, 0) - per_class)[ys]  # index of its class's first sample
        rank = torch.arange(len(ys), device=f.device) - start  # samples of its class before it
        before = torch.cumsum(fs, 0) - fs
        prefix = before - before[start]  # features of its class seen earlier in this batch
        n0 = self.count[ys]
        base = n0[:, None] * proto0[ys]
        old = (base + prefix) / (n0 + rank).clamp_min(1.0)[:, None]  # c_k before the sample
        new = (base + prefix + fs) / (n0 + rank + 1.0)[:, None]  # c_k after it
        phi = cosine_distance_rows(fs, old) * cosine_distance_rows(fs, new)

        sums = torch.zeros_like(proto0).index_add_(0, ys, fs)
        seen = per_class > 0
        total = self.count + per_class
        self.proto[seen] = (self.count[seen, None] * proto0[seen] + sums[seen]) / total[seen, None]
        self.count = total.to(torch.float64)
        self.intra.index_add_(0, ys, phi)
        self.inter = cosine_distance_matrix(self.proto, self.inter_distance)

        v = torch.cat([self.proto, self.intra[:, None]], dim=1)
        dv = torch.cat(
            [self.proto - proto0, (self.intra - intra0)[:, None], self.inter - inter0], dim=1
        )
        return v.float(), dv.float()

    def state_dict(self) -> Dict[str, Any]:
        return {
            "proto": None if self.proto is None else self.proto.clone(),
            "count": self.count.clone(),
            "intra": self.intra.clone(),
            "inter": self.inter.clone(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        proto = state["proto"]
        self.proto = None if proto is None else proto.to(self.device, torch.float64).clone()
        self.count = state["count"].to(self.device, torch.float64).clone()
        self.intra = state["intra"].to(self.device, torch.float64).clone()
        self.inter = state["inter"].to(self.device, torch.float64).clone()


# ---------------------------------------------------------------------------------------------
# margins and targets


def minmax_mu(raw: torch.Tensor, num_classes: int) -> torch.Tensor:
    """μ = (r - min r) / (max r - min r) · C over the classes of ``raw`` [C]."""
    lo, hi = raw.min(), raw.max()
    return (raw - lo) / (hi - lo).clamp_min(EPS) * num_classes


def gaussian_margin(
    labels: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """m_p(i, k) = N(k; μ_{y_i}, σ_{y_i}) [B, C] (Gaussian pdf over the class index k)."""
    k = torch.arange(num_classes, dtype=mu.dtype, device=mu.device)[None, :]
    m, s = mu[labels][:, None], sigma[labels][:, None]
    return torch.exp(-((k - m) ** 2) / (2.0 * s**2)) / (math.sqrt(2.0 * math.pi) * s)


def standardise(margin: torch.Tensor) -> torch.Tensor:
    """(M - mean_k M) / std_k M per sample (unbiased std, clamped: an all-zero row stays 0)."""
    mean = margin.mean(dim=1, keepdim=True)
    std = margin.std(dim=1, keepdim=True) if margin.shape[1] > 1 else torch.ones_like(mean)
    return (margin - mean) / std.clamp_min(EPS)


def label_distribution(num_classes: int, sigma: float) -> torch.Tensor:
    """q [C, C]: row y is N(k; y, sigma) over k = 0..C-1, normalised to sum 1."""
    k = torch.arange(num_classes, dtype=torch.float64)
    q = torch.exp(-((k[None, :] - k[:, None]) ** 2) / (2.0 * sigma**2))
    return (q / q.sum(dim=1, keepdim=True)).float()


def ordinal_loss(
    logits: torch.Tensor, labels: torch.Tensor, q: torch.Tensor, l1_weight: float
) -> torch.Tensor:
    """KL(q_y ‖ softmax(logits)) + l1_weight · |Σ_k k p_k − y|, both averaged over the batch."""
    log_p = F.log_softmax(logits, dim=1)
    target = q[labels]
    kl = (torch.xlogy(target, target) - target * log_p).sum(dim=1).mean()
    if l1_weight == 0:
        return kl
    k = torch.arange(logits.shape[1], dtype=log_p.dtype, device=log_p.device)
    expected = (log_p.exp() * k).sum(dim=1)
    return kl + l1_weight * (expected - labels.to(expected.dtype)).abs().mean()


def ordinal_mae(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[float, float]:
    """Sums of |argmax − y| and |Σ_k k p_k − y| over a batch (class index = ordinal value)."""
    p = logits.float().softmax(dim=1)
    k = torch.arange(logits.shape[1], dtype=p.dtype, device=p.device)
    y = labels.to(p.dtype)
    return float((p.argmax(1).to(p.dtype) - y).abs().sum()), float(((p * k).sum(1) - y).abs().sum())


# ---------------------------------------------------------------------------------------------
# the method


@METHODS.register("pml")
class PML(Method):
    """Progressive margins from the epoch's class statistics; docs/methods/pml.md."""

    def __init__(
        self,
        ctx: MethodContext,
        ordinal: bool = False,
        margin_scale: NonNegative = 0.01,
        mix: NonNegative = 0.1,
        standardize: bool = True,
        sigma_mode: Literal["softplus", "raw"] = "softplus",
        shared_margin_net: bool = True,
        margin_width: Annotated[int, Field(ge=1)] = 64,
        label_sigma: Positive = 2.0,
        l1_weight: NonNegative = 1.0,
        margin_warmup_epochs: NonNegative = 0.0,
        reset_stats_each_epoch: bool = True,
        inter_distance: Literal["exact", "code"] = "exact",
    ):
        self.margin_scale = check_number(margin_scale, "method.margin_scale", minimum=0.0)
        self.mix = check_number(mix, "method.mix", minimum=0.0)
        self.label_sigma = check_number(label_sigma, "method.label_sigma", minimum=0.0, strict=True)
        self.l1_weight = check_number(l1_weight, "method.l1_weight", minimum=0.0)
        self.warmup = check_number(margin_warmup_epochs, "method.margin_warmup_epochs", minimum=0.0)
        if sigma_mode not in ("softplus", "raw"):
            raise ConfigError(
                f"method.sigma_mode={sigma_mode!r}: use softplus (σ = softplus(g) + 1e-3, always "
                f"> 0) or raw (the reference code's unconstrained g output)."
            )
        if inter_distance not in ("exact", "code"):
            raise ConfigError(
                f"method.inter_distance={inter_distance!r}: use exact (1 - cos) or code (the "
                f"reference code's 1 - c_j.c_k / |c_j|^2)."
            )
        if isinstance(margin_width, bool) or not isinstance(margin_width, int) or margin_width < 1:
            raise ConfigError(f"method.margin_width={margin_width!r} must be an integer >= 1.")
        if ctx.dist.world_size > 1:
            raise ConfigError(
                "method.name=pml keeps its class statistics and margin network outside the "
                "DDP-wrapped model (their gradients and statistics are not synchronised across "
                "processes): train it in one process (no torchrun)."
            )
        self.ordinal, self.standardize = bool(ordinal), bool(standardize)
        self.sigma_mode, self.shared = sigma_mode, bool(shared_margin_net)
        self.reset_each_epoch = bool(reset_stats_each_epoch)
        self.num_classes = len(ctx.class_counts)
        if self.ordinal and self.num_classes < 2:
            raise ConfigError("method.ordinal=true needs at least 2 (ordered) classes.")
        super().__init__(ctx)

        # the margin networks this configuration uses (none when every margin is off)
        names = []
        if self.shared and (self.ordinal or self.mix > 0):
            names = ["g"]
        elif not self.shared:
            names = (["mu", "sigma"] if self.ordinal else []) + (["var"] if self.mix > 0 else [])
        self.nets = nn.ModuleDict({n: MarginNet(self.num_classes, margin_width) for n in names}).to(
            self.device
        )
        self.stats = ClassStatistics(self.num_classes, self.device, inter_distance)
        self.q = label_distribution(self.num_classes, self.label_sigma).to(self.device)
        self.epoch = 0
        self._parts, self._calls = 0, 0  # micro-batches of the current step, loss calls so far
        self._replay: list = []
        self._margin_sum: torch.Tensor = torch.zeros((), dtype=torch.float64, device=self.device)
        self._margin_steps = 0

    # -- margins -------------------------------------------------------------------------------
    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad] + [
            p for p in self.nets.parameters() if p.requires_grad
        ]

    def ramp(self, epoch: Optional[int] = None) -> float:
        """The curriculum weight of the margins: min(1, epoch / margin_warmup_epochs) (1 if 0)."""
        epoch = self.epoch if epoch is None else epoch
        return 1.0 if self.warmup == 0 else min(1.0, epoch / self.warmup)

    def _net(self, role: str) -> nn.Module:
        return self.nets["g" if self.shared else role]

    def margins(
        self, labels: torch.Tensor, v: torch.Tensor, dv: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """M [B, C] for a batch with labels [B] and statistics inputs V, ΔV (None: all zero)."""
        scale = self.margin_scale * self.ramp()
        if scale == 0 or not self.nets:
            return None
        C = self.num_classes
        with torch.autocast(self.device.type, enabled=False):
            parts = []
            if self.ordinal:
                raw_mu = self._net("mu")(v)
                raw_sigma = raw_mu if self.shared else self._net("sigma")(v)  # the code's one g
                mu = minmax_mu(raw_mu, C)
                sigma = (
                    F.softplus(raw_sigma) + SIGMA_FLOOR
                    if self.sigma_mode == "softplus"
                    else raw_sigma
                )
                parts.append(gaussian_margin(labels, mu, sigma, C))
            if self.mix > 0:
                m_l = self._net("var")(dv)[None, :].expand(len(labels), C)
                parts.append(self.mix * m_l)
            margin = parts[0] if len(parts) == 1 else parts[0] + parts[1]
            if self.standardize:
                margin = standardise(margin)
            return margin * scale

    def objective(
        self, logits: torch.Tensor, labels: torch.Tensor, margin: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The loss of the training prediction softmax(z − M) (M None: of z itself)."""
        if self.ordinal:
            z = logits * self.logit_scale()
            return ordinal_loss(z if margin is None else z - margin, labels, self.q, self.l1_weight)
        return self.loss(logits if margin is None else logits - margin, labels)

    # -- the step ------------------------------------------------------------------------------
    def _statistics(self, features: torch.Tensor, labels: torch.Tensor):
        """V, ΔV of this micro-batch: observed once per step (a re-evaluation of the closure,
        e.g. sam's second pass, replays the first pass's inputs instead of counting it again)."""
        if self._parts == 0:  # called outside train_step
            return self.stats.observe(features, labels), True
        i = self._calls
        self._calls += 1
        if i < self._parts:
            inputs = self.stats.observe(features, labels)
            self._replay.append(inputs)
            return inputs, True
        return self._replay[i % self._parts], False

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        with self.autocast():
            out = self.train_model(batch.images)
        (v, dv), fresh = self._statistics(out.features, batch.labels)
        margin = self.margins(batch.labels, v, dv)
        if fresh and margin is not None:  # summed on the device: no host sync per step
            self._margin_sum = self._margin_sum + margin.detach().abs().mean().double()
            self._margin_steps += 1
        return self.objective(out.logits.float(), batch.labels, margin)

    def train_step(self, batch: Batch) -> Dict[str, torch.Tensor]:
        self._parts, self._calls, self._replay = len(self.optim.micro_batches(batch)), 0, []
        try:
            loss = self.optim.update(self.compute_loss, batch)
        finally:
            self._parts, self._replay = 0, []
        return {"loss": loss}

    # -- hooks -----------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        self.epoch = int(epoch)
        if self.reset_each_epoch:
            self.stats.reset()
        self._margin_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._margin_steps = 0

    def on_epoch_end(self, epoch: int) -> Dict[str, float]:
        row = {"pml_ramp": self.ramp(epoch)}
        if self._margin_steps:
            row["pml_margin_abs"] = float(self._margin_sum) / self._margin_steps
        return row

    def extra_metrics(self) -> Dict[str, Any]:
        info: Dict[str, Any] = {"ordinal": self.ordinal, "margin_nets": sorted(self.nets.keys())}
        data = self.ctx.data
        test = getattr(data, "test", None) if data is not None else None
        if self.ordinal and test is not None and len(test) > 0:
            sums = [0.0, 0.0]
            scale = self.logit_scale()
            for _, logits, labels in eval_forward(self, test.images, test.labels):
                a, e = ordinal_mae(logits * scale, labels)
                sums[0] += a
                sums[1] += e
            info["test_mae_argmax"] = sums[0] / len(test)
            info["test_mae_expected"] = sums[1] / len(test)
        return {"pml": info}

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["pml"] = {
            "nets": self.nets.state_dict(),
            "stats": self.stats.state_dict(),
            "epoch": self.epoch,
        }
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        mine = state["pml"]
        self.nets.load_state_dict(mine["nets"])
        self.stats.load_state_dict(mine["stats"])
        self.epoch = int(mine["epoch"])


__all__ = ["PML", "ClassStatistics", "gaussian_margin", "standardise", "ordinal_loss"]
