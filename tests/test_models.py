"""ResNet-32 and heads: parameter count, shapes, the cosine head's range, freezing."""

import torch

from longtail.core.config import ModelConfig
from longtail.models import build_model


def test_resnet32_has_the_reference_size():
    model = build_model(ModelConfig(), num_classes=10, in_chans=3)
    n = sum(p.numel() for p in model.parameters())
    # 0.46M as in LDAM-DRW: 464,154 with a 10-way linear head
    assert n == 464_154
    out = model(torch.randn(4, 3, 32, 32))
    assert out.logits.shape == (4, 10) and out.features.shape == (4, 64)


def test_mnist_inputs_and_cosine_head():
    model = build_model(ModelConfig(head="cosine"), num_classes=7, in_chans=1)
    out = model(torch.randn(3, 1, 28, 28))
    assert out.logits.shape == (3, 7)
    assert out.logits.abs().max() <= 1.0 + 1e-6  # raw cosines with scale 1
    model = build_model(ModelConfig(head="cosine", head_params={"scale": 16.0}), 7, 1)
    f = torch.randn(5, 64)
    cos = (
        torch.nn.functional.normalize(f, dim=1)
        @ torch.nn.functional.normalize(model.head.weight, dim=1).T
    )
    torch.testing.assert_close(model.head(f), 16.0 * cos)


def test_freeze_backbone_stops_gradients_and_bn_updates():
    model = build_model(ModelConfig(backbone="resnet8"), 10, 3)
    model.freeze_backbone()
    model.train()
    bn = model.backbone.bn1
    before = bn.running_mean.clone()
    out = model(torch.randn(8, 3, 32, 32))
    out.logits.sum().backward()
    assert torch.equal(bn.running_mean, before)  # backbone BN stays in eval mode
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.weight.grad is not None
