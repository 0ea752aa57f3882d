"""Image datasets listed by files: the ImageNet-LT / Places-LT / iNaturalist-2018 split files, class folders.

A split file has one ``relative/path label`` line per image (Liu et al., "Large-Scale Long-Tailed
Recognition in an Open World", CVPR 2019; the files of facebookresearch/classifier-balancing
``data/``); a folder dataset is ``root/<class>/<image>``. Listing needs no image; only
:func:`check_files` opens them (Pillow).
"""

from __future__ import annotations

import operator
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np
from PIL import Image

from longtail.core.errors import DataError
from longtail.core.metrics import shot_groups
from longtail.data.longtail import (
    check_imbalance,
    heldout_indices,
    img_num_per_cls,
    longtail_indices,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
FOLDER_PREFIX = "folder:"  # a dataset name "folder:PATH" is the class-folder tree at PATH
INAT_TOP = "train_val2018"  # iNaturalist-2018 paths: train_val2018/<kingdom>/<id>/<file>.jpg
_LABEL = re.compile(r"-?[0-9]+")
MAX_LABEL = 1_000_000  # a split file without a class count may not name a class beyond this
_DRIVE = re.compile(r"[A-Za-z]:")


# ------------------------------------------------------------------------------------ dataset specs
@dataclass(frozen=True)
class FileDatasetSpec:
    """A benchmark defined by split files: its class count and the file of each split.

    ``split_files`` maps ``train`` / ``val`` / ``test`` to a file name looked up in the split
    folder (two splits may name the same file: iNaturalist-2018 reports on val). With
    ``names_from_paths`` a class is named by the folders between a path's first component (the
    image split folder) and the file (ImageNet-LT: the WordNet id; Places-LT: the scene); otherwise
    ``class_<id>``. ``super_from_paths``: the ``<kingdom>`` of ``train_val2018/<kingdom>/<id>/...``
    is each class's super-category (iNaturalist's 14: Plantae, Insecta, Aves, ...).
    """

    name: str
    title: str
    num_classes: int
    split_files: Mapping[str, str]
    names_from_paths: bool = True
    super_from_paths: bool = False


FILE_DATASETS: dict[str, FileDatasetSpec] = {}


def register_file_dataset(spec: FileDatasetSpec) -> FileDatasetSpec:
    """Add ``spec`` to :data:`FILE_DATASETS` (ValueError if the name is taken)."""
    if spec.name in FILE_DATASETS:
        raise ValueError(f"file dataset {spec.name!r} is registered twice")
    FILE_DATASETS[spec.name] = spec
    return spec


register_file_dataset(
    FileDatasetSpec(
        "imagenet-lt",
        "ImageNet-LT",
        1000,
        {
            "train": "ImageNet_LT_train.txt",
            "val": "ImageNet_LT_val.txt",
            "test": "ImageNet_LT_test.txt",
        },
    )
)
register_file_dataset(
    FileDatasetSpec(
        "places-lt",
        "Places-LT",
        365,
        {"train": "Places_LT_train.txt", "val": "Places_LT_val.txt", "test": "Places_LT_test.txt"},
    )
)
register_file_dataset(
    FileDatasetSpec(
        "inat2018",
        "iNaturalist-2018",
        8142,
        {
            "train": "iNaturalist18_train.txt",
            "val": "iNaturalist18_val.txt",
            "test": "iNaturalist18_val.txt",  # the literature reports on the val set
        },
        names_from_paths=False,
        super_from_paths=True,
    )
)


def file_dataset_spec(name: str) -> FileDatasetSpec:
    """The spec of a registered split-file dataset; DataError listing the names otherwise."""
    key = str(name).strip().lower()
    if key not in FILE_DATASETS:
        raise DataError(
            f"Unknown file dataset {name!r}. Valid names: {', '.join(FILE_DATASETS)}, or "
            f"{FOLDER_PREFIX}PATH for a folder of class sub-folders."
        )
    return FILE_DATASETS[key]


def is_file_dataset(name: str) -> bool:
    """True for a registered split-file dataset name or ``folder:PATH``."""
    key = str(name).strip()
    return key.lower() in FILE_DATASETS or key.startswith(FOLDER_PREFIX)


# ------------------------------------------------------------------------------------ path storage
class PathList(Sequence[str]):
    """Relative paths packed in one UTF-8 byte array with offsets: ``paths[i]`` is a ``str``.

    No Python object per path: 437k iNaturalist paths are ~31 MB, shared by forked DataLoader
    workers without copy-on-read (reference counts are never touched) and pickled as two arrays
    for spawned ones.
    """

    __slots__ = ("_data", "_offsets")

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self._data = np.asarray(data, dtype=np.uint8)
        self._offsets = np.asarray(offsets, dtype=np.int64)

    @classmethod
    def from_strings(cls, paths: Iterable[str]) -> PathList:
        encoded = [str(p).encode("utf-8") for p in paths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> PathList: ...
    def __getitem__(self, i: int | slice) -> str | PathList:
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        n, k = len(self), operator.index(i)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"path {i} out of range for {n} paths")
        return self._data[self._offsets[k] : self._offsets[k + 1]].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        data, offsets = self._data.tobytes(), self._offsets.tolist()
        for a, b in zip(offsets[:-1], offsets[1:]):
            yield data[a:b].decode("utf-8")

    def take(self, positions: Sequence[int] | np.ndarray) -> PathList:
        """The paths at ``positions`` (int [K]) as a new PathList."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(pos) and (pos.max() >= len(self) or pos.min() < -len(self)):
            raise IndexError(f"positions out of range for {len(self)} paths")
        starts = self._offsets[:-1][pos]
        lengths = self._offsets[1:][pos] - starts
        offsets = np.zeros(len(pos) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return PathList(self._data[gather], offsets)

    def __repr__(self) -> str:
        return f"PathList({len(self)} paths)"


# ------------------------------------------------------------------------------------ the listing
@dataclass(eq=False)
class FileImageSet:
    """Images of one split as files: ``root / paths[i]`` has label ``labels[i]``.

    ``indices[i]`` is the image's position in the listing it came from (the i-th image line of
    the split file, or the i-th image of a folder scan), kept through :meth:`subset`.
    ``super_categories`` (iNaturalist's kingdoms) has one name per class, or is None.
    """

    root: Path
    paths: PathList
    labels: np.ndarray  # int64 [N]
    classes: list[str]
    indices: np.ndarray  # int64 [N]
    super_categories: list[str] | None = None
    source: str = ""  # the split file or folder the listing was read from, for messages

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not isinstance(self.paths, PathList):
            self.paths = PathList.from_strings(self.paths)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.indices = np.asarray(self.indices, dtype=np.int64).reshape(-1)
        if not len(self.paths) == len(self.labels) == len(self.indices):
            raise ValueError(
                f"paths, labels and indices differ in length: "
                f"{len(self.paths)}, {len(self.labels)}, {len(self.indices)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def file(self, i: int) -> Path:
        """The absolute path of image ``i``."""
        return self.root / self.paths[i]

    def class_counts(self) -> list[int]:
        """Images per class, length :attr:`num_classes`."""
        return np.bincount(self.labels, minlength=self.num_classes).tolist()

    def subset(self, positions: Sequence[int] | np.ndarray) -> FileImageSet:
        """The images at ``positions`` (int [K], into this set) -> a new FileImageSet of K images."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        return FileImageSet(
            root=self.root,
            paths=self.paths.take(pos),
            labels=self.labels[pos],
            classes=list(self.classes),
            indices=self.indices[pos],
            super_categories=None if self.super_categories is None else list(self.super_categories),
            source=self.source,
        )


