"""MNIST (LeCun et al., 1998) and Fashion-MNIST (Xiao et al., 2017) from the official idx ``.gz`` files.

idx: big-endian uint32 magic (2051 images, 2049 labels), one big-endian uint32 per dim, then prod(dims) uint8.
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from longtail.core.errors import DataError
from longtail.data.paths import Remote, obtain

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
FILES: dict[str, tuple[str, str]] = {  # split -> (images stem, labels stem)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class IdxSpec:
    """Where one idx dataset lives on disk and on the web."""

    key: str
    title: str
    folder: str  # ROOT/<folder>/raw/
    base_url: str  # + "<stem>.gz"
    md5: dict[str, str] = field(hash=False)  # "<stem>.gz" -> md5 of the official file
    classes: tuple[str, ...] = ()
    train_size: int = 60_000
    image_size: int = 28


SPECS: dict[str, IdxSpec] = {
    "mnist": IdxSpec(
        key="mnist",
        title="MNIST",
        folder="MNIST",
        base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        classes=(
            "0 - zero",
            "1 - one",
            "2 - two",
            "3 - three",
            "4 - four",
            "5 - five",
            "6 - six",
            "7 - seven",
            "8 - eight",
            "9 - nine",
        ),
    ),
    "fashion-mnist": IdxSpec(
        key="fashion-mnist",
        title="Fashion-MNIST",
        folder="FashionMNIST",
        base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
}


def find_source(raw_dir: Path, stem: str) -> Path | None:
    """``<stem>.gz`` if present, else the decompressed ``<stem>`` (torchvision keeps both), else None."""
    for path in (raw_dir / f"{stem}.gz", raw_dir / stem):
        if path.is_file():
            return path
    return None


def read_idx(path: Path, magic: int, fix: str) -> np.ndarray:
    """Parse one idx file (gzip-compressed if it ends in ``.gz``) -> uint8 array of its dims."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{path} is truncated or corrupt ({type(err).__name__}: {err}). {fix}"
        ) from err
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        raise DataError(
            f"{path} is not an idx file of the expected kind: magic number {found}, "
            f"expected {magic}. {fix}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: its idx header is incomplete. {fix}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) != header + size:
        raise DataError(
            f"{path} holds {len(raw) - header} data bytes but its header {dims} says "
            f"{size}: it is truncated or corrupt. {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def load_idx_dataset(
    key: str, split: str, root: Path | str, download: bool = True
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load one official split -> (images uint8 [N, 1, 28, 28], labels int64 [N], class names [10])."""
    spec = SPECS[key]
    root = Path(root).expanduser()
    raw_dir = root / spec.folder / "raw"
    stems = FILES[split]
    remotes = [
        Remote(spec.base_url + f"{s}.gz", raw_dir / f"{s}.gz", spec.md5[f"{s}.gz"]) for s in stems
    ]
    obtain(
        key,
        root,
        ready=lambda: all(find_source(raw_dir, s) for s in stems),
        remotes=remotes,
        download=download,
        expected=" and ".join(str(r.path) for r in remotes),
        what=f"{spec.title} ({split} split)",
    )

    paths = [find_source(raw_dir, s) for s in stems]
    assert paths[0] is not None and paths[1] is not None
    fix = (
        f"Delete it and re-run: longtail re-creates it from the local mirror or re-downloads it "
        f"from {spec.base_url}."
    )
    images = read_idx(paths[0], IMAGES_MAGIC, fix)
    labels = read_idx(paths[1], LABELS_MAGIC, fix).astype(np.int64)
    side = spec.image_size
    if images.shape[1:] != (side, side):
        raise DataError(
            f"{paths[0]} holds images of size {images.shape[1:]}, expected ({side}, {side}) "
            f"for {spec.title}. {fix}"
        )
    if len(labels) != len(images):
        raise DataError(
            f"{paths[1]} has {len(labels)} labels but {paths[0]} has {len(images)} images: "
            f"one of them is from another dataset or split. {fix}"
        )
    if labels.size and labels.max() >= len(spec.classes):
        raise DataError(
            f"{paths[1]} has label {labels.max()}, expected 0..{len(spec.classes) - 1}. {fix}"
        )
    if split == "train" and len(images) != spec.train_size:
        # structurally valid, so a deliberately small copy (tests, subsets), as for CIFAR
        warnings.warn(
            f"{paths[0]} holds {len(images)} training images, not the official "
            f"{spec.train_size}: long-tailed subsets built from it differ from the "
            f"published ones.",
            stacklevel=2,
        )
    return images.reshape(-1, 1, side, side), labels, list(spec.classes)
