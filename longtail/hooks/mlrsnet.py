"""MLR-SNet — a meta-learned learning-rate schedule (Shu, Zhu, Zhao, Meng, Xu; arXiv 2007.14546).

lr_t = γ · σ(w·h_t + b), (h_t, c_t) = LSTM-style cell(L_t, h_{t−1}, c_{t−1});
γ = |√L0 ln(L0 C) / C^¼| / 4, L0 the initial mean training CE.

A training hook (``hooks: {mlrsnet: {...}}``, :mod:`longtail.hooks.base`): after each step's first
backward it reads the step's mean loss L_t and sets every param group's lr. ``mode``:
``meta_train`` (every ``meta_every`` steps one Adam step on a one-step look-ahead scored on the
meta set, :mod:`longtail.optim.meta`) or ``transfer`` (frozen snapshots from ``checkpoint``).
Details, defaults and where we differ from the reference code: docs/methods/meta.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from longtail.core.distributed import all_reduce_sum
from longtail.core.errors import ConfigError
from longtail.core.io import atomic_write, atomic_write_json
from longtail.core.modules import frozen_running_stats
from longtail.data.augment import normalize
from longtail.data.meta import build_meta_loader
from longtail.hooks.base import HOOKS, Hook
from longtail.optim.base import Options, parse_options
from longtail.optim.meta import bilevel_meta_step, loss_closure, make_meta_optimizer

State = Tuple[torch.Tensor, torch.Tensor]
BUNDLE_FILE = "mlrsnet.safetensors"
SNAPSHOT_DIR = "mlrsnet"
LR_FILE = "mlrsnet_lr.json"


class MLRSNetCell(nn.Module):
    """The LSTM-style cell of the reference (``MLRSNetCell``): input and hidden transforms are
    two-layer MLPs of width hidden // 2 into the four gates; forget gate biased by -1."""

    def __init__(self, inputs: int, hidden: int):
        super().__init__()
        self.hidden = int(hidden)
        width = self.hidden // 2
        self.fc_i2h = nn.Sequential(
            nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, 4 * hidden)
        )
        self.fc_h2h = nn.Sequential(
            nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, 4 * hidden)
        )

    def forward(self, x: torch.Tensor, state: State) -> State:
        h, c = state
        gates = self.fc_i2h(x) + self.fc_h2h(h)
        g_in, g_forget, g_out, g_cell = gates.chunk(4, dim=1)
        c = torch.sigmoid(g_forget - 1.0) * c + torch.sigmoid(g_in) * torch.tanh(g_cell)
        h = torch.sigmoid(g_out) * torch.tanh(c)
        return h, c


