"""Tests for the on-disk formats (CIFAR pickles / archive, idx .gz), the restricted unpickler and fetching."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CIFAR10_NAMES

from longtail.core.errors import DataError
from longtail.data import cifar, idx, load_split, paths, resolve_data_root


@pytest.fixture(autouse=True)
def no_mirror(monkeypatch, tmp_path):
    """Never find the real local mirror (it would materialise real datasets)."""
    monkeypatch.delenv(paths.MIRROR_VAR, raising=False)


# ------------------------------------------------------------------------------------- writers
def dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, per_class: int = 20, test_per_class: int = 3, seed: int = 0):
    """A CIFAR-10 folder in the official layout: 5 train batches, test_batch, batches.meta."""
    rng = np.random.RandomState(seed)
    folder = root / "cifar-10-batches-py"
    labels = rng.permutation(np.repeat(np.arange(10), per_class))
    data = rng.randint(0, 256, (len(labels), 3072)).astype(np.uint8)
    for i, (d, y) in enumerate(zip(np.array_split(data, 5), np.array_split(labels, 5)), start=1):
        dump(
            folder / f"data_batch_{i}",
            {
                b"batch_label": b"training batch %d of 5" % i,
                b"labels": [int(v) for v in y],
                b"data": d,
                b"filenames": [b"f%d.png" % j for j in range(len(y))],
            },
        )
    test_labels = rng.permutation(np.repeat(np.arange(10), test_per_class))
    test_data = rng.randint(0, 256, (len(test_labels), 3072)).astype(np.uint8)
    dump(
        folder / "test_batch",
        {
            b"batch_label": b"testing batch 1 of 1",
            b"data": test_data,
            b"labels": [int(v) for v in test_labels],
        },
    )
    dump(
        folder / "batches.meta",
        {b"label_names": CIFAR10_NAMES, b"num_cases_per_batch": 10000, b"num_vis": 3072},
    )
    return data, labels, test_data, test_labels


def write_cifar100(root: Path, per_class: int = 2, seed: int = 0):
    rng = np.random.RandomState(seed)
    folder = root / "cifar-100-python"
    out = {}
    for split, n in (("train", per_class), ("test", 1)):
        fine = rng.permutation(np.repeat(np.arange(100), n))
        data = rng.randint(0, 256, (len(fine), 3072)).astype(np.uint8)
        dump(
            folder / split,
            {
                b"filenames": [b"x.png"] * len(fine),
                b"batch_label": b"x",
                b"fine_labels": [int(v) for v in fine],
                b"coarse_labels": [int(v) // 5 for v in fine],
                b"data": data,
            },
        )
        out[split] = (data, fine)
    dump(
        folder / "meta",
        {
            b"fine_label_names": [b"class%02d" % i for i in range(100)],
            b"coarse_label_names": [b"super%02d" % i for i in range(20)],
        },
    )
    return out


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(raw_dir: Path, n_train: int = 30, n_test: int = 10, seed: int = 0, gz: bool = True):
    """The four MNIST-style files (torchvision layout) with real idx headers."""
    rng = np.random.RandomState(seed)
    raw_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.randint(0, 256, (n, 28, 28)).astype(np.uint8)
        labels = np.arange(n) % 10
        for stem, blob in (
            (f"{prefix}-images-idx3-ubyte", idx_bytes(images, 2051)),
            (f"{prefix}-labels-idx1-ubyte", idx_bytes(labels, 2049)),
        ):
            if gz:
                (raw_dir / f"{stem}.gz").write_bytes(gzip.compress(blob))
            else:
                (raw_dir / stem).write_bytes(blob)
        out[prefix] = (images, labels)
    return out


def small(monkeypatch, key: str, train_size: int) -> None:
    """Let a small fake training split pass the official-size check."""
    module = cifar if key in cifar.SPECS else idx
    monkeypatch.setitem(
        module.SPECS, key, dataclasses.replace(module.SPECS[key], train_size=train_size)
    )


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------- CIFAR
def test_cifar10_folder_loads_channel_planar(tmp_path, monkeypatch):
    small(monkeypatch, "cifar10", 200)
    data, labels, test_data, test_labels = write_cifar10(tmp_path)
    train = load_split("cifar10", "train", tmp_path, download=False)
    assert train.images.shape == (200, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.images.is_contiguous() and train.labels.dtype == torch.int64
    np.testing.assert_array_equal(train.labels.numpy(), labels)
    np.testing.assert_array_equal(train.indices, np.arange(200))
    k = 17  # planar: R plane first (1024 values row-major), then G, then B
    assert train.images[k, 0, 0, 1] == data[k, 1]
    assert train.images[k, 0, 1, 0] == data[k, 32]
    assert train.images[k, 1, 0, 0] == data[k, 1024]
    assert train.images[k, 2, 31, 31] == data[k, 3071]
    assert train.classes[0] == "airplane" and train.num_classes == 10 and len(train) == 200
    test = load_split("cifar10", "test", tmp_path, download=False)
    assert len(test) == 30  # any test size is accepted (the local copy has 1,017 rows)
    np.testing.assert_array_equal(test.images.reshape(30, -1).numpy(), test_data)
    np.testing.assert_array_equal(test.labels.numpy(), test_labels)


def test_cifar100_uses_fine_labels(tmp_path, monkeypatch):
    small(monkeypatch, "cifar100", 200)
    out = write_cifar100(tmp_path)
    train = load_split("cifar100", "train", tmp_path, download=False)
    assert train.images.shape == (200, 3, 32, 32) and train.num_classes == 100
    np.testing.assert_array_equal(train.labels.numpy(), out["train"][1])
    assert train.classes[:2] == ["class00", "class01"]
    test = load_split("cifar100", "test", tmp_path, download=False)
    np.testing.assert_array_equal(test.images.reshape(100, -1).numpy(), out["test"][0])


def make_archive(src_root: Path, archive: Path, extra: dict[str, bytes] | None = None) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src_root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        for name, blob in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_cifar_archive_is_md5_checked_and_extracted(tmp_path, monkeypatch):
    small(monkeypatch, "cifar10", 200)
    data, labels, _, _ = write_cifar10(tmp_path / "src")
    root = tmp_path / "root"
    root.mkdir()
    archive = root / "cifar-10-python.tar.gz"
    make_archive(
        tmp_path / "src",
        archive,
        extra={"../evil.txt": b"x", "cifar-10-batches-py/readme.html": b"r"},
    )
    with pytest.raises(DataError) as err:  # our fake archive is not the official one
        load_split("cifar10", "train", root, download=False)
    assert str(archive) in str(err.value) and "c58f30108f718f92721af3b95e74349a" in str(err.value)
    assert not (root / "cifar-10-batches-py").exists()

    monkeypatch.setitem(
        cifar.SPECS,
        "cifar10",
        dataclasses.replace(cifar.SPECS["cifar10"], archive_md5=md5(archive)),
    )
    train = load_split("cifar10", "train", root, download=False)
    np.testing.assert_array_equal(train.images.reshape(200, -1).numpy(), data)
    assert sorted(p.name for p in (root / "cifar-10-batches-py").iterdir()) == [
        "batches.meta",
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ]
    assert not (tmp_path / "evil.txt").exists()


def test_truncated_archive(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "src")
    archive = tmp_path / "root" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    make_archive(tmp_path / "src", archive)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    monkeypatch.setitem(
        cifar.SPECS,
        "cifar10",
        dataclasses.replace(cifar.SPECS["cifar10"], archive_md5=md5(archive)),
    )
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        load_split("cifar10", "train", archive.parent, download=False)
    assert str(archive) in str(err.value) and "re-run" in str(err.value)
    assert not [p for p in archive.parent.rglob("*.part")]


def test_truncated_pickle(tmp_path, monkeypatch):
    small(monkeypatch, "cifar10", 200)
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:5000])
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        load_split("cifar10", "train", tmp_path, download=False)
    assert str(batch) in str(err.value) and "Delete it and re-run" in str(err.value)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda b: {**b, b"data": b[b"data"][:, :3071]}, "3072"),
        (lambda b: {**b, b"data": b[b"data"].astype(np.int16)}, "uint8"),
        (lambda b: {**b, b"labels": b[b"labels"][:-1]}, "labels"),
        (lambda b: {**b, b"labels": [10] * len(b[b"labels"])}, "0..9"),
        (lambda b: {k: v for k, v in b.items() if k != b"labels"}, "missing"),
    ],
)
def test_malformed_batch(tmp_path, monkeypatch, change, needle):
    small(monkeypatch, "cifar10", 200)
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "rb") as f:
        content = pickle.load(f, encoding="bytes")
    dump(batch, change(content))
    with pytest.raises(DataError) as err:
        load_split("cifar10", "train", tmp_path, download=False)
    assert str(batch) in str(err.value) and needle in str(err.value)


def test_unofficial_train_total_warns(tmp_path):
    write_cifar10(tmp_path)  # 200 images; the official 50,000 is not patched here
    with pytest.warns(
        UserWarning, match="holds 200 training images, not the official 50000"
    ) as rec:
        train = load_split("cifar10", "train", tmp_path, download=False)
    assert len(train) == 200 and str(tmp_path / "cifar-10-batches-py") in str(rec[0].message)
    write_idx(tmp_path / "MNIST" / "raw")
    with pytest.warns(UserWarning, match="holds 30 training images, not the official 60000"):
        load_split("mnist", "train", tmp_path, download=False)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path, monkeypatch):
    small(monkeypatch, "cifar10", 200)
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    dump(batch, {b"data": _Evil(marker), b"labels": []})
    with pytest.raises(DataError, match="system") as err:
        load_split("cifar10", "train", tmp_path, download=False)
    assert str(batch) in str(err.value) and "refused" in str(err.value)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        cifar.RestrictedUnpickler(io.BytesIO(pickle.dumps(_Evil(marker), protocol=2))).load()
    with pytest.raises(pickle.UnpicklingError):
        cifar.RestrictedUnpickler(io.BytesIO(pickle.dumps(eval, protocol=2))).load()
    assert not marker.exists()


def test_restricted_unpickler_reads_numpy1_python2_style(tmp_path):
    array = np.arange(3072 * 2, dtype=np.uint8).reshape(2, 3072)
    blob = pickle.dumps({b"data": array, b"labels": [1, 2]}, protocol=2)
    assert b"numpy._core.multiarray\n_reconstruct" in blob
    old = blob.replace(
        b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"
    )  # as in the official files
    path = tmp_path / "batch"
    path.write_bytes(old)
    loaded = cifar.load_pickle(path, fix="")
    np.testing.assert_array_equal(loaded[b"data"], array)
    assert loaded[b"labels"] == [1, 2]


# --------------------------------------------------------------------------------------- idx
@pytest.mark.parametrize(
    "name, folder, first_class",
    [("mnist", "MNIST", "0 - zero"), ("fashion-mnist", "FashionMNIST", "T-shirt/top")],
)
def test_idx_loads(tmp_path, monkeypatch, name, folder, first_class):
    small(monkeypatch, name, 30)
    out = write_idx(tmp_path / folder / "raw")
    train = load_split(name, "train", tmp_path, download=False)
    assert train.images.shape == (30, 1, 28, 28) and train.images.dtype == torch.uint8
    np.testing.assert_array_equal(train.images[:, 0].numpy(), out["train"][0])
    np.testing.assert_array_equal(train.labels.numpy(), out["train"][1])
    assert train.classes[0] == first_class and train.num_classes == 10
    test = load_split(name, "test", tmp_path, download=False)
    assert len(test) == 10


def test_idx_uncompressed_fallback(tmp_path, monkeypatch):
    small(monkeypatch, "mnist", 30)
    out = write_idx(tmp_path / "MNIST" / "raw", gz=False)
    train = load_split("mnist", "train", tmp_path, download=False)
    np.testing.assert_array_equal(train.images[:, 0].numpy(), out["train"][0])


def test_idx_truncated_gz(tmp_path, monkeypatch):
    small(monkeypatch, "mnist", 30)
    write_idx(tmp_path / "MNIST" / "raw")
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        load_split("mnist", "train", tmp_path, download=False)
    assert str(path) in str(err.value)


def test_idx_wrong_magic_and_size(tmp_path, monkeypatch):
    small(monkeypatch, "mnist", 30)
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw)
    labels = raw / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(30), 2051)[:8] + bytes(30)))
    with pytest.raises(DataError, match="magic number 2051, expected 2049") as err:
        load_split("mnist", "train", tmp_path, download=False)
    assert str(labels) in str(err.value)
    images = raw / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(idx_bytes(np.zeros((10, 28, 28)), 2051)[:-1]))
    with pytest.raises(DataError, match="truncated") as err:
        load_split("mnist", "test", tmp_path, download=False)
    assert str(images) in str(err.value)
    images.write_bytes(gzip.compress(idx_bytes(np.zeros((10, 28, 28)), 2051) + b"\0"))
    with pytest.raises(DataError, match="7841 data bytes"):
        load_split("mnist", "test", tmp_path, download=False)
    images.write_bytes(gzip.compress(idx_bytes(np.zeros((10, 32, 32)), 2051)))
    with pytest.raises(DataError, match=r"\(28, 28\)"):
        load_split("mnist", "test", tmp_path, download=False)


# ------------------------------------------------------------------------ missing / fetching
@pytest.mark.parametrize(
    "name, expected",
    [
        ("cifar10", "cifar-10-python.tar.gz"),
        ("cifar100", "cifar-100-python"),
        ("mnist", "MNIST/raw/train-images-idx3-ubyte.gz"),
        ("fashion-mnist", "FashionMNIST/raw/train-images-idx3-ubyte.gz"),
    ],
)
def test_missing_without_download_or_mirror(tmp_path, name, expected):
    with pytest.raises(DataError) as err:
        load_split(name, "train", tmp_path / "empty", download=False)
    msg = str(err.value)
    assert str(tmp_path / "empty" / expected) in msg
    assert "--data-root" in msg and "LONGTAIL_DATA" in msg and "download=False" in msg
    assert not (tmp_path / "empty").exists()


def test_download_file_md5(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload" * 1000)
    dest = tmp_path / "out" / "file.gz"
    with pytest.raises(DataError, match="deleted") as err:
        paths.download_file(src.as_uri(), dest, "0" * 32)
    assert str(dest) in str(err.value)
    assert list((tmp_path / "out").iterdir()) == []  # nothing half-written left behind
    paths.download_file(src.as_uri(), dest, md5(src))
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["file.gz"]


def test_download_missing_idx_files(tmp_path, monkeypatch):
    small(monkeypatch, "mnist", 30)
    server = tmp_path / "server"
    out = write_idx(server)
    sums = {p.name: md5(p) for p in server.iterdir()}
    spec = dataclasses.replace(idx.SPECS["mnist"], base_url=server.as_uri() + "/", md5=sums)
    monkeypatch.setitem(idx.SPECS, "mnist", spec)
    root = tmp_path / "root"
    train = load_split("mnist", "train", root, download=True)
    np.testing.assert_array_equal(train.labels.numpy(), out["train"][1])
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]

    bad = dict(sums, **{"t10k-labels-idx1-ubyte.gz": "f" * 32})
    monkeypatch.setitem(idx.SPECS, "mnist", dataclasses.replace(spec, md5=bad))
    with pytest.raises(DataError, match="md5") as err:
        load_split("mnist", "test", root, download=True)
    assert str(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz") in str(err.value)
    assert not (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").exists()


def test_offline_download_failure_is_reported(tmp_path, monkeypatch):
    spec = dataclasses.replace(idx.SPECS["mnist"], base_url=(tmp_path / "nowhere").as_uri() + "/")
    monkeypatch.setitem(idx.SPECS, "mnist", spec)
    with pytest.raises(DataError, match="(?i)downloading .* failed") as err:
        load_split("mnist", "train", tmp_path / "root", download=True)
    assert str(tmp_path / "root" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz") in str(err.value)
    assert not list((tmp_path / "root").rglob("*.part"))


def test_local_mirror_is_used(tmp_path, monkeypatch, capsys):
    small(monkeypatch, "mnist", 30)
    out = write_idx(tmp_path / "source")
    mirror = tmp_path / "shared" / "data"
    mirror.mkdir(parents=True)
    (mirror / "materialize.py").write_text(
        textwrap.dedent(f"""
        import shutil, sys
        from pathlib import Path
        root, key = Path(sys.argv[1]), sys.argv[2]
        (root / "args.txt").write_text(" ".join(sys.argv[1:]))
        shutil.copytree({str(tmp_path / "source")!r}, root / "MNIST" / "raw")
    """)
    )
    monkeypatch.setenv(paths.MIRROR_VAR, str(mirror))  # named by the user
    root = tmp_path / "root"
    train = load_split("mnist", "train", root, download=False)
    np.testing.assert_array_equal(train.labels.numpy(), out["train"][1])
    assert (root / "args.txt").read_text() == f"{root} mnist"
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "local mirror" in printed[0] and str(mirror) in printed[0]


def test_mirror_is_only_the_named_one_and_data_root(tmp_path, monkeypatch):
    """A mirror folder is used only when $LONGTAIL_MIRROR names it; a wrong name is an error."""
    monkeypatch.delenv(paths.MIRROR_VAR, raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "materialize.py").write_text("raise SystemExit(1)\n")
    monkeypatch.chdir(tmp_path)
    assert paths.find_mirror() is None  # found on disk, never used
    monkeypatch.setenv(paths.MIRROR_VAR, str(tmp_path / "shared" / "data"))
    assert paths.find_mirror() == tmp_path / "shared" / "data"
    monkeypatch.setenv(paths.MIRROR_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"LONGTAIL_MIRROR=.*nowhere names no dataset mirror"):
        paths.find_mirror()
    monkeypatch.delenv(paths.MIRROR_VAR)
    monkeypatch.setenv("LONGTAIL_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_root(tmp_path / "cli") == tmp_path / "cli"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("LONGTAIL_DATA")
    assert resolve_data_root() == tmp_path / "xdg" / "longtail"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_root() == tmp_path / "home" / ".cache" / "longtail"