@dataclass(eq=False)
class FileSplits:
    """train / val / test listings of one dataset; ``class_counts`` are train's."""

    name: str
    train: FileImageSet
    val: FileImageSet | None
    test: FileImageSet | None
    class_counts: list[int] = field(default_factory=list)


# ------------------------------------------------------------------------------------ split files
def _path_problem(rel: str) -> str | None:
    """Why a listed path would leave the image root (None if it stays inside)."""
    if rel.startswith(("/", "\\")) or _DRIVE.match(rel):
        return "is absolute"
    if ".." in re.split(r"[/\\]", rel):
        return "has a '..' component"
    return None


def read_split_file(
    path: Path | str, num_classes: int | None = None, dataset: str | None = None
) -> tuple[list[str], np.ndarray]:
    """Parse ``relative/path label`` lines -> (paths, int64 labels).

    The label is the last whitespace-separated field, so a path may hold spaces; blank lines are
    skipped. DataError naming the file (and the line, 1-based) for a missing or non-UTF-8 file, a
    line without a label, a non-integer label, a label outside ``0..num_classes-1``, a path that is
    absolute or has a ``..`` component, an empty file, and (``num_classes`` given) a file that does
    not list every class. ``num_classes=None``: the classes are ``0..max label``, all required.
    """
    path = Path(path)
    what = f"{dataset} " if dataset else ""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"Split file {path} not found. Give the folder that holds it (--split-dir), or "
            f"check the file name."
        ) from None
    except IsADirectoryError:
        raise DataError(f"Split file {path} is a folder; give the text file itself.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (byte {err.start}): is it a {what}split file "
            f"('relative/path label' lines)?"
        ) from None
    paths: list[str] = []
    labels: list[int] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        fields = line.strip().rsplit(None, 1)
        if not fields:
            continue
        where = f"{path}, line {lineno}"
        if len(fields) != 2:
            raise DataError(
                f"{where}: {line.strip()[:80]!r} is not 'relative/path label' (a path, whitespace "
                f"and an integer class label). Fix or remove the line."
            )
        rel, token = fields
        if not _LABEL.fullmatch(token):
            raise DataError(
                f"{where}: the label {token[:40]!r} is not an integer. Each line is "
                f"'relative/path label' with a class id 0, 1, 2, ... last."
            )
        label = int(token)
        if label < 0:
            raise DataError(f"{where}: label {label} is negative; class labels are 0, 1, 2, ...")
        if num_classes is None and label >= MAX_LABEL:
            raise DataError(
                f"{where}: label {label} is implausibly large (labels are class ids 0, 1, 2, "
                f"... below {MAX_LABEL}). Is the last field of this line a class id?"
            )
        if num_classes is not None and label >= num_classes:
            raise DataError(
                f"{where}: label {label} is out of range: {dataset or 'the dataset'} has "
                f"{num_classes} classes, labels 0..{num_classes - 1}. Is this the split file of "
                f"another dataset?"
            )
        problem = _path_problem(rel)
        if problem:
            raise DataError(
                f"{where}: the path {rel[:120]!r} {problem}; listed paths must stay inside the "
                f"image root (relative, without '..'). Use paths relative to --data-root."
            )
        paths.append(rel)
        labels.append(label)
    if not paths:
        raise DataError(
            f"{path} is empty: no 'relative/path label' line. Use the published {what}split file "
            f"(it may have been truncated when copied)."
        )
    arr = np.asarray(labels, dtype=np.int64)
    expected = num_classes if num_classes is not None else int(arr.max()) + 1
    present = np.bincount(arr, minlength=expected)
    if (present == 0).any():
        missing = np.flatnonzero(present == 0)
        shown = ", ".join(str(int(c)) for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
        has = (
            f"{dataset or 'the dataset'} has {expected}"
            if num_classes is not None
            else f"its labels run 0..{expected - 1}"
        )
        fix = (
            f"Use the published {dataset} split file (it lists every class)."
            if dataset
            else "Give every class from 0 to the largest label at least one image."
        )
        raise DataError(
            f"{path} lists images of {expected - len(missing)} classes, but {has}: no line has "
            f"label {shown}. {fix}"
        )
    return paths, arr


def _names_from_paths(paths: Sequence[str], labels: np.ndarray, num_classes: int, skip: int):
    """Class names from the folders of the paths (the first ``skip`` components dropped): each
    class one name, all distinct; else None."""
    names: list[str | None] = [None] * num_classes
    for rel, label in zip(paths, labels.tolist()):
        parts = rel.replace("\\", "/").split("/")
        name = "/".join(parts[skip:-1])
        if not name:
            return None
        known = names[label]
        if known is None:
            names[label] = name
        elif known != name:
            return None
    if any(n is None for n in names) or len(set(names)) != num_classes:
        return None
    return [str(n) for n in names]


def _kingdoms(paths: Sequence[str], labels: np.ndarray, num_classes: int):
    """The ``train_val2018/<kingdom>/<id>/<file>`` kingdom of every class, or None when a path has
    another layout or a class sits under two kingdoms."""
    out: list[str | None] = [None] * num_classes
    for rel, label in zip(paths, labels.tolist()):
        parts = rel.split("/")
        if len(parts) != 4 or parts[0] != INAT_TOP or not parts[1]:
            return None
        if out[label] is None:
            out[label] = parts[1]
        elif out[label] != parts[1]:
            return None
    return None if any(k is None for k in out) else [str(k) for k in out]


def split_file_path(name: str, split: str, split_dir: Path | str) -> Path:
    """Where the ``split`` file of dataset ``name`` is expected: ``split_dir / <its file name>``."""
    spec = file_dataset_spec(name)
    if split not in spec.split_files:
        raise DataError(
            f"{spec.title} has no split {split!r}; use one of {', '.join(spec.split_files)}."
        )
    return Path(split_dir).expanduser() / spec.split_files[split]


def load_file_split(
    name: str, split: str, root: Path | str, split_dir: Path | str | None = None
) -> FileImageSet:
    """One split of a registered dataset (``imagenet-lt``, ``places-lt``, ``inat2018``).

    Reads ``split_dir / spec.split_files[split]`` (``split_dir`` defaults to ``root``, the image
    root the listed paths are relative to); no image is opened. ``indices`` = arange(N).
    """
    spec = file_dataset_spec(name)
    root = Path(root).expanduser()
    path = split_file_path(spec.name, split, root if split_dir is None else split_dir)
    if not path.is_file():
        raise DataError(
            f"The {split} split of {spec.title} is the file {path.name}, not found in "
            f"{path.parent}. Put the published file there (facebookresearch/classifier-balancing, "
            f"data/) or give the folder that holds it with --split-dir."
        )
    paths, labels = read_split_file(path, spec.num_classes, spec.name)
    names = _names_from_paths(paths, labels, spec.num_classes, 1) if spec.names_from_paths else None
    return FileImageSet(
        root=root,
        paths=PathList.from_strings(paths),
        labels=labels,
        classes=names or [f"class_{c}" for c in range(spec.num_classes)],
        indices=np.arange(len(labels), dtype=np.int64),
        super_categories=_kingdoms(paths, labels, spec.num_classes)
        if spec.super_from_paths
        else None,
        source=str(path),
    )


def load_file_splits(
    name: str, root: Path | str, split_dir: Path | str | None = None
) -> FileSplits:
    """train / val / test of a registered dataset (a file named by two splits is read once, so
    iNaturalist-2018's val and test are the same object)."""
    spec = file_dataset_spec(name)
    by_file: dict[str, FileImageSet] = {}
    sets: dict[str, FileImageSet] = {}
    for split in SPLITS:
        fname = spec.split_files[split]
        if fname not in by_file:
            by_file[fname] = load_file_split(spec.name, split, root, split_dir)
        sets[split] = by_file[fname]
    return FileSplits(
        spec.name, sets["train"], sets["val"], sets["test"], sets["train"].class_counts()
    )


# ------------------------------------------------------------------------------------ folders
def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _images_below(folder: Path, prefix: str) -> list[str]:
    """Relative paths (``prefix/...``) of the images anywhere below ``folder``, sorted. Symlinks
    are followed (a folder reached twice, e.g. through a link loop, is read once); hidden entries
    are skipped; a dangling link with an image name is listed (``check_files`` reports it)."""
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    stack = [(folder, prefix)]
    while stack:
        here, rel = stack.pop()
        info = os.stat(here)
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        with os.scandir(here) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=True):
                    stack.append((Path(entry.path), f"{rel}/{entry.name}"))
                elif _is_image(entry.name) and (
                    entry.is_file(follow_symlinks=True) or entry.is_symlink()
                ):
                    found.append(f"{rel}/{entry.name}")
    return sorted(found)


