"""metrics.json's provenance: the code (version, commit), software, device, command line, class
names and the dataset's identity, whose hash tells whether two runs trained on the same images."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CIFAR10_NAMES, TINY_RUN

from longtail.core import provenance as prov
from longtail.core.config import load_config
from longtail.data.sources import build_bundle
from longtail.engine.trainer import fit

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "methods" / "ce.yaml"


def tiny_cfg(*extra):
    return load_config(CONFIG, [*TINY_RUN, "train.epochs=1", *extra])


@pytest.fixture(scope="module")
def finished(tiny_cifar_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("prov") / "run"
    fit(tiny_cfg(), run_dir, tiny_cifar_root)
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def by_hand(indices, labels) -> str:
    """sha256 of the int64 little-endian indices, then the labels, written out here."""
    h = hashlib.sha256()
    h.update(b"".join(int(i).to_bytes(8, "little", signed=True) for i in indices))
    h.update(b"".join(int(c).to_bytes(8, "little", signed=True) for c in labels))
    return h.hexdigest()


def test_metrics_record_code_software_device_and_command(finished):
    _, metrics = finished
    p = metrics["provenance"]
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert p["commit"] == head and isinstance(p["dirty"], bool)
    assert p["longtail"] == prov.package_version() and p["longtail"]
    assert p["torch"] == torch.__version__ and p["cuda"] == torch.version.cuda
    assert p["device"] == "cpu" and p["device_name"] == prov.cpu_name() and p["device_name"]
    assert p["command"] == sys.argv and p["python"].count(".") == 2
    assert p["classes"] == [n.decode() for n in CIFAR10_NAMES]


def test_dataset_identity_and_its_hash(finished, tiny_cifar_root):
    _, metrics = finished
    d = metrics["provenance"]["dataset"]
    assert (d["name"], d["imbalance_factor"], d["profile"], d["num_classes"]) == (
        "cifar10-lt",
        10.0,
        "exp",
        10,
    )
    assert d["images"] == {"train": sum(metrics["class_counts"]), "val": 27, "test": 100}
    assert d["measured_imbalance"] == pytest.approx(30 / 3)
    bundle = build_bundle(tiny_cfg().data, tiny_cifar_root)  # the same data, built again
    assert d["sha256"]["train"] == by_hand(bundle.train.indices, bundle.train.labels)
    assert d["sha256"]["test"] == by_hand(np.arange(100), bundle.test.labels)


def test_the_hash_tells_the_training_sets_apart(tiny_cifar_root):
    def train_hash(*extra):
        cfg = tiny_cfg(*extra)
        return prov.dataset_identity(build_bundle(cfg.data, tiny_cifar_root), cfg.data)["sha256"]

    same = train_hash()
    assert train_hash() == same  # built twice: the same images
    assert train_hash("seed=5")["train"] == same["train"]  # the training seed picks no images
    other_if = train_hash("data.imbalance_factor=5")
    assert other_if["train"] != same["train"] and other_if["test"] == same["test"]
    assert train_hash("data.subset_seed=1")["train"] != same["train"]


def test_no_commit_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(prov, "_CHECKOUT", tmp_path)  # a package folder that is no repository
    assert prov.git_state() == {"commit": None, "dirty": None}


def test_no_logger_leaves_no_logger_files(finished):
    run_dir, _ = finished
    names = {p.name for p in run_dir.iterdir()}
    assert not names & {"metrics.csv", "tb", "mlruns", "wandb", "mlflow_run_id.txt"}
