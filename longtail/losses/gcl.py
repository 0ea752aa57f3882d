"""GCL, Gaussian-clouded logits (Li et al., CVPR 2022), as in GNM-PT (Li et al., NeurIPS 2024).
Formula: cos'=cos-noise_mul|eps|m/max(m), m_c=log(n_max/n_c), eps~N(0,1/9) clamped; L=CE(s(cos'-margin e_y), y)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from longtail.losses.base import (
    LOSSES,
    Beta,
    Epoch,
    LongtailLoss,
    NonNegative,
    Positive,
    check_number,
    resolve_beta,
)


@LOSSES.register("gcl")
class GCLLoss(LongtailLoss):
    """GCL on cosine logits [B, C] float in [-1, 1] (normalised head) and targets [B] int64 -> scalar.

    Follows GNM-PT ``loss.py`` (docs/methods/sharpness.md):

    * ``cloud`` buffer (float32 [C]) = ``m_c / max_j m_j`` with ``m_c = log n_max - log n_c``
      (0 for the head class, 1 for the rarest). If all counts are equal there is no cloud (0/0 := 0).
    * Training mode (``self.training``): ``eps ~ N(0, (1/3)^2)`` per logit, clamped to [-1, 1];
      ``cos' = cos - noise_mul * |eps| * cloud``. Evaluation mode: no noise, ``cos' = cos``.
    * The target logit is lowered by ``margin``; ``L = CE(scale * cos', y)``.
    * Noise is drawn from ``generator`` (attribute or constructor argument; ``None`` = global RNG).
      A generator on another device (e.g. a CPU generator with CUDA logits) is allowed: the noise is
      drawn there and moved.
    * DRW as GNM-PT: ``beta`` (default 0.9998) is the effective-number beta of the deferred CB
      weights; GNM-PT's ``reweight_epoch=59`` (``epoch > 59``) corresponds to ``drw_epoch=60``.
      ``drw_beta`` is accepted as a synonym of ``beta`` (giving both with different values is an error).
    * Reduction: plain mean, or the weighted-mean convention when DRW weights are active.
    """

    registry_name = "gcl"
    requires_normalized_head = True
    needs_class_counts = True

    cloud: torch.Tensor

    def __init__(
        self,
        class_counts: Optional[Sequence[float]] = None,
        scale: Positive = 25.0,
        margin: NonNegative = 0.1,
        noise_mul: NonNegative = 1.0,
        beta: Optional[Beta] = None,
        drw_epoch: Optional[Epoch] = None,
        drw_beta: Optional[Beta] = None,
        generator: Optional[torch.Generator] = None,
    ):
        beta = resolve_beta(beta, drw_beta, 0.9998, drw_epoch, "gcl")
        super().__init__(class_counts, drw_epoch=drw_epoch, drw_beta=beta)
        self.scale = check_number(scale, "loss.scale", minimum=0.0, strict=True)
        self.margin = check_number(margin, "loss.margin")
        self.noise_mul = check_number(noise_mul, "loss.noise_mul", minimum=0.0)
        self.beta = beta
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        self.generator: Optional[torch.Generator] = generator
        m = torch.log(torch.tensor(self.counts, dtype=torch.float64))
        m = m.max() - m
        cloud = m / m.max() if float(m.max()) > 0 else torch.zeros_like(m)
        self.register_buffer("cloud", cloud.float(), persistent=False)

    def sample_noise(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """``|eps|`` with eps ~ N(0, (1/3)^2) clamped to [-1, 1], float32 on ``device``."""
        gen = self.generator
        src = gen.device if gen is not None else device
        eps = torch.randn(shape, generator=gen, device=src, dtype=torch.float32) / 3.0
        return eps.clamp_(-1.0, 1.0).abs_().to(device)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cos = logits
        if self.training and self.noise_mul > 0:
            cos = cos - self.noise_mul * self.sample_noise(cos.shape, cos.device) * self.cloud
        onehot = F.one_hot(targets, cos.shape[1]).to(cos.dtype)
        cos = cos - self.margin * onehot
        return F.cross_entropy(self.scale * cos, targets, weight=self.weight)

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, margin={self.margin}, noise_mul={self.noise_mul}, beta={self.beta}, "
            + super().extra_repr()
        )
