"""Channel whitening of the classifier input, with BET (batch embedded training).

Zhang, "You Only Need End-to-End Training for Long-Tailed Recognition", arXiv 2112.05958 (2021,
withdrawn; successor arXiv 2408.17197). No public code: every choice here is [PROPOSED] (our
reading), each behind an option of ``model.neck_params``. A neck ``[B, D] -> [B, D]``::

    Sigma = (1/m) X_c^T X_c + eps I,  W = Sigma^(-1/2) (per group of G channels),
    x_hat = (x - mu) W

``method``: eig (Daleckii-Krein backward) | newton_schulz (IterNorm, ``iterations``); ``running``:
cov | whiten (evaluation matrix); ``bet``: none | queue (statistics of the last ``bet_queue``
batches) | subbatch (refused); ``affine``; all in float64. Details, defaults and our reading where
the paper is silent: docs/methods/whitening.md.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from longtail.core.errors import ConfigError
from longtail.models.registry import NECKS

_KEY = "model.neck_params."
METHODS = ("eig", "newton_schulz")
BET_MODES = ("none", "queue", "subbatch")
RUNNING = ("cov", "whiten")


class _InvSqrtSPD(torch.autograd.Function):
    """Sigma^(-1/2) of a batch of symmetric positive definite matrices [..., G, G] (float64),
    with the Daleckii-Krein gradient (stable for equal eigenvalues: docs/methods/whitening.md)."""

    @staticmethod
    def forward(ctx, sigma: torch.Tensor, floor: float) -> torch.Tensor:
        lam, u = torch.linalg.eigh(sigma)
        s = lam.clamp_min(floor).sqrt()
        ctx.save_for_backward(u, s)
        return (u / s.unsqueeze(-2)) @ u.transpose(-1, -2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        u, s = ctx.saved_tensors
        grad = 0.5 * (grad + grad.transpose(-1, -2))
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
        loewner = -1.0 / (si * sj * (si + sj))
        inner = u.transpose(-1, -2) @ grad @ u
        return u @ (loewner * inner) @ u.transpose(-1, -2), None


def inv_sqrt_eig(sigma: torch.Tensor, floor: float) -> torch.Tensor:
    """ZCA whitening matrices Sigma^(-1/2) by eigendecomposition: [..., G, G] -> [..., G, G]."""
    return _InvSqrtSPD.apply(sigma, floor)


def inv_sqrt_newton_schulz(sigma: torch.Tensor, iterations: int) -> torch.Tensor:
    """IterNorm's Newton-Schulz approximation P_T / sqrt(tr Sigma) of Sigma^(-1/2) (T iterations).

    Computed in the coupled form (Higham, "Functions of Matrices", 2008, eq. 6.35): Y_0 = Sigma_N,
    Z_0 = I, T_k = (3 I - Z_{k-1} Y_{k-1}) / 2, Y_k = Y_{k-1} T_k, Z_k = T_k Z_{k-1}. All iterates
    are polynomials in Sigma_N, so Y_k = Sigma_N Z_k and Z_k = (3 Z_{k-1} - Z_{k-1}^3 Sigma_N) / 2:
    Z_k is IterNorm's P_k exactly (same matrix products count, 3 per step). The literal form
    P_k = (3 P - P^3 Sigma_N) / 2 is numerically unstable: at its fixed point a rounding error in
    eigen-direction pair (i, j) is multiplied by 1 - (sqrt(r) + r) / 2 each step (r = a_j / a_i),
    so it grows for condition numbers above ~2.4 and blows up after ~10-30 steps; the coupled
    form converges to Sigma^(-1/2) for any T.
    """
    trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
    y, z = sigma / trace, eye.expand_as(sigma)
    for _ in range(iterations):
        t = 1.5 * eye - 0.5 * (z @ y)
        y, z = y @ t, t @ z
    return z / trace.sqrt()


def _int_option(value, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"'{_KEY}{key}' must be an integer >= {minimum}, got {value!r}.")
    return value


def _float_option(value, key: str, low: float, high: float, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"'{_KEY}{key}' must be a number, got {value!r}.")
    value = float(value)
    if (value <= low if low_open else value < low) or value > high:
        raise ConfigError(
            f"'{_KEY}{key}' must lie in {'(' if low_open else '['}{low}, {high}], got {value!r}."
        )
    return value


@NECKS.register("whitening")
class ChannelWhitening(nn.Module):
    """ZCA channel whitening of the classifier input (+ BET). Shapes: [B, D] -> [B, D].

    Args (``model.neck_params``; details in docs/methods/whitening.md):
        method: ``eig`` (default; exact, float64 eigendecomposition) or ``newton_schulz``.
        group_size: channels per whitening group G (must divide D); default D if D <= 128 else 64.
        eps: ridge added to the covariance (1e-5).
        momentum: running-statistics momentum (0.1).
        iterations: Newton-Schulz iterations T (5); ignored by ``eig``.
        affine: learnable per-channel scale and shift after whitening (false).
        bet: ``none`` (default), ``queue`` (statistics over the batch + the last ``bet_queue``
            batches, detached) or ``subbatch`` (rejected: a training-loop strategy, see the docs).
        bet_queue: Q, the number of past batches in the queue (4).
        running: what evaluation whitens with: ``cov`` (default; W of the running covariance) or
            ``whiten`` (the running average of the batch whitening matrices).

    Buffers: ``running_mean`` [D], ``running_cov`` and ``running_whiten`` [D/G, G, G]; with
    ``bet: queue`` also ``queue_count`` [Q], ``queue_mean`` [Q, D], ``queue_scatter`` [Q, D, G]
    (group k's centred scatter in rows k G .. (k+1) G - 1) and ``queue_next`` [] (float64 /
    int64).
    """

    running_mean: torch.Tensor
    running_whiten: torch.Tensor
    running_cov: torch.Tensor
    weight: Optional[nn.Parameter]  # None unless affine
    bias: Optional[nn.Parameter]
    queue_count: torch.Tensor  # the queue_* buffers exist only with bet: queue
    queue_mean: torch.Tensor
    queue_scatter: torch.Tensor
    queue_next: torch.Tensor

    def __init__(
        self,
        in_features: int,
        method: str = "eig",
        group_size: Optional[int] = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
        iterations: int = 5,
        affine: bool = False,
        bet: str = "none",
        bet_queue: int = 4,
        running: str = "cov",
    ):
        super().__init__()
        if method not in METHODS:
            raise ConfigError(
                f"'{_KEY}method' must be one of {', '.join(METHODS)}, got {method!r}."
            )
        if bet not in BET_MODES:
            raise ConfigError(f"'{_KEY}bet' must be one of {', '.join(BET_MODES)}, got {bet!r}.")
        if bet == "subbatch":
            raise ConfigError(
                f"'{_KEY}bet' = subbatch is not implemented: inside one step, whitening "
                f"sub-batches with the whole batch's statistics equals whole-batch whitening, and "
                f"several SGD steps per batch are a training method, not a neck. Use "
                f"{_KEY}bet=queue (statistics over the batch and the last {_KEY}bet_queue "
                f"batches) or none."
            )
        if running not in RUNNING:
            raise ConfigError(
                f"'{_KEY}running' must be one of {', '.join(RUNNING)}, got {running!r}."
            )
        if not isinstance(affine, bool):
            raise ConfigError(f"'{_KEY}affine' must be true or false, got {affine!r}.")
        d = int(in_features)
        if group_size is None:
            group_size = d if d <= 128 else 64
        g = _int_option(group_size, "group_size", 1)
        if d % g:
            raise ConfigError(
                f"'{_KEY}group_size' = {g} does not divide the {d} feature channels; "
                f"choose a divisor of {d}."
            )
        self.in_features = self.out_features = d
        self.method = method
        self.group_size = g
        self.num_groups = d // g
        self.eps = _float_option(eps, "eps", 0.0, float("inf"))
        self.momentum = _float_option(momentum, "momentum", 0.0, 1.0)
        self.iterations = _int_option(iterations, "iterations", 1)
        self.affine = affine
        self.bet = bet
        self.running = running
        self.bet_queue = _int_option(bet_queue, "bet_queue", 1) if bet == "queue" else 0

        eye = torch.eye(g).expand(self.num_groups, g, g).clone()
        self.register_buffer("running_mean", torch.zeros(d))
        self.register_buffer("running_whiten", eye)
        self.register_buffer("running_cov", eye.clone())
        if affine:
            self.weight = nn.Parameter(torch.ones(d))
            self.bias = nn.Parameter(torch.zeros(d))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.bet_queue:
            q = self.bet_queue
            f64 = torch.float64
            self.register_buffer("queue_count", torch.zeros(q, dtype=f64))
            self.register_buffer("queue_mean", torch.zeros(q, d, dtype=f64))
            self.register_buffer("queue_scatter", torch.zeros(q, d, g, dtype=f64))
            self.register_buffer("queue_next", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        s = (
            f"{self.in_features}, method={self.method}, group_size={self.group_size}, "
            f"eps={self.eps}, momentum={self.momentum}"
        )
        if self.method == "newton_schulz":
            s += f", iterations={self.iterations}"
        s += f", affine={self.affine}, bet={self.bet}"
        if self.bet_queue:
            s += f", bet_queue={self.bet_queue}"
        return s + f", running={self.running}"

    # -- statistics --------------------------------------------------------------------------
    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [D/G, B, G]."""
        return x.reshape(x.shape[0], self.num_groups, self.group_size).transpose(0, 1)

    def _batch_stats(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean [D] and centred scatter blocks [D/G, G, G] (sum, not mean) of x [B, D]."""
        mean = x.mean(0)
        xc = self._blocks(x - mean)
        return mean, xc.transpose(1, 2) @ xc

    def statistics(
        self, x: torch.Tensor, use_queue: bool = True
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean [D], covariance blocks [D/G, G, G] without eps, and the current batch's own mean
        and scatter) of x [B, D] united with the queued batches (when ``bet: queue``).

        Computed in x's dtype (float64 in :meth:`forward`); differentiable in x; the queued
        statistics are constants.
        """
        mean_b, scatter_b = self._batch_stats(x)
        n_b = float(x.shape[0])
        if not (use_queue and self.bet_queue):
            return mean_b, scatter_b / n_b, mean_b, scatter_b
        # every slot takes part: an empty one has count, mean and scatter 0 and adds nothing
        # (no host synchronisation); clones, because the queue is updated in place afterwards
        counts = self.queue_count.to(x.dtype).clone()  # [Q]
        means = self.queue_mean.to(x.dtype).clone()  # [Q, D]
        scatters = self.queue_scatter.to(x.dtype).clone()
        scatters = scatters.reshape(-1, self.num_groups, self.group_size, self.group_size)
        total = n_b + counts.sum()
        mean = (n_b * mean_b + (counts[:, None] * means).sum(0)) / total
        db = self._blocks((mean_b - mean)[None])  # [D/G, 1, G]
        dq = self._blocks(means - mean)  # [D/G, Q, G]
        scatter = (
            scatter_b
            + n_b * db.transpose(1, 2) @ db
            + scatters.sum(0)
            + dq.transpose(1, 2) @ (counts[None, :, None] * dq)
        )
        return mean, scatter / total, mean_b, scatter_b

    def whitening_matrix(self, cov: torch.Tensor) -> torch.Tensor:
        """W for covariance blocks [D/G, G, G] (eps is added here)."""
        eye = torch.eye(self.group_size, dtype=cov.dtype, device=cov.device)
        sigma = cov + self.eps * eye
        if self.method == "eig":
            return inv_sqrt_eig(sigma, self.eps)
        return inv_sqrt_newton_schulz(sigma, self.iterations)

    @torch.no_grad()
    def eval_whitening_matrix(self) -> torch.Tensor:
        """The W evaluation uses (float64): ``running_whiten`` (``running: whiten``) or the
        whitening matrix of ``running_cov`` (``running: cov``; recomputed, deterministic)."""
        if self.running == "whiten":
            return self.running_whiten.double()
        return self.whitening_matrix(self.running_cov.double())

    @torch.no_grad()
    def _push(self, mean_b: torch.Tensor, scatter_b: torch.Tensor, n: int) -> None:
        """Overwrite the oldest slot with this batch's statistics (tensor indexing: no sync)."""
        slot = self.queue_next.reshape(1)
        self.queue_count.index_fill_(0, slot, float(n))
        self.queue_mean.index_copy_(0, slot, mean_b.detach()[None].to(self.queue_mean.dtype))
        scatter = scatter_b.detach().reshape(1, self.in_features, self.group_size)
        self.queue_scatter.index_copy_(0, slot, scatter.to(self.queue_scatter.dtype))
        self.queue_next.add_(1).remainder_(self.bet_queue)

    def reset_queue(self) -> None:
        """Empty the BET queue (not called by training; for experiments)."""
        if self.bet_queue:
            self.queue_count.zero_()
            self.queue_mean.zero_()
            self.queue_scatter.zero_()
            self.queue_next.zero_()

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"whitening neck expects [B, {self.in_features}] features, got {tuple(x.shape)}"
            )
        dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            x64 = x.double()
            if self.training:
                if x.shape[0] < 2 and not self.bet_queue:
                    raise ValueError(
                        "whitening neck needs at least 2 samples per batch in "
                        "training mode (as BatchNorm), or model.neck_params.bet=queue"
                    )
                mean, cov, mean_b, scatter_b = self.statistics(x64)
                whiten = self.whitening_matrix(cov)
                with torch.no_grad():
                    m = self.momentum
                    for buf, new in (
                        (self.running_mean, mean),
                        (self.running_cov, cov),
                        (self.running_whiten, whiten),
                    ):
                        buf.mul_(1 - m).add_(new.detach().to(buf.dtype), alpha=m)
                    if self.bet_queue:
                        self._push(mean_b, scatter_b, x.shape[0])
            else:
                mean, whiten = self.running_mean.double(), self.eval_whitening_matrix()
            xc = self._blocks(x64 - mean)  # [D/G, B, G]
            out = (xc @ whiten.transpose(1, 2)).transpose(0, 1).reshape(x.shape)
            if self.affine:
                assert self.weight is not None and self.bias is not None  # set when affine
                out = out * self.weight.double() + self.bias.double()
        return out.to(dtype)