def _folder_root(root: Path | str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"Folder dataset {root} not found (or not a folder). Give a folder holding one "
            f"sub-folder of images per class: {root}/<class>/<image>."
        )
    return root


def scan_folder(root: Path | str) -> FileImageSet:
    """``root/<class>/<image>``: classes are the sorted sub-folder names, label = position.

    Images (:data:`IMAGE_EXTENSIONS`, any case) anywhere below a class folder belong to it, sorted
    by path; hidden files and folders (``.name``) are skipped, symlinks followed. DataError if
    ``root`` has no class folder or a class folder holds no image.
    """
    root = _folder_root(root)
    with os.scandir(root) as entries:
        classes = sorted(
            e.name for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=True)
        )
    if not classes:
        raise DataError(
            f"{root} has no class sub-folder. A folder dataset is {root}/<class>/<image>, one "
            f"sub-folder per class (or give a split file with --split-file)."
        )
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = _images_below(root / name, name)
        if not found:
            raise DataError(
                f"Class folder {root / name} holds no image ({', '.join(IMAGE_EXTENSIONS)}). "
                f"Put its images there or remove the folder (every sub-folder is a class)."
            )
        paths += found
        labels += [label] * len(found)
    return FileImageSet(
        root=root,
        paths=PathList.from_strings(paths),
        labels=np.asarray(labels, dtype=np.int64),
        classes=classes,
        indices=np.arange(len(paths), dtype=np.int64),
        source=str(root),
    )


