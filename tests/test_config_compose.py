"""A recipe is written once and runs on any dataset: ``configs/methods/<recipe>.yaml`` composed
with ``configs/datasets/<name>.yaml`` (and ``configs/models/<name>.yaml``) by the selectors
``data=NAME`` / ``model=NAME`` (longtail.core.config.compose): no two config files hold the same
YAML, every recipe validates on every dataset, the order is dataset < model < recipe < dotted
overrides, selector mistakes name the fix, ``--print-config`` prints the resolved config, and
``ldam_drw`` trains end to end on tiny CIFAR-100 / MNIST / Fashion-MNIST in the real formats."""

import itertools
import json
from pathlib import Path

import pytest
import yaml
from conftest import write_cifar10_folder, write_cifar100_folder, write_idx_folder

from longtail.cli import main
from longtail.core.config import load_config, selector_names
from longtail.core.errors import ConfigError, LongtailError
from longtail.engine.config_check import check_config
from longtail.engine.trainer import build_run

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
METHODS = CONFIGS / "methods"
DATASETS = ("cifar10_lt", "cifar100_lt", "fashion_mnist_lt", "mnist_lt")  # in memory
FILE_DATASETS = ("imagenet_lt", "inat2018", "places_lt")  # streamed from files (docs/data.md)
RECIPES = sorted(METHODS.glob("*.yaml"))
NAMES = {
    "ce",
    "focal",
    "cb_focal",
    "ldam_drw",
    "la",
    "bs",
    "cbs",
    "gcl_drw",
    "rsam_gcl_drw",
    "sam_ldam_drw",
    "whitening_ldam_drw",
    "whitening_la",
    "whitening_bs",
    "crt",
    "lws",
    "tau_norm",
    "ncm",
    "la_posthoc",
    "mfm",
    "mfm_transfer",
    "mlrsnet",
    "mlrsnet_transfer",
    "three_stage",
    "ala",
    "ala_moe",
    "bkd",
    "ebl",
    "ebl_mfs",
    "ebl_mfs_e2e",
    "pml",
    "pml_ordinal",
    "feature_mining",
    "feature_mining_la",
}
TINY = [
    "train.epochs=1",
    "train.batch_size=32",
    "train.eval_batch_size=128",
    "train.progress=false",
    "data.imbalance_factor=10",
    "data.val_per_class=1",
]


def dataset_of(name: str) -> str:
    return yaml.safe_load((CONFIGS / "datasets" / f"{name}.yaml").read_text())["data"]["dataset"]


# ---------------------------------------------------------------------------------------------
# the layout


def test_one_recipe_file_per_method_and_one_file_per_dataset():
    assert {p.stem for p in RECIPES} >= NAMES  # (new recipes may follow)
    # natural order (10 before 100), in-memory and file datasets alike
    assert selector_names("data", METHODS) == [
        "cifar10_lt",
        "cifar100_lt",
        "fashion_mnist_lt",
        "imagenet_lt",
        "inat2018",
        "mnist_lt",
        "places_lt",
    ]
    assert set(selector_names("data", METHODS)) == {*DATASETS, *FILE_DATASETS}
    assert selector_names("model", METHODS) == [
        "efficientnet_lite0",
        "mobilenet_v2",
        "resnet10",
        "resnet32",
        "resnet50",
        "resnet152",
        "resnext50",
        "vit_b16",
        "vit_tiny",
    ]
    for old in ("cifar10_lt", "cifar100_lt", "fashion_mnist_lt", "_base_"):
        assert not (CONFIGS / old).exists(), old
    for path in RECIPES:  # dataset-agnostic, paper on line 1
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "(" in first and len(first) > 60, (path, first)
        assert "dataset" not in (yaml.safe_load(path.read_text()).get("data") or {}), path


def test_no_two_config_files_hold_the_same_yaml():
    files = sorted(CONFIGS.rglob("*.yaml"))
    assert len(files) > len(RECIPES) + len(DATASETS)
    trees = {p: yaml.safe_load(p.read_text()) for p in files}
    same = [
        (str(a.relative_to(CONFIGS)), str(b.relative_to(CONFIGS)))
        for a, b in itertools.combinations(files, 2)
        if trees[a] == trees[b]
    ]
    assert not same, f"files that differ only in comments: {same}"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_composes_and_validates_on_every_dataset(recipe):
    for name in DATASETS:
        cfg = load_config(recipe, [f"data={name}"])  # stage1 / checkpoint unset: valid
        assert cfg.data.dataset == dataset_of(name)
        # the dataset's ResNet-32, unless the recipe brings its own model (the prompt recipes)
        own = yaml.safe_load(recipe.read_text()).get("_base_") or ""
        expected = (
            "vit_base_patch16_224" if "vit_b16" in str(own) or "vpt" in str(own) else "resnet32"
        )
        assert cfg.model.backbone == expected and cfg.train.batch_size == 128
        again = load_config(recipe, [f"data={CONFIGS / 'datasets' / f'{name}.yaml'}"])  # a path
        assert again.to_dict() == cfg.to_dict()
        if not cfg.stages:  # every component name and option is one it takes
            check_config(cfg)


