"""The routed multi-expert model (longtail.models.experts) and the `experts` method
(longtail.methods.experts): the routed output is the router-weighted sum of the expert logits in
the extras, router weights are a distribution per sample, one backward reaches every expert, head
and the router, the loss is the stated combination, parameters / FLOPs exceed the single model's
by the experts' share, configuration mistakes are ConfigErrors naming the key, and a tiny real
run (ResNet-8, E = 3, 1 epoch) writes the per-expert metrics and the compute report, which
`evaluate_run` and the saved weights reproduce."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN
from safetensors.torch import load_file

from longtail.core.config import ModelConfig, load_config
from longtail.core.errors import ConfigError
from longtail.core.run_folder import RunFolder
from longtail.data.loader import Batch
from longtail.engine.evaluate_run import evaluate_run
from longtail.engine.trainer import fit
from longtail.losses import create
from longtail.methods import MethodContext, build_method
from longtail.models import build_model
from longtail.models.experts import (
    ExpertHeads,
    MultiExpertClassifier,
    compute_cost,
    count_flops,
    to_multi_expert,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPE = CONFIGS / "methods" / "ala_moe.yaml"
COUNTS = [30, 20, 14, 10, 7, 5, 4, 3, 3, 3]


def moe(experts=3, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="resnet8", head="cosine", experts=experts, **kw)
    return build_model(cfg, 10, 3)


def params(module):
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------ the model


def test_routed_output_is_the_router_weighted_sum_of_the_experts():
    model = moe().eval()
    assert isinstance(model, MultiExpertClassifier) and isinstance(model.head, ExpertHeads)
    assert model.head.normalized and len(model.head) == len(model.experts) == 3
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        z, r = out.extras["expert_logits"], out.extras["router_weights"]
        assert z.shape == (5, 3, 10) and r.shape == (5, 3) and out.features.shape == (5, 64)
        assert torch.allclose(r.sum(1), torch.ones(5), atol=1e-6) and bool((r > 0).all())
        assert float(r.std(0).max()) > 0  # instance-aware: weights differ between images
        fused = sum(r[:, e, None] * z[:, e] for e in range(3))
        assert torch.allclose(out.logits, fused, atol=1e-6)
        shared = model.forward_shared(x)
        feats = sum(r[:, e, None] * model.expert_features(shared, e) for e in range(3))
        assert torch.allclose(out.features, feats, atol=1e-5)
        for e in range(3):
            assert torch.allclose(model.forward_expert(x, e), z[:, e], atol=1e-6)
        # cosine heads: every expert's logits and the fused ones are cosines
        assert float(out.logits.abs().max()) <= 1.0 + 1e-6
        # different random inits: expert 0 and 1 disagree
        assert not torch.allclose(z[:, 0], z[:, 1], atol=1e-3)
    s0, s1 = (dict(m.named_parameters()) for m in model.experts[:2])
    assert all(not torch.equal(s0[k], s1[k]) for k in s0 if k.endswith("conv1.weight"))


def test_one_backward_reaches_every_expert_head_and_the_router():
    model = moe().train()
    loss = create("ala", class_counts=COUNTS)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    out = model(x)
    z = out.extras["expert_logits"]
    total = loss(out.logits, y) + sum(loss(z[:, e], y) for e in range(3)) / 3
    total.backward()
    parts = [*model.experts, *model.head, model.router, model.backbone]
    for part in parts:
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads), type(part).__name__
        assert sum(float(g.abs().sum()) for g in grads) > 0, type(part).__name__


def test_parameters_and_flops_exceed_the_single_model_by_the_experts_share():
    torch.manual_seed(0)
    single = build_model(ModelConfig(backbone="resnet8", head="cosine"), 10, 3).eval()
    model = moe(3).eval()
    x = torch.zeros(1, 3, 32, 32)
    cost = compute_cost(model, (3, 32, 32))
    stage, head = model.experts[1], model.head[1]
    with torch.no_grad():
        shared = model.forward_shared(x)
        feats = model.expert_features(shared, 1)
        stage_flops = count_flops(stage, shared)
        head_flops = count_flops(head, feats)
        router_flops = count_flops(model.route, shared)
    # the single model: one expert, no router, the same as experts=1 builds
    assert cost["single_params"] == params(single)
    assert cost["single_flops_per_image"] == count_flops(single, x)
    extra = 2 * (params(stage) + params(head)) + params(model.router)
    assert cost["params"] == params(single) + extra
    assert (
        cost["flops_per_image"]
        == cost["single_flops_per_image"] + 2 * (stage_flops + head_flops) + router_flops
    )
    # ResNet-8: the last stage is ~29% of the single model's FLOPs -> about 1.58x for E = 3
    assert 1.5 < cost["ratio"] < 1.65 and 2.3 < cost["params_ratio"] < 2.7
    assert router_flops == 2 * (32 * 32 + 32 * 3)  # Linear(32 -> 32) -> Linear(32 -> 3)


def test_pretrained_weights_are_kept_in_every_expert(tmp_path):
    torch.manual_seed(5)
    source = build_model(ModelConfig(backbone="resnet10"), 10, 3).backbone
    path = tmp_path / "r10.pth"
    torch.save(source.state_dict(), path)
    cfg = ModelConfig(backbone="resnet10", backbone_params={"pretrained": str(path)}, experts=2)
    model = build_model(cfg, 10, 3)
    for expert in model.experts:
        for k, v in expert.state_dict().items():
            assert torch.equal(v, source.layer4.state_dict()[k]), k
    assert not torch.equal(model.head[0].weight, model.head[1].weight)  # the heads are new


def test_conversion_without_factories_reinitialises_copies():
    torch.manual_seed(0)
    single = build_model(ModelConfig(backbone="resnet8"), 10, 3)
    model = to_multi_expert(single, 2, router_hidden=8)
    w0, w1 = (dict(m.named_parameters()) for m in model.experts)
    assert all(not torch.equal(w0[k], w1[k]) for k in w0 if k.endswith("weight") and "conv" in k)
    assert model.router.fc1.out_features == 8 and model.backbone.num_features == 32


def test_configuration_errors():
    with pytest.raises(ConfigError, match=r"model\.experts=2 .*mobilenet_v2.*resnet32"):
        build_model(ModelConfig(backbone="mobilenet_v2", experts=2), 10, 3)
    with pytest.raises(ConfigError, match=r"model\.expert_params\.router_width"):
        build_model(
            ModelConfig(backbone="resnet8", experts=2, expert_params={"router_width": 4}), 10, 3
        )
    with pytest.raises(ConfigError, match=r"model\.expert_params\.router_hidden"):
        build_model(
            ModelConfig(backbone="resnet8", experts=2, expert_params={"router_hidden": 0}), 10, 3
        )
    with pytest.raises(ConfigError, match=r"model\.experts"):
        load_config(RECIPE, ["data=cifar10_lt", "model.experts=0"])


# ------------------------------------------------------------------------------------ the method


def method_for(model, cfg, **options):
    ctx = MethodContext(
        cfg=cfg,
        model=model,
        loss=create("ala", class_counts=COUNTS),
        class_counts=COUNTS,
        device=torch.device("cpu"),
    )
    return build_method("experts", ctx, options)


def test_method_loss_is_the_weighted_combination_and_needs_experts():
    cfg = load_config(RECIPE, ["data=cifar10_lt", "model.backbone=resnet8", "train.amp=none"])
    model = moe(3).train()
    method = method_for(model, cfg, fused_weight=0.5, expert_weight=2.0)
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6)
    torch.manual_seed(1)
    value = method.compute_loss(Batch(x, y, torch.arange(6)))
    loss = create("ala", class_counts=COUNTS)
    with torch.no_grad():
        out = model(x)  # BN in train mode: the same batch statistics as the step's forward
    z = out.extras["expert_logits"]
    expected = 0.5 * loss(out.logits, y) + 2.0 * sum(loss(z[:, e], y) for e in range(3)) / 3
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ConfigError, match=r"model\.experts"):
        method_for(build_model(ModelConfig(backbone="resnet8", head="cosine"), 10, 3), cfg)
    with pytest.raises(ConfigError, match=r"fused_weight"):
        method_for(moe(2), cfg, fused_weight=0.0, expert_weight=0.0)


def test_recipe_composes():
    cfg = load_config(RECIPE, ["data=cifar10_lt"])
    assert (cfg.model.experts, cfg.model.head, cfg.method.name) == (3, "cosine", "experts")
    assert cfg.loss.name == "ala" and cfg.loss.params()["drw_epoch"] == 160


# ------------------------------------------------------------------------------ a tiny real run


@pytest.fixture(scope="module")
def moe_run(tiny_cifar_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ala_moe") / "run"
    cfg = load_config(RECIPE, [*TINY_RUN, "train.epochs=1"])
    metrics = fit(cfg, run_dir, tiny_cifar_root)
    return run_dir, metrics


def test_run_writes_per_expert_metrics_and_the_compute_report(moe_run):
    run_dir, metrics = moe_run
    saved = json.loads((run_dir / "metrics.json").read_text())
    report = saved["experts"]
    assert report["num_experts"] == 3 and len(report["per_expert"]) == 3
    for row in report["per_expert"]:
        assert set(row) == {"top1", "many", "medium", "few"} and 0 <= row["top1"] <= 100
    # the routed ensemble is the run's own evaluation
    for key in ("top1", "many", "medium", "few"):
        assert report["routed"][key] == saved[key], key
    weights = report["router_mean_weights"]
    # IF 10 on 30 a class: counts 30..3 -> medium (20-30) and few (< 20), no many class
    assert weights["many"] is None
    for group in ("all", "medium", "few"):
        assert len(weights[group]) == 3 and sum(weights[group]) == pytest.approx(1.0, abs=1e-6)
    compute = saved["compute"]
    assert compute["input_shape"] == [3, 32, 32] and 1.5 < compute["ratio"] < 1.65
    assert compute["params"] == saved["parameters"]["total"]
    assert compute["params"] > compute["single_params"]
    assert saved["logit_scale"] == 30.0


def test_evaluate_run_and_saved_weights_round_trip(moe_run, tiny_cifar_root):
    run_dir, metrics = moe_run
    again = evaluate_run(run_dir, tiny_cifar_root)
    assert again["top1"] == metrics["top1"] and again["per_class"] == metrics["per_class"]
    assert again["experts"] == metrics["experts"] and again["compute"] == metrics["compute"]
    cfg = RunFolder(run_dir).load_config()
    model = build_model(cfg.model, 10, 3).eval()
    weights = load_file(str(run_dir / "model.safetensors"))
    assert any(k.startswith("experts.2.") for k in weights) and any("router." in k for k in weights)
    model.load_state_dict(weights)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    fresh = build_model(cfg.model, 10, 3).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x).logits, model(x).logits)
        model2 = build_model(cfg.model, 10, 3).eval()
        model2.load_state_dict(model.state_dict())
        assert torch.equal(model2(x).logits, model(x).logits)
