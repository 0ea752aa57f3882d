"""CIFAR-10 / CIFAR-100 (Krizhevsky, 2009) from the official pickled "python version" archives.

``b'data'`` uint8 [n, 3072] is channel-planar (1024 R, 1024 G, 1024 B): images = data.reshape(n, 3, 32, 32).
"""

from __future__ import annotations

import codecs
import os
import pickle
import shutil
import tarfile
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np

from longtail.core.errors import DataError
from longtail.data.paths import Remote, check_md5, obtain


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant lives on disk and on the web, and what its files contain."""

    key: str  # "cifar10" | "cifar100"
    title: str  # for messages
    folder: str  # extracted folder under ROOT
    archive: str  # archive file name under ROOT
    archive_md5: str
    url: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    train_size: int


SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        key="cifar10",
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
        train_size=50_000,
    ),
    "cifar100": CifarSpec(
        key="cifar100",
        title="CIFAR-100",
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        num_classes=100,
        train_size=50_000,
    ),
}


# ------------------------------------------------------------------------------ restricted pickle
class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list; nothing was called."""

    def __init__(self, qualname: str):
        super().__init__(f"global '{qualname}' is not allowed")
        self.qualname = qualname


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle needs: numpy array reconstruction and a few data builtins."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 1.26
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    for module in ("__builtin__", "builtins"):
        for name, obj in (("bytearray", bytearray), ("set", set), ("frozenset", frozenset)):
            allowed[(module, name)] = obj
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only resolves the allow-listed globals."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _allowed_globals()
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(f"{module}.{name}") from None


def load_pickle(path: Path, fix: str) -> Any:
    """Unpickle a (Python-2) CIFAR file with ``encoding='bytes'`` through :class:`RestrictedUnpickler`."""
    try:
        with open(path, "rb") as handle:
            return RestrictedUnpickler(handle, encoding="bytes").load()
    except ForbiddenGlobal as err:
        raise DataError(
            f"{path} was refused: it references {err.qualname}, which a CIFAR file never "
            f"does, so it is not the official file (and was not loaded). {fix}"
        ) from None
    except Exception as err:  # any failure to parse the bytes means a truncated or corrupt file
        raise DataError(
            f"{path} is truncated or corrupt ({type(err).__name__}: {err}). {fix}"
        ) from err