def test_dataset_file_is_lowest_then_model_then_recipe_then_overrides(tmp_path):
    (tmp_path / "datasets").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "methods").mkdir()
    (tmp_path / "datasets" / "toy.yaml").write_text(
        "_base_: %s\ndata: {val_per_class: 7}\noptim: {lr: 1.0, weight_decay: 0.5}\n"
        "model: {head: cosine}\n" % (CONFIGS / "datasets" / "cifar100_lt.yaml")
    )
    (tmp_path / "models" / "wide.yaml").write_text(
        "model: {backbone: resnet8, head: lws}\noptim: {lr: 2.0}\n"
    )
    recipe = tmp_path / "methods" / "r.yaml"
    recipe.write_text("_base_: %s\noptim: {lr: 3.0}\n" % (METHODS / "ce.yaml"))
    cfg = load_config(recipe, ["data=toy"])  # found next to the recipe's folder
    assert (cfg.data.dataset, cfg.data.val_per_class, cfg.model.head) == (
        "cifar100-lt",
        7,
        "cosine",
    )
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (3.0, 0.5)
    cfg = load_config(recipe, ["model=wide", "data=toy", "optim.lr=4"])
    assert (cfg.model.backbone, cfg.model.head, cfg.optim.lr) == ("resnet8", "lws", 4.0)
    # the project's folders answer for a recipe elsewhere
    assert load_config(recipe, ["data=mnist_lt"]).data.dataset == "mnist-lt"
    # a pipeline's stage files are composed with the pipeline's selector
    from longtail.engine.pipeline import expand_stages

    path = METHODS / "three_stage.yaml"
    stages = expand_stages(
        load_config(path, ["data=cifar100_lt"]), ["data=cifar100_lt"], source=path
    )
    assert {s.cfg.data.dataset for s in stages} == {"cifar100-lt"}
    assert {s.cfg.data.val_per_class for s in stages} == {20}


# ---------------------------------------------------------------------------------------------
# selector mistakes


def test_unknown_dataset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="cifar11_lt") as err:
        load_config(METHODS / "ldam_drw.yaml", ["data=cifar11_lt"])
    assert all(name in str(err.value) for name in DATASETS)
    with pytest.raises(ConfigError, match="resnet32"):
        load_config(METHODS / "ce.yaml", ["data=cifar10_lt", "model=resnet33"])
    with pytest.raises(ConfigError, match="no such dataset file"):
        load_config(METHODS / "ce.yaml", ["data=nowhere/x.yaml"])


def test_missing_dataset_says_to_add_data_name(capsys):
    with pytest.raises(
        ConfigError,
        match=r"add data=NAME \(available: cifar10_lt, cifar100_lt, "
        r"fashion_mnist_lt, imagenet_lt, inat2018, mnist_lt, places_lt\)",
    ):
        load_config(METHODS / "ce.yaml")
    with pytest.raises(ConfigError, match="add data=NAME"):  # a dotted key is no selector
        load_config(METHODS / "ce.yaml", ["data.dataset=cifar10-lt"])
    assert main(["train", str(METHODS / "ce.yaml"), "--print-config"]) == 2
    assert "add data=NAME" in capsys.readouterr().err


def test_a_recipe_that_fixes_its_dataset_refuses_data():
    quick = load_config(CONFIGS / "quickstart.yaml")  # runs without data=
    assert quick.data.dataset == "cifar10-lt" and quick.train.epochs == 3
    assert quick.schedule.name == "cosine"
    with pytest.raises(ConfigError, match="already fixes the dataset") as err:
        load_config(CONFIGS / "quickstart.yaml", ["data=cifar100_lt"])
    assert str(CONFIGS / "datasets" / "cifar10_lt.yaml") in str(err.value)


def test_resume_refuses_a_selector(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "data=cifar10_lt"]) == 2
    assert "--resume" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# --print-config


