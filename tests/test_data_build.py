"""Tests for build_data: train / val / test assembly, options, errors, and the real CIFAR-10-LT subset."""

from __future__ import annotations

import dataclasses
import gzip
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_lt import reference_subset

from longtail.core.errors import DataError
from longtail.data import (
    DATASET_NAMES,
    build_data,
    cifar,
    heldout_indices,
    idx,
    img_num_per_cls,
    longtail_indices,
    paths,
)

CIFAR10_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.fixture(autouse=True)
def no_mirror(request, monkeypatch, tmp_path):
    """Never find the real local mirror, except in the real-data test."""
    if request.node.get_closest_marker("realdata") is None:
        monkeypatch.delenv(paths.MIRROR_VAR, raising=False)


def dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


@pytest.fixture
def cifar10_root(tmp_path, monkeypatch):
    """A small CIFAR-10 folder in the official format: 100 train images per class, 3 test per class."""
    monkeypatch.setitem(
        cifar.SPECS, "cifar10", dataclasses.replace(cifar.SPECS["cifar10"], train_size=1000)
    )
    rng = np.random.RandomState(7)
    folder = tmp_path / "cifar-10-batches-py"
    labels = rng.permutation(np.repeat(np.arange(10), 100))
    data = rng.randint(0, 256, (1000, 3072)).astype(np.uint8)
    for i in range(5):
        part = slice(200 * i, 200 * (i + 1))
        dump(
            folder / f"data_batch_{i + 1}", {b"labels": labels[part].tolist(), b"data": data[part]}
        )
    test_labels = np.tile(np.arange(10), 3)[::-1].copy()
    dump(
        folder / "test_batch",
        {
            b"labels": test_labels.tolist(),
            b"data": rng.randint(0, 256, (30, 3072)).astype(np.uint8),
        },
    )
    dump(folder / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]})
    return tmp_path, data, labels, test_labels


def test_cifar10_lt(cifar10_root):
    root, data, labels, test_labels = cifar10_root
    bundle = build_data("cifar10-lt", root, imbalance_factor=10, val_per_class=5, download=False)
    assert bundle.name == "cifar10-lt"
    assert bundle.class_counts == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]
    train = bundle.train
    assert (
        len(train) == 403
        and train.images.shape == (403, 3, 32, 32)
        and train.images.is_contiguous()
    )
    np.testing.assert_array_equal(train.indices, reference_subset(labels, 100, 10, 0.1))
    np.testing.assert_array_equal(train.images.reshape(403, -1).numpy(), data[train.indices])
    np.testing.assert_array_equal(train.labels.numpy(), labels[train.indices])
    assert train.labels.dtype == torch.int64 and train.indices.dtype == np.int64
    # val: 5 per class among the unused images; class 0 has none to spare
    val = bundle.val
    assert np.bincount(val.labels.numpy(), minlength=10).tolist() == [0] + [5] * 9
    assert not set(val.indices.tolist()) & set(train.indices.tolist())
    np.testing.assert_array_equal(val.indices, heldout_indices(labels, train.indices, 5, seed=1))
    np.testing.assert_array_equal(val.images.reshape(len(val), -1).numpy(), data[val.indices])
    # test: the full official test split, in file order
    assert len(bundle.test) == 30
    np.testing.assert_array_equal(bundle.test.labels.numpy(), test_labels)
    assert bundle.mean == (0.4914, 0.4822, 0.4465) and bundle.std == (0.2023, 0.1994, 0.2010)
    assert (bundle.in_channels, bundle.image_size, bundle.train.num_classes) == (3, 32, 10)


def test_options(cifar10_root):
    root, _, labels, test_labels = cifar10_root
    step = build_data("cifar10-lt", root, imbalance_factor=10, profile="step", download=False)
    assert step.class_counts == [100] * 5 + [10] * 5
    capped = build_data(
        "cifar10-lt",
        root,
        imbalance_factor=10,
        max_per_class=20,
        max_test_per_class=2,
        val_per_class=0,
        download=False,
    )
    assert capped.class_counts == [20, 20, 20, 20, 20, 20, 20, 16, 12, 10]
    assert capped.val is None
    # the first 2 test images of each class, in file order (test labels are 9, 8, ..., 0, 9, 8, ...)
    np.testing.assert_array_equal(capped.test.indices, np.arange(20))
    np.testing.assert_array_equal(capped.test.labels.numpy(), test_labels[:20])
    other = build_data("cifar10-lt", root, imbalance_factor=10, seed=1, download=False)
    assert other.class_counts == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]
    assert not np.array_equal(
        other.train.indices[100:], longtail_indices(labels, other.class_counts, 0)[100:]
    )
    balanced = build_data("cifar10-lt", root, imbalance_factor=1, download=False)
    assert balanced.class_counts == [100] * 10 and balanced.val is None


