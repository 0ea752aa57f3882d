"""The balanced meta set, its loader and the bi-level meta step (longtail.data.meta,
longtail.optim.meta): the meta set never shares an index with train / val (and comes from the
training split, never the test split), a class without spare images borrows from the subset
(meta_from=unused) or the meta images leave before imbalancing (before_subset); meta batches are
a pure function of (seed, step); the hyper-gradient through the virtual step equals central finite
differences in float64; the virtual passes leave BatchNorm statistics and parameters untouched."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longtail.core.config import ModelConfig
from longtail.core.errors import DataError
from longtail.data import build_data, img_num_per_cls, load_split
from longtail.data.augment import normalize
from longtail.data.meta import MetaLoader
from longtail.models import build_model
from longtail.models.modulator import StageModulation, build_modulator
from longtail.optim.meta import (
    bilevel_meta_step,
    functional_forward,
    hypergradient,
    loss_closure,
    make_meta_optimizer,
    trainable_params,
    virtual_sgd_step,
)

TINY_COUNTS = [30, 23, 17, 13, 10, 8, 6, 5, 3, 3]  # tiny CIFAR (30 / class) at IF 10


def tiny(root, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_data(
            "cifar10-lt", root, imbalance_factor=10, val_per_class=3, download=False, **kw
        )


def assert_disjoint(bundle):
    meta = set(bundle.meta.indices.tolist())
    assert len(meta) == len(bundle.meta)  # no repeats
    assert not meta & set(bundle.train.indices.tolist())
    if bundle.val is not None:
        assert not meta & set(bundle.val.indices.tolist())
        assert not set(bundle.val.indices.tolist()) & set(bundle.train.indices.tolist())


# ------------------------------------------------------------------------------------ meta set


def test_no_meta_set_by_default(tiny_cifar_root):
    bundle = tiny(tiny_cifar_root)
    assert bundle.meta is None and bundle.meta_borrowed is None
    assert bundle.class_counts == TINY_COUNTS


def test_meta_from_unused(tiny_cifar_root):
    plain = tiny(tiny_cifar_root)
    with pytest.warns(UserWarning, match="OUT OF THE TRAINING SUBSET"):
        bundle = build_data(
            "cifar10-lt",
            tiny_cifar_root,
            imbalance_factor=10,
            val_per_class=3,
            download=False,
            meta_per_class=4,
        )
    assert_disjoint(bundle)
    labels = bundle.meta.labels.numpy()
    assert np.bincount(labels, minlength=10).tolist() == [4] * 10  # balanced
    # class 0 has no spare image (the subset keeps all 30): its 4 come out of the subset;
    # class 1 has 30 - 23 - 3 (val) = 4 spare: exactly enough
    assert bundle.meta_borrowed == [4] + [0] * 9
    assert bundle.class_counts == [26] + TINY_COUNTS[1:]
    borrowed = set(bundle.meta.indices[labels == 0].tolist())
    assert borrowed <= set(plain.train.indices.tolist())
    kept = [i for i in plain.train.indices.tolist() if i not in borrowed]
    assert bundle.train.indices.tolist() == kept  # else the same subset, same order
    np.testing.assert_array_equal(bundle.val.indices, plain.val.indices)  # val is unchanged
    np.testing.assert_array_equal(bundle.test.indices, plain.test.indices)
    # the meta images are the training split's images at those indices, none is a test image
    full = load_split("cifar10", "train", tiny_cifar_root, download=False)
    assert torch.equal(bundle.meta.images, full.images[torch.from_numpy(bundle.meta.indices)])
    assert torch.equal(bundle.meta.labels, full.labels[torch.from_numpy(bundle.meta.indices)])
    test_rows = {bytes(img.numpy().tobytes()) for img in bundle.test.images}
    assert not any(bytes(img.numpy().tobytes()) in test_rows for img in bundle.meta.images)
    # deterministic
    again = tiny(tiny_cifar_root, meta_per_class=4)
    np.testing.assert_array_equal(again.meta.indices, bundle.meta.indices)


def test_meta_before_subset(tiny_cifar_root):
    bundle = tiny(tiny_cifar_root, meta_per_class=4, meta_from="before_subset")
    assert_disjoint(bundle)
    assert np.bincount(bundle.meta.labels.numpy(), minlength=10).tolist() == [4] * 10
    assert bundle.meta_borrowed == [0] * 10
    # the subset is drawn from the 26 images per class left: n_max = 26
    assert bundle.class_counts == img_num_per_cls(26, 10, 10)
    assert len(bundle.val) == 3 * 9  # class 0: none spare


def test_meta_set_options_are_checked(tiny_cifar_root):
    with pytest.raises(DataError, match="data.meta_per_class"):
        tiny(tiny_cifar_root, meta_per_class=-1)
    with pytest.raises(DataError, match="data.meta_from"):
        tiny(tiny_cifar_root, meta_per_class=2, meta_from="elsewhere")
    with pytest.raises(DataError, match="keep a training image"):  # class 0 would lose all 30
        tiny(tiny_cifar_root, meta_per_class=30)
    with pytest.raises(DataError, match="before_subset"):
        tiny(tiny_cifar_root, meta_per_class=30, meta_from="before_subset")


@pytest.mark.realdata
def test_meta_set_on_real_cifar10_lt(real_data_root):
    with pytest.warns(UserWarning, match="OUT OF THE TRAINING SUBSET"):
        bundle = build_data("cifar10-lt", real_data_root, meta_per_class=10)
    assert_disjoint(bundle)
    assert np.bincount(bundle.meta.labels.numpy(), minlength=10).tolist() == [10] * 10
    assert bundle.meta_borrowed == [10] + [0] * 9
    assert bundle.class_counts == [4990, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert len(bundle.train) == 12_396 and len(bundle.val) == 9 * 200
    full_test = load_split("cifar10", "test", real_data_root)
    assert len(bundle.test) == len(full_test)  # the test split is untouched
    assert bundle.meta.indices.max() < 50_000  # indices into the train split

    before = build_data("cifar10-lt", real_data_root, meta_per_class=10, meta_from="before_subset")
    assert_disjoint(before)
    assert before.class_counts == img_num_per_cls(4990, 10, 100)  # MW-Net: n_max 4990
    assert len(before.train) == sum(img_num_per_cls(4990, 10, 100)) == 12_380


# ------------------------------------------------------------------------------------ loader


def loader(n=20, batch=8, seed=0, **kw):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 5
    return MetaLoader(images, labels, batch, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), seed=seed, **kw)


def test_meta_loader_cycles_through_the_meta_set():
    ml = loader(n=20, batch=5)
    seen = torch.cat([ml.batch(s).indices for s in range(8)])  # 2 meta epochs
    assert sorted(seen[:20].tolist()) == list(range(20))
    assert sorted(seen[20:].tolist()) == list(range(20))
    assert not torch.equal(seen[:20], seen[20:])  # reshuffled each pass
    big = loader(n=20, batch=30)  # a batch larger than the set
    stream = torch.cat([big.batch(s).indices for s in range(2)])  # 60 = 3 passes
    for k in range(3):
        assert sorted(stream[20 * k : 20 * (k + 1)].tolist()) == list(range(20))


def test_meta_loader_is_a_function_of_seed_and_step():
    a, b = loader(seed=3), loader(seed=3)
    forward = [a.batch(s) for s in range(6)]
    backward = [b.batch(s) for s in reversed(range(6))][::-1]  # any order, fresh object
    for x, y in zip(forward, backward):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    assert not torch.equal(loader(seed=4).batch(0).indices, forward[0].indices)
    it = a.batches(start_step=4)
    assert torch.equal(next(it).indices, forward[4].indices)
    assert torch.equal(next(it).indices, forward[5].indices)


def test_meta_loader_normalises_without_augmentation_and_shards_ranks():
    ml = loader()
    batch = ml.batch(2)
    expected = normalize(ml.images[batch.indices], ml.mean, ml.std)
    assert torch.equal(batch.images, expected)  # no crop / flip by default
    assert torch.equal(batch.labels, ml.labels[batch.indices])
    shards = [loader(rank=r, world_size=3).batch(2) for r in range(3)]
    assert torch.equal(torch.cat([s.indices for s in shards]), batch.indices)
    aug = loader(augment=True, padding=1)
    assert torch.equal(aug.batch(2).indices, batch.indices)  # same images, augmented
    assert torch.equal(aug.batch(2).images, loader(augment=True, padding=1).batch(2).images)
    assert not torch.equal(aug.batch(2).images, batch.images)


def test_meta_loader_needs_images():
    with pytest.raises(DataError, match="data.meta_per_class"):
        MetaLoader(torch.zeros(0, 3, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))


# ------------------------------------------------------------------------------------ bi-level step


def small_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="resnet8", backbone_params={"widths": [4, 8, 16]})
    return build_model(cfg, 5, 3).double().train()


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    xm = torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64)
    ym = torch.arange(5)
    return x, y, xm, ym


def modulated(variant, seed=0):
    """A float64 ResNet-8 with a non-identity modulator on every stage."""
    model = small_model(seed)
    mod = build_modulator(model.backbone, variant).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model, mod, StageModulation(model.backbone, mod)


def meta_objective(model, hooks, x, y, xm, ym, lr):
    train = loss_closure(model, x, y, F.cross_entropy, context=lambda: hooks.active(True))
    meta = loss_closure(model, xm, ym, F.cross_entropy, context=lambda: hooks.active(False))
    return train, meta


def finite_difference(model, hooks, param, index, x, y, xm, ym, lr, eps=1e-5):
    """Central difference of φ -> L_meta(θ − lr ∇θ L_train(θ, φ)) along one coordinate of φ."""

    def f():
        train, meta = meta_objective(model, hooks, x, y, xm, ym, lr)
        theta = trainable_params(model)
        theta_hat = virtual_sgd_step(theta, train(theta), lr, differentiable=False)
        return float(meta({k: v.detach() for k, v in theta_hat.items()}))

    flat = param.data.view(-1)
    old = flat[index].item()
    flat[index] = old + eps
    up = f()
    flat[index] = old - eps
    down = f()
    flat[index] = old
    return (up - down) / (2 * eps)


@pytest.mark.parametrize("variant", ["direct", "network"])
def test_hypergradient_matches_finite_differences(variant):
    model, mod, hooks = modulated(variant)
    x, y, xm, ym = batches()
    lr = 0.5
    train, meta = meta_objective(model, hooks, x, y, xm, ym, lr)
    params = list(mod.parameters())
    grads, _, _ = hypergradient(model, params, train, meta, lr)
    names = [n for n, _ in mod.named_parameters()]
    checked = 0
    for name, p, g in zip(names, params, grads):
        if p.numel() == 0:
            continue
        picks = torch.randperm(p.numel(), generator=torch.Generator().manual_seed(len(name)))[:2]
        for i in picks.tolist():
            fd = finite_difference(model, hooks, p, i, x, y, xm, ym, lr)
            analytic = g.view(-1)[i].item()
            # rel 1e-6; abs 1e-9 covers float64 round-off (~1e-15 |f| / eps) near zero
            assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-9), (name, i)
            checked += 1
    assert checked >= 6
    assert max(float(g.abs().max()) for g in grads) > 1e-4  # not a trivial zero check


def test_hypergradient_through_a_learned_learning_rate():
    """MLR-SNet's path: constant gradients, a tensor learning rate (the meta-parameter)."""
    model = small_model(1)
    x, y, xm, ym = batches(1)
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    train = loss_closure(model, x, y)
    meta = loss_closure(model, xm, ym)
    (g,), _, _ = hypergradient(
        model, [lr], train, meta, lr, weight_decay=5e-4, differentiable=False
    )

    def f(value):
        theta = trainable_params(model)
        step = virtual_sgd_step(theta, train(theta), value, weight_decay=5e-4, differentiable=False)
        return float(meta({k: v.detach() for k, v in step.items()}))

    eps = 1e-5
    fd = (f(0.3 + eps) - f(0.3 - eps)) / (2 * eps)
    assert float(g) == pytest.approx(fd, rel=1e-6)


