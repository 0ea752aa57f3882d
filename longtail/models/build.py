"""Assemble a Classifier from a ``ModelConfig``: backbone -> neck -> head, then the
parameter-efficient tuning (:mod:`longtail.models.peft`) that decides what trains."""

from __future__ import annotations

from longtail.models.classifier import Classifier
from longtail.models.peft import apply_tuning
from longtail.models.registry import BACKBONES, HEADS, NECKS


def build_model(cfg, num_classes: int, in_chans: int) -> Classifier:
    """Build a Classifier from a ``ModelConfig``; unknown options raise ConfigError by key."""
    backbone_params = {"in_chans": in_chans, **cfg.backbone_params}
    backbone = BACKBONES.build(cfg.backbone, key_prefix="model.backbone_params.", **backbone_params)
    dim = backbone.num_features
    neck = NECKS.build(cfg.neck, dim, key_prefix="model.neck_params.", **cfg.neck_params)
    dim = getattr(neck, "out_features", dim)
    head = HEADS.build(
        cfg.head, dim, num_classes, key_prefix="model.head_params.", **cfg.head_params
    )
    model = Classifier(backbone, neck, head, input_size=cfg.input_size)
    apply_tuning(model, cfg.tuning, dict(cfg.tuning_params))
    return model
