"""The one step mechanism (longtail/optim/wrapper.py): gradient accumulation gives the step of the
whole batch (plain, clipped, SAM, RSAM), DDP synchronises only on the last micro-batch
(no_sync), the loss it returns is the whole batch's, and an end-to-end run with
train.accumulate_steps=2 trains the same weights as one with whole batches (no BatchNorm)."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_distributed import CONFIG as DCONFIG
from test_distributed import TINY as DTINY
from test_distributed import _without_bn

from longtail.core.config import OptimConfig, load_config
from longtail.core.errors import ConfigError
from longtail.engine import trainer
from longtail.optim import OptimWrapper, build_optimizer, optim_info


class B(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


def _data(n=30, d=5, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return B(x, y, torch.arange(n))


class Recorder(nn.Module):
    """A linear model that counts its no_sync blocks, as DDP's would be entered."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(5, 4).double()
        self.no_sync_calls = 0

    @contextlib.contextmanager
    def no_sync(self):
        self.no_sync_calls += 1
        yield

    def forward(self, x):
        return self.fc(x)


def _steps(name, accumulate, clip=None, steps=3, **options):
    model = Recorder()
    cfg = OptimConfig(name=name, lr=0.1, weight_decay=1e-3, grad_clip=clip, momentum=0.9, **options)
    opt = build_optimizer(cfg, list(model.fc.parameters()), seed=3)
    wrapper = OptimWrapper(
        opt,
        needs_closure=optim_info(name).needs_closure,
        grad_clip=clip,
        model=model,
        accumulate_steps=accumulate,
        train_model=model,
    )
    losses = []
    for s in range(steps):
        batch = _data(seed=s)
        losses.append(wrapper.update(lambda b: F.cross_entropy(model(b.images), b.labels), batch))
    return model, losses


@pytest.mark.parametrize(
    "name, options", [("sgd", {}), ("sam", {"rho": 0.1}), ("rsam", {"rho": 0.5})]
)
@pytest.mark.parametrize("clip", [None, 0.05])
def test_accumulated_step_equals_the_whole_batch_step(name, options, clip):
    whole, whole_losses = _steps(name, 1, clip, **options)
    acc, acc_losses = _steps(name, 3, clip, **options)
    for a, b in zip(whole.parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.stack(acc_losses), torch.stack(whole_losses), rtol=1e-12, atol=1e-12
    )
    # DDP would synchronise once per closure evaluation: 2 of the 3 micro-batches run in no_sync
    passes = 2 if name == "sam" else 1
    assert acc.no_sync_calls == 3 * passes * 2 and whole.no_sync_calls == 0


def test_micro_batches_cover_the_batch_once():
    wrapper = OptimWrapper(
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), accumulate_steps=4
    )
    batch = _data(n=10)
    parts = wrapper.micro_batches(batch)
    assert [len(p.labels) for p, _ in parts] == [2, 3, 2, 3]
    assert sum(w for _, w in parts) == pytest.approx(1.0)
    assert torch.equal(torch.cat([p.indices for p, _ in parts]), batch.indices)


def test_a_loss_outside_the_closure_cannot_accumulate():
    wrapper = OptimWrapper(
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), accumulate_steps=2
    )
    with pytest.raises(ConfigError, match="accumulate_steps"):
        wrapper.step_with_loss(torch.zeros((), requires_grad=True))
    with pytest.raises(ConfigError, match="accumulate_steps"):
        load_config(DCONFIG, [*DTINY, "train.accumulate_steps=0"])


def test_training_with_accumulation_matches_whole_batches(tiny_cifar_root, monkeypatch):
    build = trainer.build_model
    monkeypatch.setattr(trainer, "build_model", lambda *a, **k: _without_bn(build(*a, **k)))
    states = []
    for k in (1, 4):
        cfg = load_config(
            DCONFIG,
            [
                *DTINY,
                "train.batch_size=32",
                "optim.lr=0.01",
                "train.epochs=1",
                f"train.accumulate_steps={k}",
            ],
        )
        run = trainer.build_run(cfg, Path("unused"), tiny_cifar_root)
        trainer.train_one_epoch(run, 0, None)
        states.append(copy.deepcopy(run.method.model.state_dict()))
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=1e-4, atol=1e-5, msg=key)