def read_folder_split(
    root: Path | str, split_file: Path | str, num_classes: int | None = None
) -> FileImageSet:
    """A folder dataset listed by a split file instead of a scan (paths relative to ``root``).

    Classes are ``0..num_classes-1`` (default: up to the largest label), each with an image in the
    file; names come from the paths' folders (``<class>/<image>`` -> ``<class>``) when every class
    has one distinct folder, else ``class_<id>``.
    """
    root = _folder_root(root)
    paths, labels = read_split_file(split_file, num_classes)
    count = int(labels.max()) + 1 if num_classes is None else num_classes
    names = _names_from_paths(paths, labels, count, 0)
    return FileImageSet(
        root=root,
        paths=PathList.from_strings(paths),
        labels=labels,
        classes=names or [f"class_{c}" for c in range(count)],
        indices=np.arange(len(labels), dtype=np.int64),
        source=str(split_file),
    )


def heldout_split(
    data: FileImageSet, per_class: int, seed: int = 1
) -> tuple[FileImageSet, FileImageSet]:
    """(rest, val): ``per_class`` images of every class drawn into val with ``seed``
    (:func:`longtail.data.longtail.heldout_indices`), the others kept in order.

    DataError naming the class when one has ``per_class`` images or fewer (none would be left to
    train on)."""
    if not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise DataError(f"val_per_class is {per_class!r}, but it must be an integer >= 1.")
    counts = data.class_counts()
    short = [c for c, n in enumerate(counts) if n <= per_class]
    if short:
        c = short[0]
        raise DataError(
            f"Class {data.classes[c]!r} ({data.source}) has {counts[c]} images, so "
            f"{per_class} validation images per class would leave none to train on"
            f"{f' ({len(short)} classes are that small)' if len(short) > 1 else ''}. Lower "
            f"val_per_class below {min(counts[k] for k in short)} or give a val split file."
        )
    val_pos = np.sort(heldout_indices(data.labels, np.zeros(0, np.int64), per_class, seed))
    keep = np.ones(len(data), dtype=bool)
    keep[val_pos] = False
    return data.subset(np.flatnonzero(keep)), data.subset(val_pos)


