"""Config loading: _base_ inheritance, dotted overrides, unknown keys named in the error."""

from pathlib import Path

import pytest

from longtail.core.config import apply_overrides, load_config, load_yaml_tree, validate
from longtail.core.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_reference_recipe_from_base_files():
    cfg = load_config(CONFIGS / "methods" / "ce.yaml", ["data=cifar10_lt"])
    assert cfg.data.dataset == "cifar10-lt" and cfg.data.imbalance_factor == 100
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 2e-4)
    assert cfg.schedule.milestones == [160, 180] and cfg.schedule.gamma == 0.01
    assert (cfg.train.epochs, cfg.train.batch_size) == (200, 128)
    assert cfg.model.backbone == "resnet32" and cfg.loss.name == "ce"


def test_child_overrides_base_and_overrides_win(tmp_path):
    cfg = load_config(
        CONFIGS / "quickstart.yaml",
        [
            "train.epochs=2",
            "optim.lr=0.05",
            "data.max_per_class=null",
            "schedule.milestones=[1, 2]",
        ],
    )
    assert cfg.schedule.name == "cosine"  # from quickstart.yaml
    assert cfg.train.epochs == 2 and cfg.optim.lr == 0.05
    assert cfg.data.max_per_class is None and cfg.schedule.milestones == [1, 2]


def test_all_shipped_configs_validate():
    # recipes (configs/methods/) name no dataset: each is loaded with one (every dataset:
    # test_config_compose.py); the model / schedule parts validate as the trees they are
    files = sorted(p for p in CONFIGS.rglob("*.yaml") if "bench" not in p.parts)
    assert len(files) >= 3
    for path in files:
        if path.parent.name == "methods":
            load_config(path, ["data=cifar10_lt"])
        elif path.parent.name in ("models", "schedules"):
            validate(load_yaml_tree(path), str(path))
        else:
            load_config(path)


@pytest.mark.parametrize(
    "override, key",
    [
        (["train.epochz=3"], "train.epochz"),
        (["optimizer.lr=0.1"], "optimizer"),
        (["data.imbalance_factor=abc"], "data.imbalance_factor"),
        (["data.profile=linear"], "data.profile"),
    ],
)
def test_bad_keys_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "methods" / "ce.yaml", ["data=cifar10_lt", *override])


def test_suggestion_for_misspelt_key():
    with pytest.raises(ConfigError, match=r"Did you mean 'train\.epochs'"):
        load_config(None, ["train.epochz=3"])


def test_unknown_key_in_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("_base_: %s\ntrain:\n  batchsize: 64\n" % (CONFIGS / "methods" / "ce.yaml"))
    with pytest.raises(ConfigError, match=r"train\.batchsize"):
        load_config(bad, ["data=cifar10_lt"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_component_options_are_checked_at_build():
    from longtail.losses import create

    with pytest.raises(ConfigError, match=r"loss\.gama"):
        create("focal", class_counts=[10, 1], gama=2.0)
