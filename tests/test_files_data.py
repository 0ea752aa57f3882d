"""File datasets (longtail.data.files): the published split files' statistics, image trees in the
ImageNet-LT / Places-LT / iNaturalist-2018 / class-folder layouts, bad split files, data check."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from longtail.cli import main
from longtail.core.errors import DataError
from longtail.data import files
from longtail.data.files import (
    FILE_DATASETS,
    FileImageSet,
    PathList,
    check_files,
    folder_splits,
    heldout_split,
    listing_stats,
    load_file_split,
    load_file_splits,
    longtail_subset,
    read_folder_split,
    read_split_file,
    scan_folder,
)
from longtail.data.longtail import img_num_per_cls

SPLITS = Path(__file__).resolve().parents[2] / "shared" / "data" / "splits"
needs_splits = pytest.mark.skipif(
    not (SPLITS / "Places_LT_train.txt").is_file(), reason=f"no published split files in {SPLITS}"
)


# --------------------------------------------------------------------------- the published files
# (dataset, split, lines, classes, max, min, many / medium / few classes): the README table there
PUBLISHED = [
    ("places-lt", "train", 62500, 365, 4980, 5, (131, 163, 71)),
    ("places-lt", "val", 7300, 365, 20, 20, (0, 365, 0)),
    ("places-lt", "test", 36500, 365, 100, 100, (0, 365, 0)),
    ("imagenet-lt", "val", 20000, 1000, 20, 20, (0, 1000, 0)),
    ("imagenet-lt", "test", 50000, 1000, 50, 50, (0, 1000, 0)),
    ("inat2018", "val", 24426, 8142, 3, 3, (0, 0, 8142)),
    ("inat2018", "test", 24426, 8142, 3, 3, (0, 0, 8142)),  # reported on val
]


@needs_splits
@pytest.mark.parametrize("name,split,total,classes,top,bottom,groups", PUBLISHED)
def test_published_split_statistics(capsys, name, split, total, classes, top, bottom, groups):
    argv = ["data", "stats", name, "--split-dir", str(SPLITS), "--split", split, "--json"]
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["total"], s["num_classes"], s["max"], s["min"]) == (total, classes, top, bottom)
    assert tuple(len(s["groups"][g]) for g in ("many", "medium", "few")) == groups
    assert sum(s["counts"]) == total and len(s["classes"]) == classes


@needs_splits
def test_places_lt_train_stats_text_and_names(capsys):
    assert main(["data", "stats", "places-lt", "--split-dir", str(SPLITS)]) == 0
    out = capsys.readouterr().out
    assert "62500 images, 365 classes, max 4980, min 5" in out
    assert "131 / 163 / 71 classes" in out
    train = load_file_split("places-lt", "train", "/images", SPLITS)
    assert train.classes[0] == "airfield" and train.paths[0] == "train/airfield/00004851.jpg"
    assert train.file(0) == Path("/images/train/airfield/00004851.jpg")
    test = load_file_split("places-lt", "test", "/images", SPLITS)
    assert test.classes == train.classes  # named from val/<scene>/... the same way


@needs_splits
def test_published_names_and_inaturalist_super_categories():
    imagenet = load_file_split("imagenet-lt", "test", SPLITS)
    assert imagenet.classes[:2] == ["n01440764", "n01443537"] and len(set(imagenet.classes)) == 1000
    inat = load_file_split("inat2018", "val", SPLITS)
    assert inat.classes[7291] == "class_7291"
    assert inat.super_categories is not None and len(set(inat.super_categories)) == 14
    assert inat.super_categories[7291] == "Plantae"  # train_val2018/Plantae/7291/...
    supers = listing_stats(inat)["super_categories"]
    assert sum(e["classes"] for e in supers.values()) == 8142
    assert sum(e["images"] for e in supers.values()) == 24426


# --------------------------------------------------------------------------- image trees
def _colour(label: int) -> tuple[int, int, int]:
    return (label % 16) * 16 + 8, (label // 16 % 16) * 16 + 8, (label // 256) * 16 + 8


def _label_of(path: Path) -> int:
    with Image.open(path) as im:
        r, g, b = (int(v) for v in np.asarray(im.convert("RGB"), dtype=np.float64).mean((0, 1)))
    return (r // 16) + 16 * (g // 16) + 256 * (b // 16)


def _image_bytes(label: int, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), _colour(label)).save(buf, fmt, quality=95)
    return buf.getvalue()


def _write_tree(root: Path, lines: list[tuple[str, int]], split_file: Path | None = None):
    """Images at root/<path> whose colour encodes their label; the split file if asked."""
    cache: dict[tuple[int, str], bytes] = {}
    for rel, label in lines:
        fmt = "PNG" if rel.lower().endswith(".png") else "JPEG"
        data = cache.setdefault((label, fmt), _image_bytes(label, fmt))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    if split_file is not None:
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text("".join(f"{rel} {label}\n" for rel, label in lines))


def _labels_decode_to(data: FileImageSet) -> list[int]:
    return [_label_of(data.file(i)) for i in range(len(data))]


@pytest.fixture
def small_specs(monkeypatch):
    """imagenet-lt with 4 classes and inat2018 with 5: the published file names and layouts."""
    monkeypatch.setitem(
        FILE_DATASETS,
        "imagenet-lt",
        dataclasses.replace(FILE_DATASETS["imagenet-lt"], num_classes=4),
    )
    monkeypatch.setitem(
        FILE_DATASETS, "inat2018", dataclasses.replace(FILE_DATASETS["inat2018"], num_classes=5)
    )


def test_places_lt_layout_loads_with_the_published_spec(tmp_path):
    root, split_dir = tmp_path / "places", tmp_path / "splits"
    train = [
        (f"train/scene_{c:03d}/{k:08d}.jpg", c) for c in range(365) for k in range(1 + (c < 3))
    ]
    val = [(f"train/scene_{c:03d}/{100 + c:08d}.jpg", c) for c in range(365)]
    test = [(f"val/scene_{c:03d}/Places365_val_{c:08d}.jpg", c) for c in range(365)]
    _write_tree(root, train, split_dir / "Places_LT_train.txt")
    _write_tree(root, val, split_dir / "Places_LT_val.txt")
    _write_tree(root, test, split_dir / "Places_LT_test.txt")
    data = load_file_splits("places-lt", root, split_dir)
    assert len(data.train) == 368 and data.class_counts[:4] == [2, 2, 2, 1]
    assert data.train.classes[3] == "scene_003" and data.test.classes == data.train.classes
    for part in (data.train, data.val, data.test):
        assert _labels_decode_to(part) == part.labels.tolist()
    assert data.test.paths[5] == "val/scene_005/Places365_val_00000005.jpg"


def test_imagenet_lt_layout_with_split_files_elsewhere(tmp_path, small_specs):
    root, split_dir = tmp_path / "imagenet", tmp_path / "splits"
    wnids = ["n01440764", "n01443537", "n01484850", "n01491361"]
    counts = [5, 3, 2, 1]
    train = [
        (f"train/{wnids[c]}/{wnids[c]}_{k}.JPEG", c) for c in range(4) for k in range(counts[c])
    ]
    val = [(f"train/{wnids[c]}/{wnids[c]}_{90 + k}.JPEG", c) for c in range(4) for k in range(2)]
    test = [(f"val/{w}/ILSVRC2012_val_{c:08d}.JPEG", c) for c, w in enumerate(wnids)]
    _write_tree(root, train, split_dir / "ImageNet_LT_train.txt")
    _write_tree(root, val, split_dir / "ImageNet_LT_val.txt")
    _write_tree(root, test, split_dir / "ImageNet_LT_test.txt")
    data = load_file_splits("imagenet-lt", root, split_dir)
    assert data.class_counts == counts and data.train.classes == wnids
    assert len(data.val) == 8 and len(data.test) == 4
    for part in (data.train, data.val, data.test):
        assert _labels_decode_to(part) == part.labels.tolist()
    # split_dir defaults to the image root
    with pytest.raises(DataError, match="ImageNet_LT_train.txt, not found in .*imagenet"):
        load_file_split("imagenet-lt", "train", root)


def test_inaturalist_layout_records_kingdoms(tmp_path, small_specs):
    root = tmp_path / "inat"
    kingdoms = ["Plantae", "Insecta", "Plantae", "Aves", "Fungi"]
    train = [
        (f"train_val2018/{kingdoms[c]}/{c}/{c:02d}{k:030d}.jpg", c)
        for c in range(5)
        for k in range(6 - c)
    ]
    val = [(f"train_val2018/{kingdoms[c]}/{c}/v{c:031d}.jpg", c) for c in (4, 2, 0, 1, 3)]
    _write_tree(root, train, root / "iNaturalist18_train.txt")
    _write_tree(root, val, root / "iNaturalist18_val.txt")
    data = load_file_splits("inat2018", root)
    assert data.class_counts == [6, 5, 4, 3, 2]
    assert data.train.classes == [f"class_{c}" for c in range(5)]
    assert data.train.super_categories == kingdoms and data.val.super_categories == kingdoms
    assert data.test is data.val  # the literature reports on val
    assert data.val.labels.tolist() == [4, 2, 0, 1, 3]
    assert _labels_decode_to(data.val) == [4, 2, 0, 1, 3]
    assert _labels_decode_to(data.train) == data.train.labels.tolist()
    # another layout: no super-categories, but the listing still loads
    (root / "iNaturalist18_val.txt").write_text("".join(f"x/{c}.jpg {c}\n" for c in range(5)))
    assert load_file_split("inat2018", "val", root).super_categories is None


# --------------------------------------------------------------------------- bad split files
BAD = [
    ("train/a.jpg 0\ntrain/b.jpg 1\ntrain/c.jpg\n", "line 3", "is not 'relative/path label'"),
    ("train/a.jpg 0\ntrain/b.jpg one\n", "line 2", "'one' is not an integer"),
    ("train/a.jpg 0\ntrain/b.jpg 1.5\n", "line 2", "'1.5' is not an integer"),
    (
        "train/a.jpg 0\n\ntrain/b.jpg 365\n",
        "line 3",
        "label 365 is out of range: places-lt has 365",
    ),
    ("train/a.jpg -1\n", "line 1", "label -1 is negative"),
    ("train/a.jpg 0\n/etc/passwd 1\n", "line 2", "'/etc/passwd' is absolute"),
    ("train/a.jpg 0\ntrain/../../x.jpg 1\n", "line 2", "has a '..' component"),
    ("a.jpg 0\nC:\\data\\x.jpg 1\n", "line 2", "is absolute"),
]


@pytest.mark.parametrize("text,line,needle", BAD)
def test_bad_split_lines_name_the_file_and_line(tmp_path, text, line, needle):
    path = tmp_path / "Places_LT_train.txt"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        load_file_split("places-lt", "train", tmp_path)
    assert f"{path}, {line}: " in str(err.value) and needle in str(err.value)


@pytest.mark.parametrize("text", ["", "\n  \n\n"])
def test_empty_split_file(tmp_path, text):
    path = tmp_path / "Places_LT_val.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=f"{path} is empty"):
        load_file_split("places-lt", "val", tmp_path)


def test_class_count_must_match_the_dataset(tmp_path):
    path = tmp_path / "Places_LT_test.txt"
    path.write_text("".join(f"val/c{c}/x.jpg {c}\n" for c in range(365) if c != 17))
    with pytest.raises(DataError) as err:
        load_file_split("places-lt", "test", tmp_path)
    msg = str(err.value)
    assert str(path) in msg and "364 classes, but places-lt has 365" in msg
    assert "no line has label 17." in msg


def test_paths_with_spaces_split_on_the_last_whitespace(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("my class/a b.jpg 1\r\nx/y.png\t0\nmy class/c.jpg   1  \n")
    paths, labels = read_split_file(path)
    assert paths == ["my class/a b.jpg", "x/y.png", "my class/c.jpg"]
    assert labels.tolist() == [1, 0, 1] and labels.dtype == np.int64
    path.write_bytes("\ufeffx/é.jpg 0\n".encode())  # a BOM at the start is dropped
    assert read_split_file(path)[0] == ["x/é.jpg"]
    path.write_text("a/x.jpg 0\na/y.jpg 123456789012345678901234\n")
    with pytest.raises(DataError, match=r"line 2: label \d+ is implausibly large"):
        read_split_file(path)
    path.write_bytes(b"x/\xff.jpg 0\n")
    with pytest.raises(DataError, match="is not UTF-8 text"):
        read_split_file(path)


def test_bad_split_file_at_the_cli_is_one_paragraph(tmp_path, capsys):
    (tmp_path / "Places_LT_train.txt").write_text("train/a.jpg 0\ntrain/b.jpg x\n")
    assert main(["data", "stats", "places-lt", "--split-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Places_LT_train.txt, line 2:" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert main(["data", "stats", "places-lt", "--split-dir", str(tmp_path / "none")]) == 2
    assert "Places_LT_train.txt, not found in" in capsys.readouterr().err
    assert main(["data", "stats", "imagenet-lt"]) == 2
    assert "give --split-dir DIR" in capsys.readouterr().err


# --------------------------------------------------------------------------- data check
def _good_imagenet_tree(tmp_path) -> Path:
    root = tmp_path / "imagenet"
    lines = [(f"train/n{c:08d}/n{c:08d}_{k}.JPEG", c) for c in range(4) for k in range(3)]
    _write_tree(root, lines, root / "ImageNet_LT_train.txt")
    _write_tree(root, lines[::3], root / "ImageNet_LT_val.txt")
    _write_tree(
        root, [(f"val/n{c:08d}/v{c}.JPEG", c) for c in range(4)], root / "ImageNet_LT_test.txt"
    )
    return root


def test_data_check_names_missing_and_corrupt_files(tmp_path, capsys, small_specs):
    root = _good_imagenet_tree(tmp_path)
    assert main(["data", "check", "imagenet-lt", "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "imagenet-lt train: 12 listed, 12 readable, 0 missing, 0 corrupt" in out
    assert "imagenet-lt test: 4 listed, 4 readable" in out
    missing = root / "train/n00000001/n00000001_2.JPEG"
    missing.unlink()
    truncated = root / "train/n00000002/n00000002_0.JPEG"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG")
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # cut in the scan data
    assert main(["data", "check", "imagenet-lt", "--data-root", str(root), "--split", "train"]) == 1
    out = capsys.readouterr().out
    assert "imagenet-lt train: 12 listed, 10 readable, 1 missing, 1 corrupt" in out
    assert f"missing: {missing}\n" in out
    line = next(x for x in out.splitlines() if x.startswith("  corrupt: "))
    assert line.startswith(f"  corrupt: {truncated} (OSError: ") and "truncated" in line.lower()
    assert "imagenet-lt val" not in out  # --split train only
    # val lists n00000002_0 (lines[::3]), not the missing one
    assert main(["data", "check", "imagenet-lt", "--data-root", str(root), "--split", "val"]) == 1
    assert "0 missing, 1 corrupt" in capsys.readouterr().out
    # verify() reads the header only: the truncated JPEG passes it (hence the decode by default)
    argv = ["data", "check", "imagenet-lt", "--data-root", str(root), "--split", "val"]
    assert main([*argv, "--verify-only"]) == 0


def test_data_check_needs_the_image_root(tmp_path, capsys, small_specs):
    root = _good_imagenet_tree(tmp_path)
    assert main(["data", "check", "imagenet-lt", "--split-dir", str(root)]) == 2
    assert "give --data-root DIR" in capsys.readouterr().err


def test_check_files_reports_the_first_problems_in_listing_order(tmp_path):
    lines = [(f"c{k % 3}/img_{k:04d}.png", k % 3) for k in range(300)]
    _write_tree(tmp_path, lines, tmp_path / "list.txt")
    for k in range(0, 300, 7):
        (tmp_path / lines[k][0]).unlink()
    gone = list(range(0, 300, 7))
    bad = [k for k in range(5, 300, 11) if k not in gone]
    for k in bad:
        (tmp_path / lines[k][0]).write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    data = read_folder_split(tmp_path, tmp_path / "list.txt")
    rep = check_files(data, workers=3, report=4)
    assert (rep.listed, rep.missing, rep.corrupt, rep.ok) == (
        300,
        len(gone),
        len(bad),
        300 - len(gone) - len(bad),
    )
    assert rep.first_missing == [str(tmp_path / lines[k][0]) for k in gone[:4]]
    assert [p for p, _ in rep.first_corrupt] == [str(tmp_path / lines[k][0]) for k in bad[:4]]
    assert not rep.passed


# --------------------------------------------------------------------------- folder datasets
def _folder(root: Path, counts: dict[str, int], ext: str = ".jpg") -> None:
    for c, (name, n) in enumerate(sorted(counts.items())):
        _write_tree(root, [(f"{name}/{k:03d}{ext}", c) for k in range(n)])


def test_folder_scan_rules(tmp_path):
    root = tmp_path / "flowers"
    _write_tree(root, [(f"daisy/{k:03d}.jpg", 0) for k in range(3)])
    _write_tree(root, [("rose/sub/deep.PNG", 1), ("rose/UPPER.JPEG", 1)])
    _write_tree(root, [("tulip/000.jpg", 2), ("tulip/001.jpg", 2)])
    (root / "rose" / ".hidden.jpg").write_bytes(b"x")  # hidden: skipped
    (root / "rose" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()  # hidden folder: not a class
    (root / "README.md").write_text("top-level files are not classes")
    (tmp_path / "elsewhere").mkdir()
    _write_tree(tmp_path / "elsewhere", [("linked.webp", 0)])
    (root / "daisy" / "link.jpg").symlink_to(tmp_path / "elsewhere" / "linked.webp")
    (root / "daisy" / "loop").symlink_to(root / "daisy")  # a loop is read once
    data = scan_folder(root)
    assert data.classes == ["daisy", "rose", "tulip"]
    assert list(data.paths) == [
        "daisy/000.jpg",
        "daisy/001.jpg",
        "daisy/002.jpg",
        "daisy/link.jpg",
        "rose/UPPER.JPEG",
        "rose/sub/deep.PNG",
        "tulip/000.jpg",
        "tulip/001.jpg",
    ]
    assert data.labels.tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    assert data.indices.tolist() == list(range(8))
    assert listing_stats(data)["counts"] == [4, 2, 2]
    assert _labels_decode_to(data) == data.labels.tolist()


def test_folder_errors_name_the_folder(tmp_path, capsys):
    root = tmp_path / "ds"
    _folder(root, {"a": 2})
    (root / "b").mkdir()
    (root / "b" / "x.txt").write_text("")
    with pytest.raises(DataError, match=f"Class folder {root / 'b'} holds no image"):
        scan_folder(root)
    with pytest.raises(DataError, match="has no class sub-folder"):
        scan_folder(root / "a")
    with pytest.raises(DataError, match="not found"):
        scan_folder(tmp_path / "nothing")
    assert main(["data", "stats", f"folder:{root}"]) == 2
    assert f"{root / 'b'} holds no image" in capsys.readouterr().err


def test_folder_stats_and_check_at_the_cli(tmp_path, capsys):
    root = tmp_path / "ds"
    _folder(root, {"a": 3, "b": 2}, ext=".png")
    assert main(["data", "stats", f"folder:{root}", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["counts"] == [3, 2] and s["classes"] == ["a", "b"] and s["split"] is None
    assert main(["data", "check", f"folder:{root}"]) == 0
    assert "5 listed, 5 readable, 0 missing, 0 corrupt" in capsys.readouterr().out
    (root / "b" / "001.png").write_bytes(b"")
    assert main(["data", "check", f"folder:{root}"]) == 1
    assert f"corrupt: {root / 'b' / '001.png'} (" in capsys.readouterr().out
    (root / "list.txt").write_text("a/000.png 0\nb/001.png 1\nb/gone.png 1\n")
    argv = ["data", "check", f"folder:{root}", "--split-file", str(root / "list.txt")]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "3 listed, 1 readable, 1 missing, 1 corrupt" in out and "missing: " in out
    assert main(["data", "stats", f"folder:{root}", "--split", "val"]) == 2
    assert "is one listing" in capsys.readouterr().err


def test_folder_split_file_names_classes_from_folders(tmp_path):
    _folder(tmp_path, {"cat": 2, "dog": 2})
    (tmp_path / "l.txt").write_text("dog/000.jpg 1\ncat/001.jpg 0\ndog/001.jpg 1\n")
    data = read_folder_split(tmp_path, tmp_path / "l.txt")
    assert data.classes == ["cat", "dog"] and data.labels.tolist() == [1, 0, 1]
    assert _labels_decode_to(data) == [1, 0, 1]
    (tmp_path / "l.txt").write_text("dog/000.jpg 1\ncat/001.jpg 2\n")  # no label 0
    with pytest.raises(DataError, match="its labels run 0..2: no line has label 0"):
        read_folder_split(tmp_path, tmp_path / "l.txt")


def test_seeded_validation_split(tmp_path):
    _folder(tmp_path, {"a": 12, "b": 9, "c": 6})
    data = scan_folder(tmp_path)
    rest, val = heldout_split(data, 4, seed=3)
    assert val.class_counts() == [4, 4, 4] and rest.class_counts() == [8, 5, 2]
    assert sorted(np.concatenate([rest.indices, val.indices]).tolist()) == list(range(27))
    assert [rest.paths[i] for i in range(len(rest))] == [data.paths[i] for i in rest.indices]
    again = heldout_split(data, 4, seed=3)[1]
    other = heldout_split(data, 4, seed=4)[1]
    assert again.indices.tolist() == val.indices.tolist()
    assert other.indices.tolist() != val.indices.tolist()
    with pytest.raises(DataError, match="Class 'c' .* has 6 images"):
        heldout_split(data, 6)
    # folder_splits: val drawn with seed + 1, disjoint from train
    s0, s0b, s1 = (folder_splits(tmp_path, val_per_class=2, seed=s) for s in (0, 0, 1))
    assert s0.val.indices.tolist() == s0b.val.indices.tolist() != s1.val.indices.tolist()
    assert s0.val.indices.tolist() == heldout_split(data, 2, seed=1)[1].indices.tolist()
    assert not set(s0.train.indices) & set(s0.val.indices) and s0.class_counts == [10, 7, 4]


def test_longtail_subset_of_a_folder(tmp_path):
    _folder(tmp_path, {f"k{c}": 40 - 3 * c for c in range(6)})
    data = scan_folder(tmp_path)
    for factor, profile in ((10, "exp"), (5, "step")):
        sub = longtail_subset(data, factor, profile, seed=0)
        expected = img_num_per_cls(25, 6, factor, profile)  # n_max = the smallest class, 25
        assert sub.class_counts() == expected and sum(expected) == len(sub)
        assert set(sub.indices.tolist()) <= set(range(len(data)))
        assert _labels_decode_to(sub) == sub.labels.tolist()
    assert longtail_subset(data, 10, n_max=30).class_counts() == img_num_per_cls(30, 6, 10)
    with pytest.raises(DataError, match="Class 0 has only 40 training images but .* asks for 41"):
        longtail_subset(data, 10, n_max=41)
    splits = folder_splits(tmp_path, val_per_class=5, imbalance_factor=10, seed=2)
    assert splits.class_counts == img_num_per_cls(20, 6, 10)  # 25 - 5 left for the subset
    assert splits.val.class_counts() == [5] * 6
    assert not set(splits.train.indices) & set(splits.val.indices)


def test_path_list_is_compact_and_pickles():
    names = ["a/b.jpg", "é/ü.png", "", "x y/z.JPEG"]
    paths = PathList.from_strings(names)
    assert list(paths) == names and paths[-1] == "x y/z.JPEG" and len(paths) == 4
    assert list(paths.take([3, 1, 1])) == ["x y/z.JPEG", "é/ü.png", "é/ü.png"]
    assert list(paths[1:3]) == names[1:3] and list(paths.take([])) == []
    assert list(pickle.loads(pickle.dumps(paths))) == names
    with pytest.raises(IndexError):
        paths.take([4])
    data = FileImageSet(Path("/r"), names, [0, 1, 0, 1], ["p", "q"], np.arange(4))
    sub = pickle.loads(pickle.dumps(data.subset([2, 1])))
    assert list(sub.paths) == ["", "é/ü.png"] and sub.indices.tolist() == [2, 1]
    assert sub.file(1) == Path("/r/é/ü.png") and sub.class_counts() == [1, 1]


def test_registry_names_and_errors():
    assert {"imagenet-lt", "places-lt", "inat2018"} <= set(FILE_DATASETS)
    assert FILE_DATASETS["inat2018"].split_files["test"] == "iNaturalist18_val.txt"
    assert files.is_file_dataset("Places-LT") and files.is_file_dataset("folder:/x")
    assert not files.is_file_dataset("cifar10-lt")
    with pytest.raises(DataError, match="Valid names: imagenet-lt, places-lt, inat2018"):
        files.file_dataset_spec("places365")
    with pytest.raises(DataError, match="has no split 'train2'; use one of train, val, test"):
        files.split_file_path("places-lt", "train2", ".")


def test_folder_long_tailed_stats_at_the_cli(tmp_path, capsys):
    _folder(tmp_path, {f"k{c}": 30 for c in range(5)}, ext=".png")
    argv = ["data", "stats", f"folder:{tmp_path}", "--imbalance-factor", "10", "--json"]
    assert main(argv) == 0
    assert (
        json.loads(capsys.readouterr().out)["counts"]
        == img_num_per_cls(30, 5, 10)
        == [
            30,
            16,
            9,
            5,
            3,
        ]
    )
    argv = ["data", "stats", f"folder:{tmp_path}", "--profile", "step", "--imbalance-factor", "3"]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == [30, 30, 10, 10, 10]
    splits = str(tmp_path)
    assert (
        main(["data", "stats", "places-lt", "--split-dir", splits, "--imbalance-factor", "10"]) == 2
    )
    assert "long-tailed as published" in capsys.readouterr().err
    assert main(["data", "split", "places-lt", "--out", str(tmp_path / "x.txt")]) == 2
    assert "Places-LT needs its split files: give --split-dir" in capsys.readouterr().err


def test_data_split_writes_a_folders_longtailed_subset_as_a_split_file(tmp_path, capsys):
    from longtail.cli import main

    tree = tmp_path / "tree"
    _folder(tree, {f"k{c}": 40 - 3 * c for c in range(6)})
    out = tmp_path / "lt.txt"
    argv = ["data", "split", f"folder:{tree}", "--imbalance-factor", "10", "--out", str(out)]
    assert main(argv) == 0
    lines = out.read_text().splitlines()
    expected = img_num_per_cls(25, 6, 10)
    assert len(lines) == sum(expected) and f"wrote {sum(expected)} lines" in capsys.readouterr().out
    labels = [int(line.rsplit(" ", 1)[1]) for line in lines]
    assert np.bincount(labels).tolist() == expected
    # the written file lists the same subset the folder reads back from it
    again = read_folder_split(tree, out)
    assert again.class_counts() == expected and again.classes == [f"k{c}" for c in range(6)]
    # a published benchmark is long-tailed already: no factor
    assert main(["data", "split", "places-lt", "--imbalance-factor", "5", "--out", str(out)]) == 2


@pytest.mark.skipif(not SPLITS.is_dir(), reason="the published split files are not here")
def test_data_split_of_a_published_benchmark_rewrites_its_split_file(tmp_path):
    from longtail.cli import main

    out = tmp_path / "val.txt"
    assert (
        main(
            [
                "data",
                "split",
                "places-lt",
                "--split-dir",
                str(SPLITS),
                "--split",
                "val",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    lines = out.read_text().splitlines()
    assert (
        len(lines) == 7300
        and lines == (SPLITS / "Places_LT_val.txt").read_text().split("\n")[: len(lines)]
    )