def longtail_subset(
    data: FileImageSet,
    imbalance_factor: float,
    profile: str = "exp",
    seed: int = 0,
    n_max: int | None = None,
) -> FileImageSet:
    """The CIFAR-LT construction on a listing: ``img_num_per_cls(n_max, C, IF, profile)`` images
    of class c (class 0 the largest), picked by :func:`longtail_indices` with ``seed``.
    ``n_max`` defaults to the smallest class's count, so every class can supply its share."""
    check_imbalance(imbalance_factor, profile)
    counts = data.class_counts()
    top = min(counts) if n_max is None else int(n_max)
    wanted = img_num_per_cls(top, data.num_classes, imbalance_factor, profile)
    return data.subset(longtail_indices(data.labels, wanted, seed))


def folder_splits(
    root: Path | str,
    *,
    split_file: Path | str | None = None,
    val_file: Path | str | None = None,
    test_root: Path | str | None = None,
    val_per_class: int = 20,
    seed: int = 0,
    imbalance_factor: float | None = None,
    profile: str = "exp",
) -> FileSplits:
    """train / val / test of a folder dataset.

    train: the scan of ``root`` (or ``split_file``). val: ``val_file`` if given, else
    ``val_per_class`` images per class taken out of train with seed ``seed + 1`` (0: no val).
    ``imbalance_factor``: train is then the long-tailed subset (seed ``seed``) of the images left
    after val. test: the scan of ``test_root`` (same class folders as ``root``), else None.
    """
    train = scan_folder(root) if split_file is None else read_folder_split(root, split_file)
    val: FileImageSet | None = None
    if val_file is not None:
        val = read_folder_split(root, val_file, train.num_classes)
        val.classes = list(train.classes)
    elif val_per_class:
        train, val = heldout_split(train, val_per_class, seed + 1)
    if imbalance_factor is not None:
        train = longtail_subset(train, imbalance_factor, profile, seed)
    test = None
    if test_root is not None:
        test = scan_folder(test_root)
        if test.classes != train.classes:
            raise DataError(
                f"The class folders of {test.root} ({test.num_classes}) differ from those of "
                f"{train.root} ({train.num_classes}); the test tree needs the same class names."
            )
    return FileSplits(f"{FOLDER_PREFIX}{Path(root)}", train, val, test, train.class_counts())