def test_print_config_prints_the_resolved_yaml_and_trains_nothing(tmp_path, capsys):
    argv = [str(METHODS / "ldam_drw.yaml"), "data=cifar100_lt", "optim.lr=0.05"]
    assert main(["train", *argv, "--out", str(tmp_path / "run"), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out == load_config(argv[0], argv[1:]).to_yaml()
    assert yaml.safe_load(out)["data"]["dataset"] == "cifar100-lt" and "optim" in yaml.safe_load(
        out
    )
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# end to end: `longtail train configs/methods/ldam_drw.yaml data=NAME` on tiny real-format data


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-compose")
    write_cifar100_folder(root, train_per_class=10, test_per_class=2)
    write_idx_folder(root, "MNIST", train_per_class=10, test_per_class=2)
    write_idx_folder(root, "FashionMNIST", train_per_class=10, test_per_class=2, seed=1)
    write_cifar10_folder(root, train_per_class=30, test_per_class=2)
    return root


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.filterwarnings("ignore::UserWarning")  # tiny copies; meta images borrowed
def test_every_recipe_builds_and_takes_a_step_on_every_dataset(name, tiny_root, tmp_path):
    """Not only valid: each single-run recipe builds its data, model, method, optimiser and
    sampler on the dataset and takes one training step with a finite loss. Recipes that need a
    previous run (stage 2, transfer) must say so by name instead."""
    import math

    stepped, refused = [], []
    for recipe in RECIPES:
        tiny = [o for o in TINY if not o.startswith("train.epochs")]  # keep the recipe's
        small = ["model.backbone=resnet8"]
        if load_config(recipe, [f"data={name}"]).model.backbone.startswith("vit_"):
            # prompt recipes need a ViT: the smallest, its inputs resized to 32 px
            small = [
                "model.backbone=vit_tiny_patch16_224",
                "model.backbone_params.img_size=32",
                "model.input_size=32",
                "model.tuning_params.length=2",
            ]
        cfg = load_config(recipe, [f"data={name}", *tiny, "data.meta_per_class=1", *small])
        if cfg.stages:
            continue
        try:
            run = build_run(cfg, tmp_path / recipe.stem, tiny_root)
        except LongtailError as err:
            assert any(k in str(err) for k in ("stage1", "checkpoint", "modulator", "teacher")), (
                str(err)
            )
            refused.append(recipe.stem)
            continue
        run.method.train_model.train()
        run.method.on_epoch_start(0)
        for hook in run.hooks.values():
            hook.before_epoch(run, 0)
        batch = next(iter(run.loader.epoch(0)))
        assert math.isfinite(float(run.method.train_step(batch)["loss"])), recipe.stem
        stepped.append(recipe.stem)
    assert {
        "ce",
        "ldam_drw",
        "cbs",
        "rsam_gcl_drw",
        "whitening_ldam_drw",
        "mfm",
        "mlrsnet",
        "rsam_pt",
        "vpt_gcl_drw",
        "vpt_sam_gcl_drw",
    } <= set(stepped)
    assert {
        "crt",
        "lws",
        "tau_norm",
        "ncm",
        "la_posthoc",
        "mfm_transfer",
        "mlrsnet_transfer",
    } <= set(refused)


@pytest.mark.parametrize(
    "name, classes", [("cifar100_lt", 100), ("mnist_lt", 10), ("fashion_mnist_lt", 10)]
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # the tiny copies are not the official size
def test_ldam_drw_trains_on_a_dataset_named_on_the_command_line(name, classes, tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(METHODS / "ldam_drw.yaml"),
                f"data={name}",
                *TINY,
                "--out",
                str(run_dir),
                "--data-root",
                str(tiny_root),
            ]
        )
        == 0
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["per_class"]) == classes and len(metrics["class_counts"]) == classes
    assert metrics["epochs"] == 1
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["dataset"] == dataset_of(name) and saved["loss"]["name"] == "ldam"
    assert saved["model"]["head"] == "cosine" and saved["model"]["backbone"] == "resnet32"


@pytest.mark.parametrize("name", FILE_DATASETS)
def test_file_dataset_recipes_compose_with_their_backbone_and_schedule(name):
    from longtail.engine.config_check import check_config

    want = {
        "imagenet_lt": ("imagenet-lt", "resnext50_32x4d", 90, 0.1),
        "places_lt": ("places-lt", "resnet152", 30, 0.01),
        "inat2018": ("inat2018", "resnet50", 90, 0.1),
    }[name]
    for recipe in ("ce", "ldam_drw", "bs", "cbs"):
        cfg = load_config(METHODS / f"{recipe}.yaml", [f"data={name}"])
        check_config(cfg)
        got = (cfg.data.dataset, cfg.model.backbone, cfg.train.epochs, cfg.optim.lr)
        if recipe in ("ce", "bs", "cbs"):  # ldam_drw brings its own schedule
            assert got == want, (recipe, got)
        assert cfg.data.transform == "imagenet_train" and cfg.data.eval_transform == "imagenet_eval"
