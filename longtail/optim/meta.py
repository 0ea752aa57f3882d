"""The bi-level (one-step look-ahead) meta step shared by the meta-learning methods (MFM, MLR-SNet).

Meta-Weight-Net (Shu et al., NeurIPS 2019), MFM, MLR-SNet: for model parameters θ and
meta-parameters φ, one meta update is::

    θ̂(φ) = θ − α (∇θ L_train(θ, φ) + λ θ)           virtual SGD step, differentiable in φ
    g_φ  = ∇φ L_meta(θ̂(φ));   φ ← meta_optimizer(φ, g_φ)

then the method's real step with the new φ. Virtual passes use ``torch.func.functional_call``
on cloned buffers (BatchNorm running statistics untouched), autocast off unless asked; g_φ is
averaged over DDP ranks. Pieces, BatchNorm, precision, cost, DDP: docs/methods/meta.md.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from longtail.core.distributed import DistInfo, all_reduce_sum

Params = Dict[str, torch.Tensor]
LossFn = Callable[[Params], torch.Tensor]


def trainable_params(model: nn.Module) -> Params:
    """``{name: parameter}`` of the parameters of ``model`` that require grad, in module order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def functional_forward(
    model: nn.Module,
    params: Params,
    *args,
    keep_buffers: bool = True,
    amp_dtype: Optional[torch.dtype] = None,
    **kwargs,
):
    """``model(*args, **kwargs)`` with the tensors of ``params`` in place of the named parameters.

    Parameters not in ``params`` (frozen ones) keep their values. ``keep_buffers`` (default) runs
    on clones of the buffers, so BatchNorm's running statistics of ``model`` are not touched.
    Autocast is disabled unless ``amp_dtype`` is given.
    """
    tensors: Dict[str, torch.Tensor] = dict(params)
    if keep_buffers:
        for name, buf in model.named_buffers():
            if buf is not None:
                tensors[name] = buf.clone()
    device_type = next(iter(params.values())).device.type if params else "cpu"
    with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return functional_call(model, tensors, args, kwargs)


def virtual_sgd_step(
    params: Params,
    loss: torch.Tensor,
    lr: Union[float, torch.Tensor],
    *,
    weight_decay: float = 0.0,
    differentiable: bool = True,
) -> Params:
    """θ̂ = θ − lr (∇θ loss + weight_decay θ), for every entry of ``params``.

    ``differentiable=True`` builds the graph of the gradient (``create_graph``), so θ̂ is a
    differentiable function of whatever ``loss`` depends on besides θ (second order);
    ``False`` uses the gradient as a constant. A parameter that ``loss`` does not reach gets a
    zero gradient. ``lr`` may be a tensor (e.g. produced by a meta-learned schedule).
    """
    names = list(params)
    grads = torch.autograd.grad(
        loss, [params[n] for n in names], create_graph=differentiable, allow_unused=True
    )
    out: Params = {}
    for name, g in zip(names, grads):
        p = params[name]
        if g is None:
            g = torch.zeros_like(p)
        elif not differentiable:
            g = g.detach()
        if weight_decay:
            g = g + weight_decay * p
        out[name] = p - lr * g
    return out


def hypergradient(
    model: nn.Module,
    meta_params: Sequence[torch.Tensor],
    train_loss_fn: LossFn,
    meta_loss_fn: LossFn,
    lr: Union[float, torch.Tensor],
    *,
    weight_decay: float = 0.0,
    differentiable: bool = True,
    params: Optional[Params] = None,
):
    """∇φ L_meta(θ̂(φ)) with θ̂(φ) = θ − lr (∇θ L_train(θ, φ) + weight_decay θ).

    Args:
        model: the (bare) model whose parameters are θ.
        meta_params: φ, leaf tensors with ``requires_grad`` (need not belong to ``model``).
        train_loss_fn: θ-dict -> scalar training loss (depends on φ), e.g. :func:`loss_closure`.
        meta_loss_fn: θ̂-dict -> scalar meta loss.
        lr, weight_decay, differentiable: of the virtual step (:func:`virtual_sgd_step`).
        params: θ (default: :func:`trainable_params` of ``model``).
    Returns:
        (grads, train_loss, meta_loss): one gradient per entry of ``meta_params`` (zeros where the
        meta loss does not reach it) and the two detached losses. Nothing is accumulated into any
        ``.grad``; ``model``'s parameters and buffers are unchanged.
    """
    theta = trainable_params(model) if params is None else params
    train_loss = train_loss_fn(theta)
    theta_hat = virtual_sgd_step(
        theta, train_loss, lr, weight_decay=weight_decay, differentiable=differentiable
    )
    meta_loss = meta_loss_fn(theta_hat)
    meta_params = list(meta_params)
    raw_grads = torch.autograd.grad(meta_loss, meta_params, allow_unused=True)
    grads = [
        torch.zeros_like(p) if g is None else g.detach() for p, g in zip(meta_params, raw_grads)
    ]
    return grads, train_loss.detach(), meta_loss.detach()


