"""The fast training path on the CPU: the sync-free TrainLoader (one host-to-device copy of an
epoch's order and augmentation, no ``flips.any()``, normalisation constants made once) gives bit
for bit the batches of the per-batch implementation it replaced, kept here as the reference, for
every sampler and rank; ``train.compile`` takes torch.compile's modes and the run passes its mode."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN

from longtail.core.config import load_config
from longtail.core.errors import ConfigError
from longtail.core.facts import RunFacts
from longtail.data.augment import Normalizer, normalize, random_crop_flip, sample_params
from longtail.data.loader import TrainLoader, _generator, eval_batches
from longtail.data.samplers import SAMPLERS, build_sampler
from longtail.engine.trainer import build_run

CE = Path(__file__).resolve().parents[1] / "configs" / "methods" / "ce.yaml"

LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(5), [90, 50, 25, 12, 6]))
IMAGES = torch.randint(
    0, 256, (len(LABELS), 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
)
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


# ----------------------------------------------------------------- the replaced implementation


def _old_crop_flip(images, offsets, flips, padding):
    b, c, h, w = images.shape
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        rows = offsets[:, 0:1] + torch.arange(h)
        cols = offsets[:, 1:2] + torch.arange(w)
        x = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * padding))
        images = x.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    if bool(flips.any()):
        images = torch.where(flips[:, None, None, None], images.flip(3), images)
    return images


def _old_normalize(images, mean, std):
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    return (images.to(torch.float32) - m) / s


def _old_epoch(loader: TrainLoader, epoch: int):
    """TrainLoader.epoch as it was: an index copy, a params gather and a normalise per batch."""
    order = torch.as_tensor(loader.sampler.global_order(epoch), dtype=torch.long)
    params = sample_params(
        len(order), loader.padding, loader.flip, _generator(loader.seed, epoch, 1)
    )
    for pos in loader.sampler.rank_positions(
        order.numpy(), loader.batch_size, loader.rank, loader.world_size, loader.drop_last
    ):
        pos_t = torch.from_numpy(pos)
        idx = order[pos_t]
        x = _old_crop_flip(
            loader.images.index_select(0, idx),
            params.offsets[pos_t],
            params.flips[pos_t],
            loader.padding,
        )
        x = _old_normalize(x, loader.mean, loader.std).contiguous(
            memory_format=loader.memory_format
        )
        yield x, loader.labels.index_select(0, idx), idx


# --------------------------------------------------------------------------------------- tests


def _loader(name, batch=32, rank=0, world=1, **kw):
    facts = RunFacts(seed=3, epochs=4, batch_size=batch)
    sampler = build_sampler(name, LABELS, np.bincount(LABELS).tolist(), facts)
    return TrainLoader(
        IMAGES,
        torch.from_numpy(LABELS),
        sampler,
        batch,
        MEAN,
        STD,
        device=torch.device("cpu"),
        seed=5,
        rank=rank,
        world_size=world,
        **kw,
    )


@pytest.mark.parametrize("name", SAMPLERS.names())
@pytest.mark.parametrize(
    "rank,world,kw",
    [
        (0, 1, {}),
        (1, 2, {}),
        (0, 1, {"drop_last": True, "channels_last": True}),
        (0, 1, {"padding": 0, "flip": False}),
        (0, 2, {"padding": 2, "flip": False}),
    ],
)
def test_batches_equal_the_per_batch_implementation(name, rank, world, kw):
    batch = 12 if name == "undersample" else 32
    loader = _loader(name, batch, rank, world, **kw)
    for epoch in (0, 2):
        new, old = list(loader.epoch(epoch)), list(_old_epoch(loader, epoch))
        assert len(new) == len(old) == len(loader) > 1
        for got, want in zip(new, old):
            for g, w in zip(got, want):
                assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride()
                assert torch.equal(g, w)


def test_first_batches_are_pinned():
    """The bytes of epoch 1's first three batches (instance sampler): a change of sampling,
    augmentation or normalisation order shows here, even one made in both implementations."""
    digest = hashlib.sha256()
    for batch, _ in zip(_loader("instance").epoch(1), range(3)):
        for t in batch:
            digest.update(t.contiguous().numpy().tobytes())
    # computed with the per-batch implementation (commit 9a9565b), torch 2.13 on x86-64
    assert digest.hexdigest() == "e3e1dee6821800540b8537468131bec733eee6e4e5cc1c28d57456ef08236ca6"


def test_normalizer_equals_normalize_and_eval_batches_normalise_alike():
    x = IMAGES[:7]
    assert torch.equal(Normalizer(MEAN, STD)(x), _old_normalize(x, MEAN, STD))
    assert torch.equal(normalize(x, MEAN, STD), _old_normalize(x, MEAN, STD))
    labels = torch.from_numpy(LABELS)
    got = torch.cat(
        [b.images for b in eval_batches(IMAGES, labels, 50, MEAN, STD, torch.device("cpu"))]
    )
    assert torch.equal(got, _old_normalize(IMAGES, MEAN, STD))


def test_crop_flip_without_flips_is_the_crop():
    g = torch.Generator().manual_seed(1)
    params = sample_params(9, 3, False, g)
    x = IMAGES[:9]
    assert torch.equal(
        random_crop_flip(x, params, 3, flip=False), _old_crop_flip(x, *params, padding=3)
    )
    flipped = sample_params(9, 3, True, g)
    assert 0 < int(flipped.flips.sum()) < 9
    assert torch.equal(random_crop_flip(x, flipped, 3), _old_crop_flip(x, *flipped, padding=3))


# ----------------------------------------------------------------------------- train.compile


@pytest.mark.parametrize(
    "value, mode",
    [
        ("false", None),
        ("true", "default"),
        ("default", "default"),
        ("max-autotune", "max-autotune"),
    ],
)
def test_compile_option_gives_the_torch_compile_mode(value, mode):
    cfg = load_config(CE, ["data=cifar10_lt", f"train.compile={value}"])
    assert cfg.train.compile_mode == mode


@pytest.mark.parametrize("value", ["max_autotune", "1", "null", "fast"])
def test_compile_option_refuses_other_values(value):
    with pytest.raises(ConfigError, match=r"train\.compile.*reduce-overhead, max-autotune"):
        load_config(CE, ["data=cifar10_lt", f"train.compile={value}"])


def test_the_run_compiles_its_training_model_with_the_mode(tiny_cifar_root, tmp_path, monkeypatch):
    seen = []

    def fake_compile(model, mode=None):
        seen.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = load_config(CE, [*TINY_RUN, "train.device=cpu", "train.compile=reduce-overhead"])
    build_run(cfg, tmp_path / "run", tiny_cifar_root)
    assert seen == ["reduce-overhead"]
