"""Sharpness-aware minimisation (SAM) and random-neighbourhood SAM (RSAM / GNM) as optimiser
wrappers driven by PyTorch's closure protocol (a base optimiser, ``optim.base``, does the update).

SAM (Foret et al., ICLR 2021; ``optim.name: sam``, ``rho``, ``adaptive`` for ASAM), two passes::

    e = rho g / (|g| + 1e-12);  g' = grad L(w + e);  w <- base_step(w, g')

RSAM / GNM (Li et al., NeurIPS 2024, GNM-PT; ``optim.name: rsam``), one pass::

    w' = w + rho dis_mul decay(e) xi,  xi ~ N(0, (1/3)^2) clamped to [-1, 1];  g = grad L(w')
    decay(e) = 0.5 ** floor((e - 1) / (D - 1)),  D = decay_epoch (default: the loss's drw_epoch)

Details (epoch-0 quirk, noise generator, clipping, DDP, BatchNorm, AMP): docs/methods/sharpness.md.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from pydantic import ConfigDict, Field

from longtail.core.errors import ConfigError
from longtail.optim.base import OptimInfo, Options, optim_info, parse_options, register_optimizer

BaseStep = Callable[[torch.optim.Optimizer], Any]


def _plain_step(optimizer: torch.optim.Optimizer) -> Any:
    return optimizer.step()


class PerturbedOptions(Options):
    """Options of sam / rsam; the keys they do not know are the base optimiser's (``momentum``)."""

    model_config = ConfigDict(extra="allow")
    rho: float = Field(0.05, ge=0.0)  # neighbourhood radius (SAM |e|; RSAM noise scale)
    base: str = "sgd"  # the optimiser wrapped (a registered name)


class SAMOptions(PerturbedOptions):
    adaptive: bool = False  # ASAM scaling, e = rho w^2 g / | |w| g |


class RSAMOptions(PerturbedOptions):
    dis_mul: float = Field(0.1, ge=0.0)  # GNM-PT's dis_mul (noise x rho x dis_mul)
    decay_epoch: Optional[int] = Field(None, ge=1)  # noise x0.5 from this 0-based epoch on
    #                                         (GNM-PT reweight_epoch + 1); None: the loss's drw_epoch
    fix_epoch0_quirk: bool = False  # factor 1 at epoch 0 (GNM-PT's formula gives 2)


def build_base(params, cfg, options: PerturbedOptions, facts) -> torch.optim.Optimizer:
    """The optimiser sam / rsam wrap: ``optim.base`` with the section's remaining keys."""
    info = optim_info(options.base)
    if info.needs_closure:
        raise ConfigError(
            f"optim.base={options.base} cannot be used under optim.name={cfg.name}: "
            f"the base must be a plain optimiser such as sgd."
        )
    base_options = parse_options(info.options_model, dict(options.model_extra or {}), "optim")
    return info.build(params, cfg, base_options, facts)


def rsam_noise_factor(
    epoch: int, decay_epoch: Optional[int], fix_epoch0_quirk: bool = False
) -> float:
    """GNM-PT's noise decay ``0.5 ** floor((epoch - 1) / (decay_epoch - 1))`` (0-based epochs).

    ``decay_epoch`` None: 1.0 always. The quirk: epoch 0 gives 2.0 unless ``fix_epoch0_quirk``.
    """
    if decay_epoch is None:
        return 1.0
    period = max(int(decay_epoch) - 1, 1)
    halvings = (int(epoch) - 1) // period
    if fix_epoch0_quirk:
        halvings = max(halvings, 0)
    return 0.5**halvings


