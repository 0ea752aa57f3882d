"""Warnings where a shortcut changes the method (a schedule cut short, a cap that flattens the
imbalance, a test subset, an imbalance factor a dataset ignores), none on the recipes as written,
and train.rescale_schedule giving the config `longtail bench` plans."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import TINY_RUN

from longtail.bench.suite import load_suite, plan_suite
from longtail.core.config import load_config, validate
from longtail.core.errors import ConfigError
from longtail.data.sources import build_bundle
from longtail.engine.config_check import (
    check_config,
    config_warnings,
    data_warnings,
    prepare_config,
    schedule_warnings,
)
from longtail.engine.trainer import fit

METHODS = Path(__file__).resolve().parents[1] / "configs" / "methods"
RECIPES = sorted(p for p in METHODS.glob("*.yaml"))


def ldam(*extra):
    return load_config(METHODS / "ldam_drw.yaml", ["data=cifar10_lt", *extra])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
@pytest.mark.parametrize("data", ["cifar10_lt", "fashion_mnist_lt"])
def test_recipes_as_written_warn_of_nothing(recipe, data):
    assert config_warnings(load_config(recipe, [f"data={data}"])) == []


def test_a_short_run_names_drw_milestones_and_the_fix():
    (line,) = schedule_warnings(ldam("train.epochs=8"))
    assert "loss.drw_epoch=160 is never reached" in line
    assert "schedule.milestones=[160,180]: 160, 180 are never reached" in line
    assert "warmup" not in line  # 5 epochs of warm-up end inside 8
    assert "train.rescale_schedule=true" in line and "train.nominal_epochs=N" in line
    # with the nominal epochs known, the warning says what the rescaling would set
    (line,) = schedule_warnings(ldam("train.epochs=8", "train.nominal_epochs=200"))
    assert "loss.drw_epoch 160 -> 6" in line and "schedule.milestones [160,180] -> [6,7]" in line
    # a run between the phases: only what it does not reach
    (line,) = schedule_warnings(ldam("train.epochs=170"))
    assert "milestones=[160,180]: 180 is never reached" in line and "drw_epoch" not in line


def test_a_warm_up_never_left_and_any_epoch_option_are_found():
    (line,) = schedule_warnings(ldam("train.epochs=4"))
    assert "schedule.warmup_epochs=5.0 spans the whole run" in line
    # found by the *_epoch naming, not by the component: BKD's reweight epoch
    bkd = load_config(
        METHODS / "bkd.yaml", ["data=cifar10_lt", "train.epochs=8", "method.reweight_epoch=100"]
    )
    (line,) = schedule_warnings(bkd)
    assert "method.reweight_epoch=100 is never reached" in line
    # a setting past the nominal schedule too is meant never to happen: not named
    (line,) = schedule_warnings(
        ldam("train.epochs=8", "train.nominal_epochs=200", "loss.drw_epoch=300")
    )
    found = line.split(". The method")[0]  # what the run misses (then the fix)
    assert "drw_epoch" not in found and "schedule.milestones" in found
    assert schedule_warnings(ldam("train.epochs=8", "train.nominal_epochs=150")) == []


def test_rescale_schedule_is_the_bench_scaling(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text(
        yaml.safe_dump(
            {
                "description": "one run",
                "overrides": ["data=cifar10_lt"],
                "epochs": 8,
                "runs": [{"name": "ldam", "config": str(METHODS / "ldam_drw.yaml")}],
            }
        )
    )
    (planned,) = plan_suite(load_suite(suite), tmp_path / "runs")
    assert planned.error is None
    cfg, notes = prepare_config(
        ldam("train.epochs=8", "train.rescale_schedule=true", "train.nominal_epochs=200")
    )
    mine, bench = cfg.to_dict(), planned.cfg.to_dict()
    assert (mine["train"].pop("rescale_schedule"), mine["train"].pop("nominal_epochs")) == (
        False,
        200,
    )
    for key in ("rescale_schedule", "nominal_epochs"):
        bench["train"].pop(key)
    assert mine == bench
    assert cfg.loss.params()["drw_epoch"] == 6 and cfg.schedule.milestones == [6, 7]
    (note,) = notes  # what was scaled, and no warning: the run reaches every phase
    assert "scaled from 200 epochs" in note and "loss.drw_epoch 160 -> 6" in note
    assert prepare_config(cfg) == (cfg, [])  # recorded as done: a saved config is not rescaled


def test_rescale_schedule_needs_the_nominal_epochs_and_a_single_run():
    # loaded from a recipe, the nominal length is the recipe's own train.epochs (200)
    cfg = ldam("train.epochs=8", "train.rescale_schedule=true")
    assert cfg.train.nominal_epochs == 200
    assert prepare_config(cfg)[0].loss.params()["drw_epoch"] == 6
    # a config without it (built by hand) is refused with the key to set
    bare = cfg.model_copy(update={"train": cfg.train.model_copy(update={"nominal_epochs": None})})
    with pytest.raises(ConfigError, match="train.nominal_epochs"):
        prepare_config(bare)
    pipeline = load_config(
        METHODS / "three_stage.yaml", ["data=cifar10_lt", "train.rescale_schedule=true"]
    )
    with pytest.raises(ConfigError, match="epochs_scale"):
        check_config(pipeline)


def test_rescaled_run_prints_once_records_and_resumes(tiny_cifar_root, tmp_path, capfd):
    cfg = load_config(
        METHODS / "ce.yaml",
        [*TINY_RUN, "train.epochs=2", "train.rescale_schedule=true", "train.nominal_epochs=4"],
    )
    assert fit(cfg, tmp_path / "r", tiny_cifar_root, stop_after_epoch=1) is None
    saved = validate(yaml.safe_load((tmp_path / "r" / "config.yaml").read_text()))
    # TINY_RUN's schedule (4 epochs: warm-up 1, milestone 3) on 2 epochs: 0.5 and [1]
    assert saved.schedule.milestones == [1] and saved.schedule.warmup_epochs == 0.5
    assert (saved.train.rescale_schedule, saved.train.nominal_epochs) == (False, 4)
    first = capfd.readouterr().err
    assert first.count("note: train.rescale_schedule: scaled from 4 epochs") == 1
    fit(cfg, tmp_path / "r", tiny_cifar_root, resume=True)  # the same command: same config
    assert "rescale_schedule" not in capfd.readouterr().err  # printed at the start only
    assert (tmp_path / "r" / "metrics.json").is_file()


@pytest.fixture(scope="module")
def tiny_cfg():
    def make(*extra):
        return load_config(METHODS / "ce.yaml", [*TINY_RUN, "train.epochs=4", *extra])

    return make


def test_max_per_class_that_flattens_the_imbalance(tiny_cfg, tiny_cifar_root):
    cfg = tiny_cfg("data.max_per_class=10")  # IF 10: counts 30 .. 3, the head cut to 10
    (line,) = data_warnings(cfg, build_bundle(cfg.data, tiny_cifar_root))
    assert "data.max_per_class=10 cuts 5 of 10 classes" in line
    assert "imbalance factor is 3.33 instead of 10 (3x flatter)" in line
    for ok in (tiny_cfg(), tiny_cfg("data.max_per_class=30")):  # no cap, a cap that cuts nothing
        assert data_warnings(ok, build_bundle(ok.data, tiny_cifar_root)) == []


def test_a_test_subset_is_named(tiny_cfg, tiny_cifar_root):
    cfg = tiny_cfg("data.max_test_per_class=4")  # 10 test images a class
    (line,) = data_warnings(cfg, build_bundle(cfg.data, tiny_cifar_root))
    assert "evaluates on 40 test images (at most 4 a class)" in line
    whole = tiny_cfg("data.max_test_per_class=10")
    assert data_warnings(whole, build_bundle(whole.data, tiny_cifar_root)) == []


def test_an_imbalance_factor_for_a_balanced_dataset():
    (line,) = config_warnings(ldam("data.dataset=cifar10", "data.imbalance_factor=50"))
    assert "data.imbalance_factor=50 is not used: cifar10 is not cut" in line
    assert config_warnings(validate({"data": {"dataset": "cifar10"}})) == []  # not given
    assert config_warnings(ldam("data.imbalance_factor=50")) == []  # cifar10-lt uses it
    split_files = load_config(METHODS / "ce.yaml", ["data=imagenet_lt", "data.imbalance_factor=10"])
    assert "imagenet-lt is not cut" in " ".join(config_warnings(split_files))