def apply_meta_gradients(
    meta_params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    info: DistInfo = DistInfo(),
    max_norm: Optional[float] = None,
) -> torch.Tensor:
    """Average ``grads`` over DDP ranks, optionally clip their global norm, set them as ``.grad``
    of ``meta_params`` and step ``optimizer``. Returns the (pre-clip) global gradient norm."""
    meta_params, grads = list(meta_params), list(grads)
    if info.enabled and grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        all_reduce_sum(flat, info)
        flat /= info.world_size
        grads = [
            chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)
        ]
    norm = (
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if grads
        else torch.zeros(())
    )
    if max_norm is not None and grads:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        grads = [g * scale for g in grads]
    optimizer.zero_grad(set_to_none=True)
    for p, g in zip(meta_params, grads):
        p.grad = g.to(p.dtype).clone()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach()


@dataclass
class MetaStepStats:
    train_loss: torch.Tensor  # L_train(θ, φ_old) of the virtual step (detached)
    meta_loss: torch.Tensor  # L_meta(θ̂(φ_old)) (detached)
    grad_norm: torch.Tensor  # global norm of the (rank-averaged) hyper-gradient


def bilevel_meta_step(
    model: nn.Module,
    meta_params: Sequence[torch.Tensor],
    meta_optimizer: torch.optim.Optimizer,
    train_loss_fn: LossFn,
    meta_loss_fn: LossFn,
    lr: Union[float, torch.Tensor],
    *,
    weight_decay: float = 0.0,
    differentiable: bool = True,
    info: DistInfo = DistInfo(),
    max_norm: Optional[float] = None,
) -> MetaStepStats:
    """One meta update of ``meta_params``: :func:`hypergradient` then :func:`apply_meta_gradients`.

    The caller then takes its real step of θ with the updated φ. ``lr`` is the virtual step's α
    (MFM: the current lr of the model optimiser, so α follows warm-up and decays).
    """
    grads, train_loss, meta_loss = hypergradient(
        model,
        meta_params,
        train_loss_fn,
        meta_loss_fn,
        lr,
        weight_decay=weight_decay,
        differentiable=differentiable,
    )
    norm = apply_meta_gradients(meta_params, grads, meta_optimizer, info, max_norm)
    return MetaStepStats(train_loss, meta_loss, norm)


def loss_closure(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    *,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    amp_dtype: Optional[torch.dtype] = None,
    keep_buffers: bool = True,
) -> LossFn:
    """θ-dict -> ``loss_fn(functional_forward(model, θ, images).logits, labels)``.

    ``context()`` is entered around the forward (e.g. MFM's ``modulation.active(True)``); logits
    are cast to float32 (or kept in float64) before the loss.
    """

    def fn(params: Params) -> torch.Tensor:
        with context():
            out = functional_forward(
                model, params, images, keep_buffers=keep_buffers, amp_dtype=amp_dtype
            )
        logits = out.logits if hasattr(out, "logits") else out
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        return loss_fn(logits, labels)

    return fn


META_OPTIMIZERS = {
    "adam": lambda params, lr, wd, momentum: torch.optim.Adam(params, lr=lr, weight_decay=wd),
    "sgd": lambda params, lr, wd, momentum: torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=wd
    ),
}


def make_meta_optimizer(
    params: Sequence[torch.Tensor],
    name: str = "adam",
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """The meta optimiser: ``adam`` (default, lr 1e-3, wd 1e-4: MLR-SNet's choice) or ``sgd``
    (momentum, the Meta-Weight-Net choice: lr 1e-5, nesterov off here)."""
    if name not in META_OPTIMIZERS:
        raise ValueError(f"meta optimiser {name!r}: use one of {', '.join(META_OPTIMIZERS)}")
    return META_OPTIMIZERS[name](list(params), lr, weight_decay, momentum)


__all__ = [
    "META_OPTIMIZERS",
    "MetaStepStats",
    "apply_meta_gradients",
    "bilevel_meta_step",
    "functional_forward",
    "hypergradient",
    "loss_closure",
    "make_meta_optimizer",
    "trainable_params",
    "virtual_sgd_step",
]
