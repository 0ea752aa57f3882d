"""The Python API: longtail.train / evaluate on a tiny real-format CIFAR-10, create_model's logits
and features, samplers in a plain DataLoader (exact class histograms), create_loss against a
hand-computed value, the top-level names and help(), the docs/api.md example (run as written),
and an import without fcntl (as on Windows) that still locks and downloads."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Sampler, TensorDataset

import longtail
from longtail import api
from longtail.core.config import load_config
from longtail.core.errors import ConfigError
from longtail.data.samplers import SAMPLERS
from longtail.losses import LOSSES
from longtail.models import BACKBONES

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


# ------------------------------------------------------------------------------ train / evaluate
def test_train_writes_the_run_and_evaluate_reproduces_it(tiny_cifar_root, tmp_path):
    run = tmp_path / "run"
    metrics = longtail.train(
        CONFIGS / "methods" / "ce.yaml",
        overrides=[*TINY_RUN, "train.epochs=1"],
        out=run,
        data_root=tiny_cifar_root,
    )
    for name in ("config.yaml", "metrics.json", "model.safetensors", "history.jsonl"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert metrics["top1"] == saved["top1"] and metrics["epochs"] == 1
    assert metrics["class_counts"][0] / metrics["class_counts"][-1] == pytest.approx(10, rel=0.1)
    assert 0.0 <= metrics["top1"] <= 100.0 and len(metrics["per_class"]) == 10

    again = longtail.evaluate(run, data_root=tiny_cifar_root)
    assert again["top1"] == metrics["top1"] and again["per_class"] == metrics["per_class"]
    assert again["val"]["top1"] == metrics["val"]["top1"]

    # the run's weights load into create_model's classifier, key for key
    model = longtail.create_model("resnet8", num_classes=10)
    model.classifier.load_state_dict(load_file(str(run / "model.safetensors")))


def test_dict_config_and_overrides_compose_as_the_file():
    recipe = CONFIGS / "methods" / "ldam_drw.yaml"
    as_cli = ["data=cifar10_lt", "train.epochs=3", "schedule.milestones=[2]", "loss.drw_epoch=2"]
    expected = load_config(recipe, as_cli).to_dict()
    overrides = {"data": "cifar10_lt", "train.epochs": 3, "schedule.milestones": [2]}
    items = api._override_list({**overrides, "loss.drw_epoch": 2})
    assert items == as_cli
    assert api._config_from_dict({"_base_": str(recipe)}, items).to_dict() == expected
    tree = load_config(recipe, as_cli).to_dict()  # a whole config as a dict: itself
    assert api._config_from_dict(tree, []).to_dict() == expected

    with pytest.raises(ConfigError, match="already fixes the dataset"):
        api._config_from_dict(tree, ["data=cifar100_lt"])
    with pytest.raises(ConfigError, match="not one string"):
        api._override_list("train.epochs=2")
    with pytest.raises(ConfigError, match="unknown key 'train.epochz'"):
        longtail.train(recipe, overrides=["data=cifar10_lt", "train.epochz=1"])


# ------------------------------------------------------------------------------------ models
def test_create_model_gives_logits_and_features():
    x = torch.randn(2, 3, 32, 32)
    model = longtail.create_model("resnet8", num_classes=7).eval()
    assert isinstance(model, torch.nn.Module)
    logits, features = model(x), model.forward_features(x)
    assert logits.shape == (2, 7) and features.shape == (2, 64)
    assert torch.allclose(model.classifier.head(features), logits)

    cosine = longtail.create_model("resnet8", num_classes=5, head="cosine").eval()
    assert cosine(x).abs().max() <= 1.0 + 1e-5  # cosines, the input LDAM expects

    grey = longtail.create_model("resnet8", num_classes=3, in_chans=1, widths=(8, 16, 32))
    assert grey.forward_features(torch.randn(2, 1, 28, 28)).shape == (2, 32)

    with pytest.raises(ConfigError, match="depthz"):
        longtail.create_model("resnet8", num_classes=3, depthz=3)
    with pytest.raises(ConfigError, match="Unknown backbone 'resnet9'"):
        longtail.create_model("resnet9", num_classes=3)
    with pytest.raises(ConfigError, match="num_classes"):
        longtail.create_model("resnet8", num_classes=0)
    assert longtail.list_models() == BACKBONES.names() and "resnet32" in longtail.list_models()


# ---------------------------------------------------------------------------------- samplers
def _labels_seen(loader) -> torch.Tensor:
    return torch.cat([y for _, y in loader])


def test_samplers_work_in_a_plain_dataloader():
    labels = torch.tensor([0] * 50 + [1] * 10 + [2] * 2)
    dataset = TensorDataset(torch.arange(len(labels)), labels)

    sampler = longtail.create_sampler("class_balanced", labels, num_samples_cls=1)
    assert isinstance(sampler, Sampler) and isinstance(sampler, longtail.ClassBalancedSampler)
    loader = DataLoader(dataset, batch_size=16, sampler=sampler)
    assert len(sampler) == 150 and len(loader) == 10  # n_max * C items, ceil(150 / 16) batches
    epoch0 = _labels_seen(loader)
    assert torch.bincount(epoch0).tolist() == [50, 50, 50]  # 1 / C each, exactly
    epoch1 = _labels_seen(loader)  # the next pass is the next epoch
    order0, order1 = sampler.global_order(0), sampler.global_order(1)
    assert epoch0.tolist() == labels[order0].tolist()
    assert epoch1.tolist() == labels[order1].tolist() and not np.array_equal(order0, order1)
    sampler.set_epoch(0)
    assert _labels_seen(loader).tolist() == epoch0.tolist()  # set_epoch: reproducible

    under = longtail.create_sampler("undersample", labels.numpy(), seed=3)
    counts = torch.bincount(_labels_seen(DataLoader(dataset, batch_size=4, sampler=under)))
    assert counts.tolist() == [2, 2, 2]

    instance = longtail.create_sampler("instance", labels.tolist())
    positions = torch.cat([i for i, _ in DataLoader(dataset, batch_size=8, sampler=instance)])
    assert sorted(positions.tolist()) == list(range(62))  # a permutation: n_c / N

    with pytest.raises(ConfigError, match="batch_size="):
        longtail.create_sampler("b3rs", labels)
    b3rs = longtail.create_sampler("b3rs", labels, batch_size=8, num_blocks=2)
    assert len(b3rs) == 8 * 8  # round(62 / 8) whole batches
    with pytest.raises(ValueError, match="epoch must be an integer"):
        sampler.set_epoch(-1)
    assert longtail.list_samplers() == SAMPLERS.names()


# ------------------------------------------------------------------------------------ losses
def test_create_loss_by_name_with_class_counts():
    counts = [30.0, 10.0, 1.0]
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    targets = torch.tensor([0, 2])
    loss = longtail.create_loss("balanced_softmax", class_counts=counts)
    assert isinstance(loss, longtail.BalancedSoftmaxLoss)
    by_hand = F.cross_entropy(logits + torch.log(torch.tensor(counts)), targets)  # Ren et al.
    assert loss(logits, targets).item() == pytest.approx(by_hand.item(), rel=1e-6)
    ce = longtail.create_loss("ce")
    assert ce(logits, targets).item() == pytest.approx(F.cross_entropy(logits, targets).item())
    with pytest.raises(ConfigError, match="class_counts"):
        longtail.create_loss("ldam")
    assert longtail.list_losses() == LOSSES.names()


# ------------------------------------------------------------------------ top level and help()
def test_every_component_is_a_top_level_name_and_help_lists_them():
    classes = [LOSSES.get(n) for n in LOSSES.names()] + [SAMPLERS.get(n) for n in SAMPLERS.names()]
    for cls in classes:
        assert getattr(longtail, cls.__name__) is cls, cls.__name__  # no two share a name
    assert longtail._FUNCTIONS == api.FUNCTIONS
    assert set(longtail.__all__) == {*api.FUNCTIONS, *(c.__name__ for c in classes)} | {
        "LongtailLoss",
        "BaseSampler",
        "LogitsModel",
    }
    assert longtail.list_methods() and "erm" in longtail.list_methods()
    text = pydoc.render_doc(longtail, renderer=pydoc.plaintext)
    for name in (*api.FUNCTIONS, *(c.__name__ for c in classes)):
        assert re.search(rf"\b{name}\b", text), name
    namespace: dict = {}
    exec("from longtail import *", namespace)
    assert namespace["LDAMLoss"] is longtail.LDAMLoss and callable(namespace["create_sampler"])
    with pytest.raises(AttributeError, match="no attribute 'LDAMLos'"):
        longtail.LDAMLos  # noqa: B018


# ---------------------------------------------------------------------------------- the docs
def _docs_example() -> str:
    text = (REPO / "docs" / "api.md").read_text()
    found = re.search(r"<!-- tested:[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert found, "docs/api.md has no tested example"
    return found.group(1)


def test_the_docs_example_runs():
    code = _docs_example()
    assert 20 <= len(code.strip().splitlines()) <= 40
    namespace: dict = {"__name__": "docs_api_example"}
    out = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/api.md", "exec"), namespace)
    torch.set_num_threads(threads)
    printed = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in printed] == ["epoch 0", "epoch 1"]
    seen = namespace["seen"].tolist()
    assert sum(seen) == 248 and sorted(seen) == [80, 84, 84]  # balanced, not 200 / 40 / 8
    assert np.isfinite(namespace["loss"].item())
    model = namespace["model"].eval()
    assert model(namespace["images"][:4]).shape == (4, 3)


# ------------------------------------------------------------------- light, and without fcntl
NO_FCNTL = """
import sys
sys.modules["fcntl"] = None  # as on Windows: `import fcntl` fails
import longtail
assert "torch" not in sys.modules, "import longtail loaded torch"
from pathlib import Path
import longtail.data.paths as paths
tmp = Path(sys.argv[1])
src = tmp / "src.bin"
src.write_bytes(b"payload" * 100)
with paths._root_lock(tmp / "root"):
    paths.download_file(src.as_uri(), tmp / "root" / "f.bin", paths.md5_file(src), progress=False)
assert (tmp / "root" / "f.bin").read_bytes() == src.read_bytes()
print("ok", type(longtail.create_loss("ce")).__name__)
"""


def test_the_package_imports_and_downloads_without_fcntl(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", NO_FCNTL, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ok", "CrossEntropyLoss"]