# ---------------------------------------------------------------------------------- file reading
def _as_bytes_keys(obj: dict) -> dict:
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def read_batch(path: Path, spec: CifarSpec, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (data uint8 [n, 3072], labels int64 [n]), validated by structure."""
    obj = load_pickle(path, fix)

    def bad(problem: str) -> DataError:
        return DataError(f"{path} is not a valid {spec.title} batch: {problem}. {fix}")

    if not isinstance(obj, dict):
        raise bad(f"it holds a {type(obj).__name__}, not a dict")
    batch = _as_bytes_keys(obj)
    for key in (b"data", spec.label_key):
        if key not in batch:
            raise bad(f"the key {key!r} is missing (keys: {sorted(map(repr, batch))})")
    data = batch[b"data"]
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3072
    ):
        shape = getattr(data, "shape", None)
        raise bad(
            f"b'data' is {type(data).__name__} {getattr(data, 'dtype', '')} of shape {shape}, "
            f"expected uint8 [n, 3072]"
        )
    try:
        labels = np.asarray(batch[spec.label_key], dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise bad(f"{spec.label_key!r} is not a list of integers ({err})") from None
    if labels.shape != (data.shape[0],):
        raise bad(
            f"{spec.label_key!r} has shape {labels.shape}, expected ({data.shape[0]},) like b'data'"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise bad(
            f"labels range over {labels.min()}..{labels.max()}, expected 0..{spec.num_classes - 1}"
        )
    return data, labels


def read_class_names(path: Path, spec: CifarSpec, fix: str) -> list[str]:
    """The meta file's class names (``b'label_names'`` / ``b'fine_label_names'``), length C."""
    obj = load_pickle(path, fix)
    names = _as_bytes_keys(obj).get(spec.names_key) if isinstance(obj, dict) else None
    if not isinstance(names, list) or len(names) != spec.num_classes:
        raise DataError(
            f"{path} is not a valid {spec.title} meta file: it needs {spec.names_key!r} "
            f"with {spec.num_classes} class names. {fix}"
        )
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


# ------------------------------------------------------------------------------------- archive
def _write_atomic(dest: Path, src: IO[bytes]) -> None:
    """Copy ``src`` to ``dest`` via a temp file in the same folder and a rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp_name, dest)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def extract_archive(archive: Path, root: Path, spec: CifarSpec) -> None:
    """md5-check the official archive, then extract its data files into ``root/spec.folder``.

    Only regular files named ``<folder>/<data file>`` are written (no links, no paths outside).
    """
    fix = f"Delete it and re-run to download it again, or place the official archive ({spec.url}) there."
    check_md5(archive, spec.archive_md5, fix)
    wanted = set(spec.train_files + spec.test_files + (spec.meta_file,))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if (
                    member.isfile()
                    and len(parts) == 2
                    and parts[0] == spec.folder
                    and parts[1] in wanted
                ):
                    src = tar.extractfile(member)
                    assert src is not None
                    _write_atomic(root / spec.folder / parts[1], src)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise DataError(
            f"{archive} could not be extracted ({type(err).__name__}: {err}): it is "
            f"truncated or corrupt. {fix}"
        ) from err


# ---------------------------------------------------------------------------------------- loading
def load_cifar(
    key: str, split: str, root: Path | str, download: bool = True
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load one official split -> (images uint8 [N, 3, 32, 32], labels int64 [N], class names [C]).

    Uses ``ROOT/<folder>/`` if complete, else extracts ``ROOT/<archive>`` (md5-checked), else gets the
    archive from the local mirror (CIFAR-10 only) or the official URL.
    """
    spec = SPECS[key]
    root = Path(root).expanduser()
    folder, archive = root / spec.folder, root / spec.archive
    files = spec.train_files if split == "train" else spec.test_files
    needed = [folder / name for name in files + (spec.meta_file,)]

    def present() -> bool:
        return all(p.is_file() for p in needed)

    if not present():
        obtain(
            key,
            root,
            ready=lambda: present() or archive.is_file(),
            remotes=[Remote(spec.url, archive, spec.archive_md5)],
            download=download,
            expected=f"{archive} (or the extracted folder {folder}/)",
            what=f"{spec.title} ({split} split)",
        )
        if not present():
            extract_archive(archive, root, spec)
        if not present():
            missing = ", ".join(p.name for p in needed if not p.is_file())
            raise DataError(
                f"{archive} does not contain {missing} under {spec.folder}/: it is not the "
                f"official {spec.title} archive. Delete it and re-run to download it again."
            )

    fix = (
        f"Delete it and re-run: longtail re-extracts it from {archive} if that is present, "
        f"else re-downloads the archive ({spec.url})."
    )
    batches = [read_batch(folder / name, spec, fix) for name in files]
    data = np.concatenate([b[0] for b in batches]) if len(batches) > 1 else batches[0][0]
    labels = np.concatenate([b[1] for b in batches])
    if split == "train" and len(labels) != spec.train_size:
        # Structure is valid (each batch parsed, shapes and labels consistent), so this is a
        # deliberately small copy (tests, subsets); it cannot give the published LT subset.
        warnings.warn(
            f"{folder} holds {len(labels)} training images, not the official "
            f"{spec.train_size}: long-tailed subsets built from it differ from the "
            f"published ones.",
            stacklevel=2,
        )
    if not (data.flags.c_contiguous and data.flags.writeable):
        data = np.ascontiguousarray(data).copy()
    classes = read_class_names(folder / spec.meta_file, spec, fix)
    return data.reshape(-1, 3, 32, 32), labels, classes
