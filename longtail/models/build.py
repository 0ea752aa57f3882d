"""Assemble a Classifier from a ``ModelConfig``: backbone -> neck -> head, turned into a
multi-expert model when ``model.experts > 1`` (:mod:`longtail.models.experts`), then the
parameter-efficient tuning (:mod:`longtail.models.peft`) that decides what trains."""

from __future__ import annotations

from longtail.models.classifier import Classifier
from longtail.models.experts import expert_options, to_multi_expert
from longtail.models.peft import apply_tuning
from longtail.models.registry import BACKBONES, HEADS, NECKS


def build_model(cfg, num_classes: int, in_chans: int) -> Classifier:
    """Build a Classifier from a ``ModelConfig``; unknown options raise ConfigError by key.

    With ``model.experts = E > 1`` the backbone's last stage and the head are split into E
    experts: expert 0 keeps the ones built here, experts 1..E-1 get the last stage of a freshly
    built backbone (its own random init, or the same pretrained weights) and a fresh head."""
    backbone_params = {"in_chans": in_chans, **cfg.backbone_params}

    def new_backbone():
        return BACKBONES.build(cfg.backbone, key_prefix="model.backbone_params.", **backbone_params)

    backbone = new_backbone()
    dim = backbone.num_features
    neck = NECKS.build(cfg.neck, dim, key_prefix="model.neck_params.", **cfg.neck_params)
    dim = getattr(neck, "out_features", dim)

    def new_head():
        return HEADS.build(
            cfg.head, dim, num_classes, key_prefix="model.head_params.", **cfg.head_params
        )

    model = Classifier(backbone, neck, new_head(), input_size=cfg.input_size)
    experts = getattr(cfg, "experts", 1)
    options = expert_options(dict(getattr(cfg, "expert_params", {}) or {}))
    if experts > 1:
        model = to_multi_expert(
            model,
            experts,
            router_hidden=options["router_hidden"],
            new_stage=lambda: new_backbone().pop_last_stage(),
            new_head=new_head,
            backbone_name=cfg.backbone,
        )
    apply_tuning(model, cfg.tuning, dict(cfg.tuning_params))
    return model