def test_non_lt_names(cifar10_root):
    root, _, labels, _ = cifar10_root
    full = build_data("cifar10", root, download=False)
    assert full.name == "cifar10" and full.class_counts == [100] * 10 and full.val is None
    np.testing.assert_array_equal(full.train.indices, np.arange(1000))
    capped = build_data("cifar10", root, max_per_class=40, val_per_class=7, download=False)
    assert capped.class_counts == [40] * 10
    assert np.bincount(capped.val.labels.numpy(), minlength=10).tolist() == [7] * 10
    assert not set(capped.val.indices.tolist()) & set(capped.train.indices.tolist())


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"dataset": "imagenet-lt"}, "fashion-mnist-lt"),
        ({"imbalance_factor": 0.5}, "data.imbalance_factor"),
        ({"profile": "linear"}, "data.profile"),
        ({"val_per_class": -1}, "data.val_per_class"),
        ({"max_per_class": 0}, "data.max_per_class"),
    ],
)
def test_invalid_options(tmp_path, kwargs, needle):
    args = {"dataset": "cifar10-lt", "root": tmp_path, "download": False, **kwargs}
    with pytest.raises(DataError, match=needle) as err:
        build_data(**args)
    if "dataset" in kwargs:
        assert all(name in str(err.value) for name in DATASET_NAMES)


def write_idx(raw: Path, labels: np.ndarray, n_test: int = 20) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for prefix, y in (("train", labels), ("t10k", np.arange(n_test) % 10)):
        images = rng.randint(0, 256, (len(y), 28, 28)).astype(np.uint8)
        for stem, magic, arr in (
            (f"{prefix}-images-idx3-ubyte", 2051, images),
            (f"{prefix}-labels-idx1-ubyte", 2049, y.astype(np.uint8)),
        ):
            header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
            (raw / f"{stem}.gz").write_bytes(gzip.compress(header + arr.tobytes()))


@pytest.mark.parametrize(
    "name, folder, mean, std",
    [
        ("mnist", "MNIST", (0.1307,), (0.3081,)),
        ("fashion-mnist", "FashionMNIST", (0.2860,), (0.3530,)),
    ],
)
def test_idx_lt_uses_smallest_class(tmp_path, monkeypatch, name, folder, mean, std):
    per_class = np.array(
        [12, 13, 10, 11, 14, 12, 15, 10, 11, 12]
    )  # n_max = min = 10 (like MNIST's 5421)
    labels = np.random.RandomState(3).permutation(np.repeat(np.arange(10), per_class))
    monkeypatch.setitem(
        idx.SPECS, name, dataclasses.replace(idx.SPECS[name], train_size=len(labels))
    )
    write_idx(tmp_path / folder / "raw", labels)
    bundle = build_data(f"{name}-lt", tmp_path, imbalance_factor=2, val_per_class=2, download=False)
    assert bundle.class_counts == img_num_per_cls(10, 10, 2) == [10, 9, 8, 7, 7, 6, 6, 5, 5, 5]
    assert (bundle.in_channels, bundle.image_size) == (1, 28)
    assert bundle.train.images.shape == (sum(bundle.class_counts), 1, 28, 28)
    assert bundle.mean == mean and bundle.std == std
    # class 2 and 7 have exactly 10 images: class 2 keeps 8 (2 spare), class 7 keeps 5 (5 spare)
    assert np.bincount(bundle.val.labels.numpy(), minlength=10).tolist() == [2] * 10
    assert len(bundle.test) == 20


@pytest.mark.realdata
def test_real_cifar10_lt_if100(real_data_root):
    root = real_data_root
    start = time.perf_counter()
    bundle = build_data("cifar10-lt", root, imbalance_factor=100, download=False)
    elapsed = time.perf_counter() - start
    assert bundle.class_counts == CIFAR10_IF100 and len(bundle.train) == 12_406
    # independent reading of the official labels (plain pickle: our own trusted local files)
    labels = []
    for i in range(1, 6):
        with open(Path(root) / "cifar-10-batches-py" / f"data_batch_{i}", "rb") as f:
            labels += pickle.load(f, encoding="bytes")[b"labels"]
    labels = np.array(labels)
    assert np.bincount(labels).tolist() == [5000] * 10
    ref = reference_subset(labels, 5000, 10, 0.01)
    ours_class9 = bundle.train.indices[bundle.train.labels.numpy() == 9]
    np.testing.assert_array_equal(ours_class9[:5], ref[labels[ref] == 9][:5])
    assert ours_class9[:5].tolist() == [22220, 38393, 22240, 25393, 19625]
    np.testing.assert_array_equal(bundle.train.indices, ref)
    assert np.bincount(bundle.val.labels.numpy(), minlength=10).tolist() == [0] + [200] * 9
    assert not set(bundle.val.indices.tolist()) & set(bundle.train.indices.tolist())
    assert len(bundle.test) > 0 and int(bundle.test.labels.max()) == 9
    print(
        f"real CIFAR-10-LT built in {elapsed:.2f}s; first class-9 indices {ours_class9[:5].tolist()}"
    )
