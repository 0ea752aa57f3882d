"""Feature Mining (longtail.methods.feature_mining): complementary masks that cover the map with the
expected share (both mask types), no parameter added, the plain model at evaluation, the loss
against a hand recomputation from the three head outputs (CE and the logit-adjusted loss), weight
0 = plain training, the input resize respected, a ViT refused, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DATA
from safetensors.torch import load_file

from longtail.core.config import ModelConfig, load_config
from longtail.core.errors import ConfigError
from longtail.data.augment import normalize
from longtail.data.loader import Batch
from longtail.engine.trainer import build_run, fit
from longtail.losses import create as create_loss
from longtail.methods.base import MethodContext, build_method
from longtail.methods.feature_mining import draw_masks, pool_parts, rectangle_size
from longtail.models import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "methods"
TINY = [
    *TINY_DATA,
    "train.epochs=1",
    "schedule.warmup_epochs=0",
]


def cfg_of(recipe: str, *extra: str):
    return load_config(CONFIGS / f"{recipe}.yaml", [*TINY, *extra])


def batch_of(run, n: int = 16) -> Batch:
    data = run.data
    images = normalize(data.train.images[:n], data.mean, data.std)
    return Batch(images, data.train.labels[:n], torch.arange(n))


def grads(model) -> dict:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------ the masks


@pytest.mark.parametrize(
    "kind, h, w", [("bernoulli", 8, 8), ("rectangle", 8, 8), ("rectangle", 7, 5)]
)
def test_masks_are_complementary_cover_the_map_with_the_expected_share(kind, h, w):
    torch.manual_seed(0)
    n_draws = 4000
    mask = draw_masks(kind, 0.5, n_draws, h, w, torch.device("cpu"))
    assert mask.shape == (n_draws, h, w) and mask.dtype == torch.bool
    one, two = mask.float(), 1 - mask.float()
    assert torch.equal(one + two, torch.ones_like(one)) and not (one * two).any()  # disjoint cover
    counts = mask.flatten(1).sum(1)
    assert counts.min() >= 1 and counts.max() <= h * w - 1  # neither part is ever empty
    share = counts.double() / (h * w)
    if kind == "rectangle":
        rh, rw = rectangle_size(h, w, 0.5)
        assert torch.all(counts == rh * rw)  # one box of fixed size, fully inside
        assert abs(rh * rw / (h * w) - 0.5) < 0.1
        # the box is a box: its rows and columns are contiguous
        rows, cols = mask[0].any(1).nonzero().flatten(), mask[0].any(0).nonzero().flatten()
        assert len(rows) == rh and len(cols) == rw and rows[-1] - rows[0] == rh - 1
    else:
        assert abs(float(share.mean()) - 0.5) < 0.005  # 4000 x 64 Bernoulli(0.5): sd 0.001
        assert 0.2 < float(share.std()) * math.sqrt(h * w) < 0.8  # per-sample draws (sd 0.5)
    # how often each position lands in part 1: Bernoulli: ratio everywhere; rectangle (a box
    # placed uniformly, fully inside): P(row in box) P(column in box), lower at the borders
    per_position = one.mean(0)
    if kind == "rectangle":

        def inside(size: int, box: int) -> torch.Tensor:
            starts = torch.arange(size - box + 1)
            return torch.stack(
                [((starts <= i) & (i < starts + box)).float().mean() for i in range(size)]
            )

        expected = inside(h, rh)[:, None] * inside(w, rw)[None, :]
        assert float(expected.min()) > 0  # every position is reached
    else:
        expected = torch.full((h, w), 0.5)
    assert torch.allclose(per_position, expected, atol=0.04), (per_position, expected)


def test_mask_share_follows_ratio_and_degenerate_draws_are_repaired():
    torch.manual_seed(1)
    cpu = torch.device("cpu")
    share = draw_masks("bernoulli", 0.25, 2000, 8, 8, cpu).float().mean()
    assert abs(float(share) - 0.25) < 0.005
    assert rectangle_size(8, 8, 0.25) == (4, 4)
    # a 1x2 map: a Bernoulli draw empties one part half of the time; every draw is repaired
    tiny = draw_masks("bernoulli", 0.5, 500, 1, 2, cpu).flatten(1)
    assert torch.all(tiny.sum(1) == 1)
    assert rectangle_size(1, 2, 0.9) == (1, 1)
    with pytest.raises(ConfigError, match="model.input_size"):
        draw_masks("bernoulli", 0.5, 4, 1, 1, cpu)


def test_pooled_parts_by_hand():
    torch.manual_seed(2)
    fmap = torch.randn(3, 4, 2, 2)
    mask = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 1]], [[0, 1], [1, 0]]], dtype=torch.bool)
    whole, p1, p2 = pool_parts(fmap, mask, rescale=True)
    flat = fmap.flatten(2)
    assert torch.allclose(whole, flat.mean(2))
    assert torch.allclose(p1[0], flat[0, :, 0]) and torch.allclose(p2[0], flat[0, :, 1:].mean(1))
    assert torch.allclose(p1[1], flat[1, :, [0, 1, 3]].mean(1))
    assert torch.allclose(p2[1], flat[1, :, 2])
    _, q1, q2 = pool_parts(fmap, mask, rescale=False)  # plain GAP of the masked maps
    assert torch.allclose(q1 + q2, whole, atol=1e-6) and torch.allclose(q1[0], flat[0, :, 0] / 4)


# ------------------------------------------------------------------------------------ the method


def test_no_parameter_is_added_and_evaluation_is_the_plain_model(tiny_cifar_root, tmp_path):
    plain = build_run(cfg_of("ce"), tmp_path / "ce", tiny_cifar_root).method.model
    run = build_run(cfg_of("feature_mining"), tmp_path / "fm", tiny_cifar_root)
    model = run.method.model
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    mine, base = model.state_dict(), plain.state_dict()
    assert list(mine) == list(base) and all(torch.equal(mine[k], base[k]) for k in base)

    batch = batch_of(run)
    run.method.train_model.train()
    run.method.train_step(batch)  # a training step (masks drawn, weights changed)
    assert "forward_features" not in vars(model.backbone)  # the shadowing is undone
    twin = build_model(run.cfg.model, 10, 3)
    twin.load_state_dict(model.state_dict())
    if run.cfg.train.channels_last:  # the layout the engine gave the trained model
        twin = twin.to(memory_format=torch.channels_last)
    model.eval(), twin.eval()
    with torch.no_grad():
        out, ref = model(batch.images), twin(batch.images)
    assert out.logits.shape == (16, 10) and torch.equal(out.logits, ref.logits)
    assert torch.equal(out.features, ref.features)


@pytest.mark.parametrize("recipe", ["feature_mining", "feature_mining_la"])
def test_loss_is_the_hand_recomputation_from_the_three_head_outputs(
    recipe, tiny_cifar_root, tmp_path
):
    run = build_run(cfg_of(recipe, "method.weight=0.7"), tmp_path, tiny_cifar_root)
    method, model = run.method, run.method.model
    model.train()
    batch = batch_of(run)
    torch.manual_seed(123)
    loss = method.compute_loss(batch)
    mask = method.last_mask
    assert mask is not None and mask.shape == (16, 8, 8)  # ResNet-8 on 32 x 32: an 8 x 8 map
    torch.manual_seed(123)
    again = method.compute_loss(batch)  # seeded: the same masks, the same loss
    assert torch.equal(method.last_mask, mask) and torch.equal(again, loss)

    with torch.no_grad():
        fmap = model.backbone.forward_map(batch.images)  # [16, 64, 8, 8]
        m = mask.unsqueeze(1).float()
        whole = fmap.mean((2, 3))
        part1 = (fmap * m).sum((2, 3)) / m.sum((2, 3))
        part2 = (fmap * (1 - m)).sum((2, 3)) / (1 - m).sum((2, 3))
        y = batch.labels
        if recipe == "feature_mining_la":  # CE(z + tau log pi, y), tau = 1
            counts = torch.tensor(run.data.class_counts, dtype=torch.float64)
            shift = (counts / counts.sum()).log().float()
        else:
            shift = torch.zeros(10)

        def ce(features):
            return F.cross_entropy(model.head(model.neck(features)) + shift, y)

        expected = ce(whole) + 0.7 * (ce(part1) + ce(part2)) / 2
        assert float((ce(part1) + ce(part2)) / 2 - ce(whole)) != 0  # the parts are not the whole
    assert torch.allclose(loss.detach(), expected, rtol=1e-5, atol=1e-6), (loss, expected)


def test_weight_zero_gives_the_gradients_of_plain_training(tiny_cifar_root, tmp_path):
    runs = {
        name: build_run(cfg_of(recipe, *extra), tmp_path / name, tiny_cifar_root)
        for name, recipe, extra in (
            ("plain", "ce", ()),
            ("zero", "feature_mining", ("method.weight=0",)),
            ("one", "feature_mining", ()),
        )
    }
    out = {}
    for name, run in runs.items():
        run.method.model.train()
        run.method.model.zero_grad()
        loss = run.method.compute_loss(batch_of(run, 32))
        loss.backward()
        out[name] = (loss.detach(), grads(run.method.model))
    (l0, g0), (lz, gz), (l1, g1) = out["plain"], out["zero"], out["one"]
    assert set(g0) == set(gz) and torch.allclose(l0, lz, rtol=1e-6)
    for k in g0:
        assert torch.allclose(g0[k], gz[k], rtol=1e-5, atol=1e-7), k
    # weight 1 changes them (so the comparison above can fail)
    assert float(l1) > float(l0)
    assert not torch.allclose(g0["head.weight"], g1["head.weight"], rtol=1e-3, atol=1e-5)
    # the backbone ran once per step: BatchNorm counted one batch, as in plain training
    bn = [run.method.model.backbone.bn1.num_batches_tracked for run in runs.values()]
    assert [int(v) for v in bn] == [1, 1, 1]


def test_input_resize_is_respected(tiny_cifar_root, tmp_path):
    run = build_run(cfg_of("feature_mining", "model.input_size=40"), tmp_path, tiny_cifar_root)
    run.method.model.train()
    run.method.compute_loss(batch_of(run, 4))  # 32 x 32 images resized to 40 x 40
    assert run.method.last_mask.shape == (4, 10, 10)


def test_a_backbone_without_feature_map_is_refused():
    cfg = load_config(
        CONFIGS / "feature_mining.yaml",
        ["data=cifar10_lt", "model=vit_tiny", "model.input_size=32"],
    )
    model = build_model(
        ModelConfig(backbone="vit_tiny_patch16_224", backbone_params={"img_size": 32}), 10, 3
    )
    loss = create_loss("ce", class_counts=[10] * 10)
    ctx = MethodContext(cfg, model, loss, [10] * 10, torch.device("cpu"))
    with pytest.raises(ConfigError, match="forward_map"):
        build_method("feature_mining", ctx, cfg.method.params())


def e2e_cfg():
    return cfg_of("feature_mining_la", "method.mask=rectangle", "train.epochs=2")


@pytest.fixture(scope="module")
def e2e_run(tiny_cifar_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fm") / "straight"
    return run_dir, fit(e2e_cfg(), run_dir, tiny_cifar_root)


def test_tiny_end_to_end_run(e2e_run):
    run_dir, metrics = e2e_run
    assert metrics is not None and (run_dir / "metrics.json").is_file()
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["feature_mining"] == {
        "mask": "rectangle",
        "ratio": 0.5,
        "weight": 1.0,
        "rescale": True,
        "map_size": [8, 8],
    }
    assert 0.0 <= saved["top1"] <= 100.0
    rows = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:  # the logged loss is whole + weight * parts (image-weighted means)
        assert row["fm_part_loss"] > 0 and row["fm_whole_loss"] > 0
        assert math.isclose(row["loss"], row["fm_whole_loss"] + row["fm_part_loss"], rel_tol=1e-6)


def test_resume_is_bit_exact(e2e_run, tiny_cifar_root, tmp_path):
    """The masks come from torch's global RNG, which the checkpoint restores."""
    straight, _ = e2e_run
    killed = tmp_path / "killed"
    assert fit(e2e_cfg(), killed, tiny_cifar_root, stop_after_epoch=1) is None
    fit(e2e_cfg(), killed, tiny_cifar_root, resume=True)
    a, b = (
        load_file(str(straight / "model.safetensors")),
        load_file(str(killed / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [
        [json.loads(x) for x in (d / "history.jsonl").read_text().splitlines()]
        for d in (straight, killed)
    ]
    keys = ("loss", "fm_whole_loss", "fm_part_loss")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