class PerturbedOptimizer(torch.optim.Optimizer):
    """Base of SAM and RSAM: shares the base optimiser's groups and state, saves its own extras."""

    kind = "perturbed"

    def __init__(self, base: torch.optim.Optimizer, rho: float):
        if not rho >= 0.0:
            raise ConfigError(f"optim.rho must be >= 0, got {rho!r}.")
        super().__init__(base.param_groups, {})  # registers the base's group dicts (no copies)
        self.base = base
        self.rho = float(rho)
        self.epoch = 0
        self._link()

    def _link(self) -> None:
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.defaults = self.base.defaults

    # -- the parameters a step touches -------------------------------------------------------
    def _params(self) -> List[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @staticmethod
    def _move(params: List[torch.Tensor], deltas: List[torch.Tensor]) -> List[torch.Tensor]:
        """w <- w + delta for each parameter; returns exact copies of the old values."""
        saved = [p.detach().clone() for p in params]
        for p, d in zip(params, deltas):
            p.add_(d.to(device=p.device, dtype=p.dtype))
        return saved

    @staticmethod
    def _restore(params: List[torch.Tensor], saved: List[torch.Tensor]) -> None:
        for p, old in zip(params, saved):
            p.copy_(old)

    @staticmethod
    def _check_closure(closure: Optional[Callable[[], Any]], name: str) -> Callable[[], Any]:
        if closure is None:
            raise RuntimeError(
                f"{name}.step() needs a closure that zeroes the gradients, runs "
                f"forward + loss + backward and returns the loss "
                f"(OptimWrapper.update builds it)."
            )
        return torch.enable_grad()(closure)

    # -- torch.optim.Optimizer interface ------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if not hasattr(self, "base"):  # torch.optim.Optimizer.__init__ registering the groups
            return super().add_param_group(param_group)
        self.base.add_param_group(param_group)

    def extra_state(self) -> Dict[str, Any]:
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {
            "kind": self.kind,
            "base": self.base.state_dict(),
            "epoch": self.epoch,
            **self.extra_state(),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        kind = state_dict.get("kind") if isinstance(state_dict, dict) else None
        if kind != self.kind:
            raise ValueError(
                f"this optimizer state was saved by {kind or 'a plain optimiser'!r}, "
                f"not {self.kind!r}: resume with the optim.name it was trained with."
            )
        self.base.load_state_dict(state_dict["base"])
        self._link()  # load_state_dict replaced the base's group dicts
        self.epoch = int(state_dict["epoch"])
        self.load_extra_state(state_dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rho={self.rho}, base={self.base!r})"


class SAM(PerturbedOptimizer):
    """SAM: gradient at w, ascend to w + rho g/|g|, gradient there, base step at w with it."""

    kind = "sam"

    def __init__(self, base: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False):
        super().__init__(base, rho)
        self.adaptive = bool(adaptive)

    def perturbation(self, params: List[torch.Tensor]) -> List[torch.Tensor]:
        """e for each parameter with a gradient (the gradient the closure left in ``.grad``)."""
        grads: List[torch.Tensor] = []
        for p in params:  # step passes only parameters with a gradient
            assert p.grad is not None
            grads.append(p.grad)
        scaled = [(p.abs() * g if self.adaptive else g) for p, g in zip(params, grads)]
        device = params[0].device
        norms = [
            torch.linalg.vector_norm(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s)
            for s in scaled
        ]  # fp32 at least
        dtype = norms[0].dtype
        for n in norms[1:]:
            dtype = torch.promote_types(dtype, n.dtype)
        norm = torch.linalg.vector_norm(torch.stack([n.to(device, dtype) for n in norms]))
        scale = self.rho / (norm + 1e-12)
        return [
            (p * p * g if self.adaptive else g) * scale.to(g.device) for p, g in zip(params, grads)
        ]

    @torch.no_grad()
    def step(
        self, closure: Optional[Callable[[], Any]] = None, base_step: Optional[BaseStep] = None
    ) -> Any:
        """One SAM step; ``base_step(base)`` (default ``base.step()``) makes the final update."""
        closure = self._check_closure(closure, "SAM")
        base_step = base_step or _plain_step
        loss = closure()  # gradient at w
        params = [p for p in self._params() if p.grad is not None]
        if not params:
            base_step(self.base)
            return loss
        saved = self._move(params, self.perturbation(params))  # w + e
        try:
            closure()  # gradient at w + e
        finally:
            self._restore(params, saved)  # back to w, bit for bit
        base_step(self.base)
        return loss

    def __repr__(self) -> str:
        return f"SAM(rho={self.rho}, adaptive={self.adaptive}, base={self.base!r})"


class RSAM(PerturbedOptimizer):
    """RSAM / GNM: gradient at a random point of a Gaussian neighbourhood of w, base step at w."""

    kind = "rsam"

    def __init__(
        self,
        base: torch.optim.Optimizer,
        rho: float = 0.05,
        dis_mul: float = 0.1,
        decay_epoch: Optional[int] = None,
        fix_epoch0_quirk: bool = False,
        seed: int = 0,
    ):
        super().__init__(base, rho)
        if not dis_mul >= 0.0:
            raise ConfigError(f"optim.dis_mul must be >= 0, got {dis_mul!r}.")
        if decay_epoch is not None and (isinstance(decay_epoch, bool) or int(decay_epoch) < 1):
            raise ConfigError(
                f"optim.decay_epoch must be a positive epoch or null, got {decay_epoch!r}."
            )
        self.dis_mul = float(dis_mul)
        self.decay_epoch = None if decay_epoch is None else int(decay_epoch)
        self.fix_epoch0_quirk = bool(fix_epoch0_quirk)
        self.seed = int(seed)
        self.steps = 0
        params = self._params()
        device = params[0].device if params else torch.device("cpu")
        self.generator = torch.Generator(device=device)
        # a stream of its own: not the global RNG's (which the same seed initialised the model with)
        self.generator.manual_seed((self.seed * 1_000_003 + 0x52534D) % (2**63))

    def noise_factor(self, epoch: Optional[int] = None) -> float:
        """rho * dis_mul * decay(epoch): the scale of xi in the perturbation."""
        e = self.epoch if epoch is None else epoch
        return (
            self.rho * self.dis_mul * rsam_noise_factor(e, self.decay_epoch, self.fix_epoch0_quirk)
        )

    def sample_xi(self, param: torch.Tensor) -> torch.Tensor:
        """xi ~ N(0, (1/3)^2) clamped to [-1, 1], float32, the parameter's shape."""
        gen = self.generator
        xi = torch.randn(param.shape, generator=gen, device=gen.device, dtype=torch.float32)
        return xi.div_(3.0).clamp_(-1.0, 1.0)

    @torch.no_grad()
    def step(
        self, closure: Optional[Callable[[], Any]] = None, base_step: Optional[BaseStep] = None
    ) -> Any:
        """One RSAM step; ``base_step(base)`` (default ``base.step()``) makes the final update."""
        closure = self._check_closure(closure, "RSAM")
        params = [p for p in self._params() if p.requires_grad]
        factor = self.noise_factor()
        saved = self._move(params, [self.sample_xi(p).mul_(factor) for p in params])
        try:
            loss = closure()  # gradient at w + e
        finally:
            self._restore(params, saved)
        (base_step or _plain_step)(self.base)
        self.steps += 1
        return loss

    def extra_state(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state(), "steps": self.steps, "seed": self.seed}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu())
        self.steps = int(state.get("steps", 0))

    def __repr__(self) -> str:
        return (
            f"RSAM(rho={self.rho}, dis_mul={self.dis_mul}, decay_epoch={self.decay_epoch}, "
            f"fix_epoch0_quirk={self.fix_epoch0_quirk}, base={self.base!r})"
        )


def build_sam(params, cfg, options: SAMOptions, facts) -> SAM:
    """SAM: the gradient at w + rho g / |g| drives the base step at w (two passes a step)."""
    return SAM(build_base(params, cfg, options, facts), rho=options.rho, adaptive=options.adaptive)


def build_rsam(params, cfg, options: RSAMOptions, facts) -> RSAM:
    """RSAM / GNM: the gradient at a random point near w drives the base step (one pass a step).

    The noise decays at ``decay_epoch``, by default the epoch the run's loss starts re-weighting
    (its ``drw_epoch``); the noise generator is seeded from the run's seed."""
    decay = options.decay_epoch
    if decay is None:
        decay = getattr(facts.loss, "drw_epoch", None)
    return RSAM(
        build_base(params, cfg, options, facts),
        rho=options.rho,
        dis_mul=options.dis_mul,
        decay_epoch=decay,
        fix_epoch0_quirk=options.fix_epoch0_quirk,
        seed=facts.seed,
    )


SAM_INFO = register_optimizer(
    OptimInfo("sam", build_sam, SAMOptions, needs_closure=True, base_key="base")
)
RSAM_INFO = register_optimizer(
    OptimInfo("rsam", build_rsam, RSAMOptions, needs_closure=True, base_key="base")
)

__all__ = ["SAM", "RSAM", "PerturbedOptimizer", "rsam_noise_factor", "build_base"]