class MLRSNet(nn.Module):
    """The schedule network, in the reference layout (``layer1`` the cell, ``layer3`` the output
    layer: the keys of the released snapshots). Layers keep PyTorch's default initialisation, as
    the reference's do (its uniform re-initialisation tests for a class its layers are not).

    ``forward(loss, state)``: loss a scalar (any shape with one element); state ``(h, c)``, each
    float32 [1, hidden]. Returns ``(out, (h', c'))`` with out float32 [1, 1] in (0, 1).
    """

    def __init__(self, hidden: int = 50):
        super().__init__()
        self.hidden = int(hidden)
        self.layer1 = MLRSNetCell(1, self.hidden)
        self.layer3 = nn.Linear(self.hidden, 1)

    def initial_state(self, device: torch.device = torch.device("cpu")) -> State:
        zeros = torch.zeros(1, self.hidden, device=device)
        return zeros, zeros.clone()

    def forward(self, loss: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        x = loss.reshape(1, 1).to(self.layer3.weight.dtype)
        h, c = self.layer1(x, state)
        return torch.sigmoid(self.layer3(h)), (h, c)


def gamma_rule(initial_loss: float, num_classes: int) -> float:
    """γ = |√L0 · ln(L0 C) / C^(1/4)| / 4 (meta_train.py / meta_test.py)."""
    L0, C = float(initial_loss), int(num_classes)
    if not (L0 > 0 and math.isfinite(L0)):
        raise ValueError(f"the initial loss must be positive and finite, got {L0}")
    return abs(math.sqrt(L0) * math.log(L0 * C) / C**0.25) / 4


# ---------------------------------------------------------------------------------------------
# snapshots


def save_snapshots(
    path: Path,
    nets: List[Dict[str, torch.Tensor]],
    epochs: List[int],
    hidden: int,
    info: Optional[Dict[str, Any]] = None,
) -> None:
    """Write snapshots (state dicts of :class:`MLRSNet`) as one safetensors file, keys
    ``snapshot{k}.{name}``; metadata: hidden size, the epochs they come from, ``info``."""
    tensors = {
        f"snapshot{k}.{name}": t.detach().cpu().contiguous()
        for k, sd in enumerate(nets)
        for name, t in sd.items()
    }
    meta = {
        "format": "longtail-mlrsnet",
        "hidden": str(hidden),
        "epochs": json.dumps([int(e) for e in epochs]),
        "info": json.dumps(info or {}),
    }
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


OFFICIAL_GLOB = "mlr_snet *.pth"  # the released snapshots: "mlr_snet 1.pth", "... 100.pth", ...


def load_official_snapshots(
    paths: List[Path],
) -> Tuple[List[Dict[str, torch.Tensor]], int, List[int]]:
    """The snapshots released with the paper (xjtushujun/MLR-SNet ``meta-test/mlr_snet N.pth``,
    plain state dicts in the reference layout), ordered by N; hidden from their shapes."""
    nets, epochs = [], []
    for path in sorted(paths, key=lambda p: int(p.stem.split()[-1])):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConfigError(
                f"hooks.mlrsnet.checkpoint: {path} cannot be loaded safely ({err})."
            ) from None
        if not isinstance(state, dict) or "layer3.weight" not in state:
            raise ConfigError(
                f"hooks.mlrsnet.checkpoint: {path} is not an MLR-SNet state dict "
                f"(no layer3.weight)."
            )
        nets.append({k: v for k, v in state.items()})
        epochs.append(int(path.stem.split()[-1]))
    hidden = int(nets[0]["layer3.weight"].shape[1])
    reference = MLRSNet(hidden).state_dict()
    for path, net in zip(paths, nets):
        missing, unexpected = sorted(set(reference) - set(net)), sorted(set(net) - set(reference))
        if missing or unexpected:
            raise ConfigError(
                f"hooks.mlrsnet.checkpoint: {path} does not fit the MLR-SNet "
                f"architecture (missing {missing[:3]}, unexpected {unexpected[:3]})."
            )
    return nets, hidden, epochs


def load_snapshots(path: str | Path) -> Tuple[List[Dict[str, torch.Tensor]], int, List[int]]:
    """(state dicts, hidden, epochs) from a ``mlrsnet.safetensors`` (or a run folder holding one,
    or a single per-epoch snapshot file), or from the officially released snapshots (a folder
    holding ``mlr_snet N.pth`` files, or one such file). ConfigError naming the path when it
    cannot be used."""
    p = Path(path)
    if p.is_dir() and not (p / BUNDLE_FILE).is_file() and sorted(p.glob(OFFICIAL_GLOB)):
        return load_official_snapshots(sorted(p.glob(OFFICIAL_GLOB)))
    if p.is_file() and p.suffix == ".pth":
        return load_official_snapshots([p])
    if p.is_dir():
        p = p / BUNDLE_FILE
    if not p.is_file():
        raise ConfigError(
            f"hooks.mlrsnet.checkpoint={path}: no MLR-SNet snapshot file at {p}. Meta-train one "
            f"first (longtail train configs/methods/mlrsnet.yaml data=cifar10_lt writes "
            f"RUN_DIR/{BUNDLE_FILE}) and pass that file or its run folder, or pass the folder of "
            f"the released snapshots ({OFFICIAL_GLOB})."
        )
    with safe_open(str(p), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("format") != "longtail-mlrsnet":
        raise ConfigError(
            f"hooks.mlrsnet.checkpoint={path}: {p} is not an MLR-SNet snapshot file "
            f"(written by the mlrsnet hook in meta_train mode)."
        )
    tensors = load_file(str(p))
    groups: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        head, name = key.split(".", 1)
        groups.setdefault(int(head[len("snapshot") :]), {})[name] = t
    nets = [groups[k] for k in sorted(groups)]
    if "layer3.weight" not in nets[0]:
        raise ConfigError(
            f"hooks.mlrsnet.checkpoint={path}: {p} holds an MLR-SNet of the layout before 0.2 "
            f"(inner width = hidden, not hidden // 2 as the reference): meta-train it again."
        )
    return nets, int(meta["hidden"]), list(json.loads(meta.get("epochs", "[]")))


def bundle_epochs(epochs: int) -> List[int]:
    """The 1-based epochs a meta-training run bundles: first, middle, last (1, 100, 200 of 200)."""
    return sorted({1, max(epochs // 2, 1), epochs})


# ---------------------------------------------------------------------------------------------
# the hook


class MLRSNetOptions(Options):
    """``hooks.mlrsnet.*`` (see docs/methods/meta.md)."""

    mode: Optional[str] = Field(
        None, pattern="^(meta_train|transfer)$"
    )  # None: transfer iff checkpoint
    checkpoint: Optional[str] = None  # mlrsnet.safetensors (or its run folder) for transfer
    hidden: int = Field(50, ge=1)  # width of the LSTM-style cell
    meta_every: int = Field(300, ge=1)  # meta_train: one update of the net every N steps
    meta_batch_size: int = Field(128, ge=1)  # meta images per update (global, split over ranks)
    meta_lr: float = Field(1e-3, gt=0.0)  # Adam on the net's weights
    meta_weight_decay: float = Field(1e-4, ge=0.0)
    gamma: Optional[float] = Field(None, gt=0.0)  # fixed lr scale instead of the initial-loss rule
    gamma_images: Optional[int] = Field(None, ge=1)  # training images for that loss (None: all)


@HOOKS.register("mlrsnet")
class MLRSNetHook(Hook):
    """The MLR-SNet learned lr: every step's lr from the net (see docs/methods/meta.md)."""

    options_model = MLRSNetOptions

    @staticmethod
    def check_options(options: Dict[str, Any], where: str) -> None:
        parse_options(MLRSNetOptions, options, where)

    def __init__(self, facts, **options):
        opts = parse_options(MLRSNetOptions, options, "hooks.mlrsnet")
        self.epochs, self.opts = int(facts.epochs), opts
        self.weight_decay, self.base_lr = 0.0, 0.1  # the run's optim section (before_run)
        self.mode = opts.mode or ("transfer" if opts.checkpoint else "meta_train")
        self.snapshots: List[Dict[str, torch.Tensor]] = []
        self.snapshot_epochs: List[int] = []
        hidden = opts.hidden
        if self.mode == "transfer":
            if not opts.checkpoint:
                raise ConfigError(
                    "hooks.mlrsnet.mode=transfer needs hooks.mlrsnet.checkpoint=PATH "
                    f"(a {BUNDLE_FILE} from a meta_train run, or its run folder)."
                )
            self.snapshots, hidden, self.snapshot_epochs = load_snapshots(opts.checkpoint)
        with torch.random.fork_rng(devices=[]):  # leaves the run's global RNG alone
            self.net = MLRSNet(hidden)
        if self.snapshots:
            self.net.load_state_dict(self.snapshots[0])
        self.net.requires_grad_(self.mode == "meta_train")
        self.state: State = self.net.initial_state()
        self.gamma: Optional[float] = None
        self.gammas: List[float] = []
        self.active = -1  # snapshot in use (transfer)
        self.steps = 0  # training steps whose lr the net has set
        self.meta_steps = 0
        self.lrs: List[float] = []  # every step's lr (lr_schedule.json, the plot)
        self.last_lr = 0.0
        self._epoch_meta: List[float] = []
        self._epoch_start_step = 0
        self.run: Any = None
        self.meta_loader: Any = None
        self.meta_optimizer: Any = None

    # -- wiring ------------------------------------------------------------------------------
    def before_run(self, run) -> None:
        self.run = run
        self.weight_decay, self.base_lr = float(run.cfg.optim.weight_decay), float(run.cfg.optim.lr)
        if not self.snapshots:  # a fresh net, drawn from the run's seed (not the global RNG)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(run.cfg.seed) + 0x5EED)
                self.net = MLRSNet(self.net.hidden)
        self.net.to(run.device)
        self.state = self.net.initial_state(run.device)
        if self.mode == "meta_train":
            data = run.data
            if getattr(data, "meta", None) is None or len(data.meta) == 0:
                raise ConfigError(
                    "hooks.mlrsnet meta-trains its net on a balanced meta set, but the run "
                    "has none: set data.meta_per_class (e.g. 10), or train under a meta-trained net "
                    "with hooks.mlrsnet.checkpoint=PATH (transfer mode, no meta set)."
                )
            self.meta_loader = build_meta_loader(
                data,
                run.cfg,
                run.device,
                batch_size=self.opts.meta_batch_size,
                rank=run.dist.rank,
                world_size=run.dist.world_size,
            )
            self.meta_optimizer = make_meta_optimizer(
                self.net.parameters(), "adam", self.opts.meta_lr, self.opts.meta_weight_decay
            )
            initial = run.folder.artifact(SNAPSHOT_DIR) / "epoch_000.safetensors"
            if run.dist.is_main and not initial.exists():  # the untrained net, for comparison
                initial.parent.mkdir(parents=True, exist_ok=True)
                save_snapshots(initial, [self.net.state_dict()], [0], self.net.hidden)

    # -- per epoch ---------------------------------------------------------------------------
    def snapshot_index(self, epoch: int) -> int:
        n = max(len(self.snapshots), 1)
        return min(n * epoch // max(self.epochs, 1), n - 1)

    def before_epoch(self, run, epoch: int) -> None:
        self._epoch_meta = []
        self._epoch_start_step = self.steps
        if self.mode == "transfer":
            k = self.snapshot_index(epoch)
            if k != self.active:
                self.net.load_state_dict(self.snapshots[k])
                self.active = k
                self.gamma = None  # γ follows the network at every switch
        if self.gamma is None:
            self.gamma = (
                float(self.opts.gamma)
                if self.opts.gamma is not None
                else gamma_rule(self.training_loss(), len(self.run.data.class_counts))
            )
            self.gammas.append(self.gamma)

    def after_epoch(self, run, epoch: int) -> Dict[str, Any]:
        if self.steps == self._epoch_start_step and len(run.loader):
            raise ConfigError(
                f"hooks.mlrsnet got no loss from method.name={run.cfg.method.name}: "
                f"its train_step does not step through OptimWrapper.update, which "
                f"reports each step's loss."
            )
        lrs = self.lrs[self._epoch_start_step :]
        stats: Dict[str, Any] = {
            "gamma": self.gamma,
            "lr_mean": sum(lrs) / max(len(lrs), 1),
            "lr_min": min(lrs, default=0.0),
            "lr_max": max(lrs, default=0.0),
        }
        if self.mode == "transfer":
            stats["snapshot"] = self.active
        if self._epoch_meta:
            stats["meta_loss"] = sum(self._epoch_meta) / len(self._epoch_meta)
        if self.mode == "meta_train" and self.run.dist.is_main:
            folder = run.folder.artifact(SNAPSHOT_DIR)
            folder.mkdir(exist_ok=True)
            save_snapshots(
                folder / f"epoch_{epoch + 1:03d}.safetensors",
                [self.net.state_dict()],
                [epoch + 1],
                self.net.hidden,
                {"gamma": self.gamma},
            )
        return {"mlrsnet": stats}

    @torch.no_grad()
    def training_loss(self) -> float:
        """Mean CE of the current model over the (un-augmented) training images.

        BatchNorm uses batch statistics (train mode; its running statistics are restored
        afterwards), not the running ones: at initialisation those are still mean 0 / variance 1,
        under which ResNet-32's logits explode (eval-mode L0 = 808 on CIFAR-10-LT, gamma 36, and
        training diverged within 5 steps), while with batch statistics L0 is the loss the network
        trains with, about ln C at the start. The reference code uses eval mode on its networks.
        """
        run = self.run
        model = run.method.model
        train = run.data.train
        n = len(train.labels)
        idx = torch.arange(n)
        if self.opts.gamma_images is not None and self.opts.gamma_images < n:
            g = torch.Generator().manual_seed(int(run.cfg.seed))
            idx = torch.randperm(n, generator=g)[: self.opts.gamma_images].sort().values
        was_training = model.training
        model.train()
        fmt = torch.channels_last if run.cfg.train.channels_last else torch.contiguous_format
        total = torch.zeros((), dtype=torch.float64)
        g = torch.Generator().manual_seed(int(run.cfg.seed) + 1)
        order = idx[torch.randperm(len(idx), generator=g)]  # class-mixed batches
        try:
            with frozen_running_stats(model):
                for chunk in order.split(run.cfg.train.eval_batch_size):
                    x = normalize(train.images[chunk].to(run.device), run.data.mean, run.data.std)
                    logits = model(x.contiguous(memory_format=fmt)).logits.float()
                    y = train.labels[chunk].to(run.device)
                    total += F.cross_entropy(logits, y, reduction="sum").double().cpu()
        finally:
            model.train(was_training)
        return float(total) / len(idx)

    # -- per step ----------------------------------------------------------------------------
    def after_backward(self, run, batch, loss: torch.Tensor) -> None:
        """Meta-train when due, then set the lr of this step from its loss."""
        L = loss.detach().float().reshape(1).clone()
        if run.dist.enabled:
            all_reduce_sum(L, run.dist)
            L /= run.dist.world_size
        if self.mode == "meta_train" and (self.steps + 1) % self.opts.meta_every == 0:
            self._epoch_meta.append(self.meta_update(batch, L))
        with torch.no_grad():
            out, state = self.net(L, self.state)
        self.state = (state[0].detach(), state[1].detach())
        lr = self.gamma * float(out)
        groups = run.optim.param_groups
        first = groups[0].get("base_lr", self.base_lr) or 1.0
        for group in groups:
            group["lr"] = lr * group.get("base_lr", first) / first
        self.last_lr = lr
        self.lrs.append(lr)
        self.steps += 1

    def meta_update(self, batch, L: torch.Tensor) -> float:
        """One Adam step of ω on the look-ahead of this batch; returns the meta loss."""
        run, method = self.run, self.run.method
        model = method.model
        out, _ = self.net(L, self.state)  # the state is not advanced here
        lr = self.gamma * out.reshape(())
        meta = self.meta_loader.batch(self.meta_steps)
        train_fn = loss_closure(model, batch.images, batch.labels, method.loss)
        meta_fn = loss_closure(model, meta.images, meta.labels, F.cross_entropy)
        stats = bilevel_meta_step(
            model,
            list(self.net.parameters()),
            self.meta_optimizer,
            train_fn,
            meta_fn,
            lr,
            weight_decay=self.weight_decay,
            differentiable=False,
            info=run.dist,
        )
        self.meta_steps += 1
        return float(stats.meta_loss)

    # -- results and state -------------------------------------------------------------------
    def metrics(self, run) -> Dict[str, Any]:
        return {
            "mlrsnet": {
                "mode": self.mode,
                "checkpoint": self.opts.checkpoint,
                "gammas": self.gammas,
                "meta_steps": self.meta_steps,
                "meta_every": self.opts.meta_every,
                "snapshot_epochs": self.snapshot_epochs,
                "lr_first": self.lrs[0] if self.lrs else None,
                "lr_last": self.lrs[-1] if self.lrs else None,
                "lr_min": min(self.lrs, default=None),
                "lr_max": max(self.lrs, default=None),
            }
        }

    def save_artifacts(self, run, folder) -> None:
        run_dir = Path(folder.path)

        steps = len(self.lrs) // max(self.epochs, 1) if self.epochs else 0
        atomic_write_json(
            run_dir / LR_FILE,
            {"mode": self.mode, "gammas": self.gammas, "steps_per_epoch": steps, "lr": self.lrs},
        )
        if self.mode == "meta_train":
            chosen = bundle_epochs(self.epochs)
            nets = [
                load_snapshots(run_dir / SNAPSHOT_DIR / f"epoch_{e:03d}.safetensors")[0][0]
                for e in chosen
            ]
            save_snapshots(
                run_dir / BUNDLE_FILE,
                nets,
                chosen,
                self.net.hidden,
                {"dataset": self.run.data.name, "gammas": self.gammas},
            )
        plot_lr(
            run_dir / "mlrsnet_lr.png",
            self.lrs,
            steps,
            f"{self.run.data.name}: MLR-SNet ({self.mode})",
        )

    def state_dict(self) -> Dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "h": self.state[0],
            "c": self.state[1],
            "gamma": self.gamma,
            "gammas": list(self.gammas),
            "active": self.active,
            "steps": self.steps,
            "meta_steps": self.meta_steps,
            "lrs": list(self.lrs),
            "meta_optimizer": (
                self.meta_optimizer.state_dict() if self.meta_optimizer is not None else None
            ),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.state = (
            state["h"].to(self.net.layer3.weight.device),
            state["c"].to(self.net.layer3.weight.device),
        )
        self.gamma, self.gammas = state["gamma"], list(state["gammas"])
        self.active, self.steps, self.meta_steps = (
            state["active"],
            state["steps"],
            state["meta_steps"],
        )
        self.lrs = list(state["lrs"])
        self.last_lr = self.lrs[-1] if self.lrs else 0.0
        if self.meta_optimizer is not None and state["meta_optimizer"] is not None:
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])


def plot_lr(path: Path, lrs: List[float], steps_per_epoch: int, title: str) -> None:
    """lr against training step (epochs on the x axis when known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = [i / steps_per_epoch for i in range(len(lrs))] if steps_per_epoch else range(len(lrs))
    ax.plot(xs, lrs, lw=0.8)
    ax.set_xlabel("epoch" if steps_per_epoch else "step")
    ax.set_ylabel("learning rate")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
