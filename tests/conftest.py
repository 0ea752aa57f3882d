"""Shared test fixtures: one torch thread per process, tiny datasets in the real on-disk formats,
and the real data (from $LONGTAIL_DATA or the local mirror) for the checks that need it."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
# train.amp=auto resolves to fp32 without measuring (deterministic, bit-exact runs), also in the
# CLI subprocesses tests start; tests of the probe set LONGTAIL_AMP_AUTO=measure themselves
os.environ.setdefault("LONGTAIL_AMP_AUTO", "none")

IN_CI = os.environ.get("CI", "").lower() == "true"
REPO = Path(__file__).resolve().parents[1]
# files of the repository that only `longtail bench` / benchmarks on real data may write
GUARDED = [REPO / "docs" / "results.md", *sorted((REPO / "benchmarks" / "results").glob("*"))]


def _snapshot():
    return {p: p.read_bytes() if p.is_file() else None for p in GUARDED}


@pytest.fixture(autouse=True, scope="session")
def repository_results_stay_untouched():
    """Fails the session if a test rewrote docs/results.md or a benchmark result of the repo."""
    before = _snapshot()
    yield
    changed = [str(p.relative_to(REPO)) for p, data in _snapshot().items() if data != before[p]]
    assert not changed, f"tests rewrote repository files: {changed} (give the test a tmp path)"


# the overrides of a tiny run on write_cifar10_folder's data (ResNet-8, IF 10), without a schedule
TINY_DATA = [
    "data=cifar10_lt",
    "model.backbone=resnet8",
    "data.imbalance_factor=10",
    "data.val_per_class=3",
    "train.batch_size=32",
    "train.eval_batch_size=64",
    "train.progress=false",
]
# ... and with a 3 epochs' schedule
TINY_RUN = [
    *TINY_DATA,
    "schedule.warmup_epochs=1",
    "schedule.milestones=[3]",
    "schedule.gamma=0.1",
]
CIFAR10_NAMES = [
    b"airplane",
    b"automobile",
    b"bird",
    b"cat",
    b"deer",
    b"dog",
    b"frog",
    b"horse",
    b"ship",
    b"truck",
]


def write_cifar10_folder(
    root: Path, train_per_class: int = 30, test_per_class: int = 10, seed: int = 0
) -> Path:
    """A small CIFAR-10 in the official extracted layout (Python-2 style pickles with bytes keys).

    Images are learnable: class c has a distinct colour mean plus noise. Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    colours = rng.integers(30, 226, size=(10, 3))

    def make(n_per_class: int):
        labels = np.repeat(np.arange(10), n_per_class)
        rng.shuffle(labels)
        pix = colours[labels][:, :, None] + rng.normal(0, 25, size=(len(labels), 3, 1024))
        return np.clip(pix, 0, 255).astype(np.uint8).reshape(len(labels), 3072), labels

    data, labels = make(train_per_class)
    for i, part in enumerate(np.array_split(np.arange(len(labels)), 5)):
        batch = {
            b"batch_label": f"training batch {i + 1} of 5".encode(),
            b"labels": labels[part].tolist(),
            b"data": data[part],
            b"filenames": [b"x.png"] * len(part),
        }
        with open(folder / f"data_batch_{i + 1}", "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    data, labels = make(test_per_class)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump(
            {
                b"batch_label": b"testing batch 1 of 1",
                b"labels": labels.tolist(),
                b"data": data,
                b"filenames": [b"x.png"] * len(labels),
            },
            fh,
            protocol=2,
        )
    names = CIFAR10_NAMES
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump(
            {b"label_names": names, b"num_cases_per_batch": 10000, b"num_vis": 3072}, fh, protocol=2
        )
    return root


def write_cifar100_folder(
    root: Path, train_per_class: int = 10, test_per_class: int = 2, seed: int = 0
) -> Path:
    """A small CIFAR-100 in the official extracted layout (``cifar-100-python/`` with the
    ``train`` / ``test`` / ``meta`` pickles, bytes keys, fine and coarse labels).

    Images are learnable: class c has a distinct colour mean plus noise. Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    colours = rng.integers(30, 226, size=(100, 3))
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        fine = rng.permutation(np.repeat(np.arange(100), n))
        pix = colours[fine][:, :, None] + rng.normal(0, 25, size=(len(fine), 3, 1024))
        data = np.clip(pix, 0, 255).astype(np.uint8).reshape(len(fine), 3072)
        with open(folder / split, "wb") as fh:
            pickle.dump(
                {
                    b"filenames": [b"x.png"] * len(fine),
                    b"batch_label": split.encode(),
                    b"fine_labels": fine.tolist(),
                    b"coarse_labels": (fine // 5).tolist(),
                    b"data": data,
                },
                fh,
                protocol=2,
            )
    with open(folder / "meta", "wb") as fh:
        pickle.dump(
            {
                b"fine_label_names": [b"class%02d" % i for i in range(100)],
                b"coarse_label_names": [b"super%02d" % i for i in range(20)],
            },
            fh,
            protocol=2,
        )
    return root


def write_idx_folder(
    root: Path,
    folder: str = "FashionMNIST",
    train_per_class: int = 10,
    test_per_class: int = 2,
    seed: int = 0,
) -> Path:
    """A small MNIST (``folder="MNIST"``) or Fashion-MNIST (``"FashionMNIST"``) in the official
    layout: ``ROOT/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` with real idx
    headers. Class c is a bright band at rows 2c+4 .. 2c+7. Returns ``root``."""
    import gzip

    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train_per_class), ("t10k", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), n)).astype(np.uint8)
        images = rng.normal(40, 20, size=(len(labels), 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c + 4 : 2 * c + 8] += 150
        images = np.clip(images, 0, 255).astype(np.uint8)
        for stem, arr, magic in (
            (f"{prefix}-images-idx3-ubyte", images, 2051),
            (f"{prefix}-labels-idx1-ubyte", labels, 2049),
        ):
            header = magic.to_bytes(4, "big") + b"".join(
                int(d).to_bytes(4, "big") for d in arr.shape
            )
            (raw / f"{stem}.gz").write_bytes(gzip.compress(header + arr.tobytes()))
    return root


@pytest.fixture(scope="session")
def tiny_cifar_root(tmp_path_factory) -> Path:
    """A 300-image CIFAR-10 (30 per class, 10 test images per class) in the official layout."""
    return write_cifar10_folder(tmp_path_factory.mktemp("tiny-cifar"))


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The real datasets: $LONGTAIL_DATA, else the default root (filled from the mirror that
    $LONGTAIL_MIRROR names, if any).

    Skipped where no real data can be had, except in CI, where that is a failure.
    """
    from longtail.core.errors import DataError
    from longtail.data.build import load_split
    from longtail.data.paths import resolve_data_root

    root = resolve_data_root(None)
    try:
        load_split("cifar10", "test", root)
    except DataError as err:
        if IN_CI:
            pytest.fail(f"CI must have the real data: {err}")
        pytest.skip(f"real data not available: {err}")
    return root