def test_meta_step_leaves_model_state_untouched():
    model, mod, hooks = modulated("network", seed=2)
    x, y, xm, ym = batches(2)
    before = copy.deepcopy(model.state_dict())
    mod_before = copy.deepcopy(mod.state_dict())
    train, meta = meta_objective(model, hooks, x, y, xm, ym, 0.1)
    opt = make_meta_optimizer(mod.parameters(), "adam", 1e-2, 1e-4)
    stats = bilevel_meta_step(model, list(mod.parameters()), opt, train, meta, 0.1)
    after = model.state_dict()
    for key in before:  # parameters and BN running statistics
        assert torch.equal(before[key], after[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(mod_before[k], v) for k, v in mod.state_dict().items())
    assert float(stats.meta_loss) > 0 and float(stats.grad_norm) > 0
    # the same forward with live buffers does move them (so the check above means something)
    functional_forward(model, trainable_params(model), x, keep_buffers=False)
    assert not torch.equal(
        before["backbone.bn1.running_mean"], model.state_dict()["backbone.bn1.running_mean"]
    )


def test_sgd_meta_optimizer_and_first_order_step():
    model, mod, hooks = modulated("direct", seed=3)
    x, y, xm, ym = batches(3)
    train, meta = meta_objective(model, hooks, x, y, xm, ym, 0.1)
    opt = make_meta_optimizer(mod.parameters(), "sgd", 1e-2, 0.0)
    assert isinstance(opt, torch.optim.SGD)
    # first order and an unmodulated meta forward: the meta loss does not reach φ
    grads, _, _ = hypergradient(
        model, list(mod.parameters()), train, meta, 0.1, differentiable=False
    )
    assert all(float(g.abs().max()) == 0.0 for g in grads)
    with pytest.raises(ValueError):
        make_meta_optimizer(mod.parameters(), "rmsprop")