# ------------------------------------------------------------------------------------ statistics
def listing_stats(data: FileImageSet) -> dict:
    """Class statistics of a listing (no image opened): ``num_classes``, ``counts``, ``total``,
    ``max``, ``min``, ``imbalance_factor``, ``groups`` (many > 100, medium 20-100, few < 20) and,
    when known, ``super_categories`` ({name: {"classes", "images"}})."""
    counts = data.class_counts()
    smallest = min(counts) if counts else 0
    out: dict = {
        "num_classes": data.num_classes,
        "counts": counts,
        "total": int(sum(counts)),
        "max": max(counts) if counts else 0,
        "min": smallest,
        "imbalance_factor": max(counts) / smallest if smallest > 0 else float("inf"),
        "groups": shot_groups(counts),
        "classes": list(data.classes),
    }
    if data.super_categories is not None:
        supers: dict[str, dict[str, int]] = {}
        for name, n in zip(data.super_categories, counts):
            entry = supers.setdefault(name, {"classes": 0, "images": 0})
            entry["classes"] += 1
            entry["images"] += int(n)
        out["super_categories"] = dict(sorted(supers.items()))
    return out


# ------------------------------------------------------------------------------------ checking
@dataclass
class CheckReport:
    """What :func:`check_files` found: counts, and the first problems in listing order."""

    listed: int
    missing: int
    corrupt: int
    first_missing: list[str]  # absolute paths
    first_corrupt: list[tuple[str, str]]  # (absolute path, what Pillow said)

    @property
    def ok(self) -> int:
        return self.listed - self.missing - self.corrupt

    @property
    def passed(self) -> bool:
        return self.missing == 0 and self.corrupt == 0


_OK, _MISSING, _CORRUPT = 0, 1, 2
_CHUNK = 64


def check_image(path: Path, decode: bool = True) -> tuple[int, str]:
    """(0, "") if ``path`` is a readable image, (1, why) if it is missing, (2, why) if not.

    ``decode``: a full decode (JPEG at 1/8 scale: every byte is still entropy-decoded, so a
    truncated file fails); else Pillow's ``verify()`` (header and PNG checksums only: it passes a
    truncated JPEG)."""
    try:
        with Image.open(path) as im:
            if not decode:
                im.verify()
                return _OK, ""
            if im.format == "JPEG":
                im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except (FileNotFoundError, NotADirectoryError):
        return _MISSING, "not found"
    except IsADirectoryError:
        return _CORRUPT, "is a folder"
    except PermissionError:
        return _CORRUPT, "cannot be read (permission denied)"
    except Exception as err:  # Pillow raises many types on bad data; each is a corrupt file here
        return _CORRUPT, f"{type(err).__name__}: {err}"
    return _OK, ""


def check_files(
    data: FileImageSet,
    *,
    workers: int | None = None,
    decode: bool = True,
    report: int = 10,
    progress: Callable[[int], None] | None = None,
) -> CheckReport:
    """Open every image of ``data`` (:func:`check_image`) on ``workers`` threads (default
    ``min(8, cores)``; Pillow decodes without the GIL), at most ``2 * workers`` chunks of 64 in
    flight. ``progress(k)`` is called after each chunk with its size. Problems are reported in
    listing order, the first ``report`` of each kind."""
    workers = max(1, workers if workers is not None else min(8, os.cpu_count() or 1))
    n = len(data)
    status = np.zeros(n, dtype=np.int8)
    reasons: dict[int, str] = {}
    lock = threading.Lock()

    def run(start: int) -> int:
        stop = min(start + _CHUNK, n)
        for i in range(start, stop):
            code, why = check_image(data.file(i), decode)
            status[i] = code
            if code == _CORRUPT:
                with lock:
                    reasons[i] = why
                    if len(reasons) > 4 * report + _CHUNK * workers:  # keep the earliest only
                        for k in sorted(reasons)[report:]:
                            del reasons[k]
        return stop - start

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: set[Future[int]] = set()
        for start in range(0, n, _CHUNK):
            if len(pending) >= 2 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    size = fut.result()
                    if progress is not None:
                        progress(size)
            pending.add(pool.submit(run, start))
        for fut in pending:
            size = fut.result()
            if progress is not None:
                progress(size)
    missing = np.flatnonzero(status == _MISSING)
    corrupt = np.flatnonzero(status == _CORRUPT)
    return CheckReport(
        listed=n,
        missing=len(missing),
        corrupt=len(corrupt),
        first_missing=[str(data.file(int(i))) for i in missing[:report]],
        first_corrupt=[(str(data.file(int(i))), reasons[int(i)]) for i in corrupt[:report]],
    )


__all__ = [
    "FILE_DATASETS",
    "FOLDER_PREFIX",
    "IMAGE_EXTENSIONS",
    "CheckReport",
    "FileDatasetSpec",
    "FileImageSet",
    "FileSplits",
    "PathList",
    "check_files",
    "check_image",
    "file_dataset_spec",
    "folder_splits",
    "heldout_split",
    "is_file_dataset",
    "listing_stats",
    "load_file_split",
    "load_file_splits",
    "longtail_subset",
    "read_folder_split",
    "read_split_file",
    "register_file_dataset",
    "scan_folder",
    "split_file_path",
]
