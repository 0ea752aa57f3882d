"""The streaming path: images on disk decoded by worker processes give exactly the in-memory
path's batches (same order, crops, flips, normalisation), for every worker count, and the same
evaluation batches; real CIFAR-10-LT exported as PNG files in a split-file layout decodes to
the in-memory pixels bit for bit."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from longtail.core.errors import DataError
from longtail.core.facts import RunFacts
from longtail.data.loader import TrainLoader, eval_batches
from longtail.data.samplers import build_sampler
from longtail.data.stream import FileBatches, decode, to_tensor
from longtail.data.transforms import sample_rng

MEAN, STD = (0.49, 0.48, 0.45), (0.2, 0.2, 0.2)


def export_pngs(images: torch.Tensor, labels: torch.Tensor, root: Path, split: str) -> list:
    """Each image as root/split/<label>/<i>.png and the split file root/<split>.txt."""
    paths = []
    for i, (x, y) in enumerate(zip(images, labels)):
        rel = f"{split}/{int(y)}/{i:05d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(root / rel)
        paths.append(rel)
    (root / f"{split}.txt").write_text("".join(f"{p} {int(y)}\n" for p, y in zip(paths, labels)))
    return paths


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0] * 40 + [1] * 20 + [2] * 10)
    root = tmp_path_factory.mktemp("pngs")
    return images, labels, root, export_pngs(images, labels, root, "train")


def _loader(images, labels, sampler_name, files=None, **kw):
    counts = np.bincount(labels.numpy()).tolist()
    facts = RunFacts(seed=3, epochs=4, batch_size=16, class_counts=counts)
    sampler = build_sampler(sampler_name, labels.numpy(), counts, facts)
    return TrainLoader(
        None if files is not None else images,
        labels,
        sampler,
        16,
        MEAN,
        STD,
        device=torch.device("cpu"),
        seed=3,
        files=files,
        **kw,
    )


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("sampler_name", ["instance", "class_balanced", "square_root"])
def test_file_batches_equal_the_in_memory_batches(small_set, workers, sampler_name):
    images, labels, root, paths = small_set
    files = FileBatches(root, paths, num_workers=workers)
    for kw in ({}, {"rank": 1, "world_size": 2, "channels_last": True}):
        memory = _loader(images, labels, sampler_name, **kw)
        disk = _loader(images, labels, sampler_name, files=files, **kw)
        assert len(memory) == len(disk)
        for epoch in (0, 2):
            pairs = list(zip(memory.epoch(epoch), disk.epoch(epoch), strict=True))
            assert len(pairs) == len(memory)
            for a, b in pairs:
                assert torch.equal(a.images, b.images) and a.images.stride() == b.images.stride()
                assert torch.equal(a.labels, b.labels) and torch.equal(a.indices, b.indices)


def test_file_eval_batches_equal_the_in_memory_ones(small_set):
    images, labels, root, paths = small_set
    files = FileBatches(root, paths, num_workers=2)
    for rank in (0, 1):
        a = list(eval_batches(images, labels, 16, MEAN, STD, torch.device("cpu"), rank, 2))
        b = list(eval_batches(files, labels, 16, MEAN, STD, torch.device("cpu"), rank, 2))
        assert len(a) == len(b) == 3  # 35 images of this rank's shard in batches of 16
        for x, y in zip(a, b):
            assert torch.equal(x.images, y.images) and torch.equal(x.indices, y.indices)


def test_worker_transform_is_seeded_per_sample_not_per_worker(small_set):
    images, labels, root, paths = small_set

    def jitter(image, rng):  # a random per-sample shift of the pixel values
        return (to_tensor(image).int() + int(rng.integers(0, 50))).clamp(0, 255).to(torch.uint8)

    runs = []
    for workers in (0, 1, 2):
        files = FileBatches(root, paths, transform=jitter, seed=5, num_workers=workers)
        runs.append([b.images for b in _loader(images, labels, "instance", files=files).epoch(1)])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
    shifted = [int(sample_rng(5, 1, p).integers(0, 50)) for p in range(3)]
    assert len(set(shifted)) > 1  # the choice differs between positions


def test_missing_or_corrupt_file_is_named(tmp_path, small_set):
    images, labels, root, paths = small_set
    files = FileBatches(root, ["train/0/nope.png"], num_workers=0)
    with pytest.raises(DataError, match="nope.png is listed but missing"):
        next(files.batches(0, [np.array([0])], [np.array([0])]))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    files = FileBatches(tmp_path, ["bad.jpg"], num_workers=0)
    with pytest.raises(DataError, match="bad.jpg cannot be decoded"):
        next(files.batches(0, [np.array([0])], [np.array([0])]))


def test_images_of_different_sizes_need_a_transform(tmp_path):
    for i, size in enumerate((32, 40)):
        Image.new("RGB", (size, size)).save(tmp_path / f"{i}.png")
    files = FileBatches(tmp_path, ["0.png", "1.png"], num_workers=0)
    with pytest.raises(DataError, match="differ in size"):
        next(files.batches(0, [np.array([0, 1])], [np.array([0, 1])]))


def test_jpeg_draft_decodes_large_files_at_a_reduced_scale(tmp_path):
    Image.new("RGB", (1600, 1200), (200, 30, 60)).save(tmp_path / "big.jpg", quality=90)
    full, small = decode(tmp_path / "big.jpg"), decode(tmp_path / "big.jpg", draft=256)
    assert full.size == (1600, 1200)
    assert min(small.size) >= 256 and small.size[0] <= 800  # a 1/2^k scale, sides >= 256


@pytest.mark.slow
@pytest.mark.realdata
def test_real_cifar10_lt_exported_as_png_decodes_bit_identically(real_data_root, tmp_path):
    from longtail.data import build_data

    data = build_data("cifar10-lt", real_data_root, val_per_class=0)
    root = tmp_path / "cifar10-lt-png"
    train = export_pngs(data.train.images, data.train.labels, root, "train")
    test = export_pngs(data.test.images, data.test.labels, root, "test")
    assert len(train) == 12406 and len(test) == 1017
    lines = (root / "train.txt").read_text().splitlines()
    assert lines[0].startswith("train/0/00000.png 0") and len(lines) == 12406
    for split, paths in (("train", train), ("test", test)):
        subset = getattr(data, split)
        files = FileBatches(root, paths, num_workers=2)
        shards = [np.arange(a, min(a + 1000, len(paths))) for a in range(0, len(paths), 1000)]
        decoded = torch.cat(list(files.batches(0, shards, shards)))
        assert torch.equal(decoded, subset.images), split


@pytest.mark.parametrize("in_memory", ["false", "true"])
def test_training_through_files_equals_training_in_memory(tiny_cifar_root, tmp_path, in_memory):
    """CIFAR-10 (the tiny 300-image copy) exported as PNG files with split files, trained as a
    folder dataset streamed by 2 workers (or decoded into memory): the same weights and metrics
    as training on the built-in in-memory set."""
    from conftest import TINY_RUN

    from longtail.core.config import load_config
    from longtail.data import build_data
    from longtail.data.build import NORMALIZATION
    from longtail.engine.trainer import fit

    data = build_data("cifar10", tiny_cifar_root, val_per_class=0)
    root = tmp_path / "png"
    export_pngs(data.train.images, data.train.labels, root, "train")
    export_pngs(data.test.images, data.test.labels, root, "test")
    config = Path(__file__).resolve().parents[1] / "configs" / "methods" / "ce.yaml"
    common = [*TINY_RUN, "data.val_per_class=0", "train.epochs=2"]
    mean, std = NORMALIZATION["cifar10"]
    runs = {
        "memory": [*common, "data.dataset=cifar10"],
        "files": [
            *common,
            f"data.dataset=folder:{root}",
            f"data.split_file={root / 'train.txt'}",
            f"data.test_file={root / 'test.txt'}",
            f"data.mean={list(mean)}",
            f"data.std={list(std)}",
            f"data.in_memory={in_memory}",
            "data.num_workers=2",
        ],
    }
    metrics = {}
    for name, overrides in runs.items():
        metrics[name] = fit(load_config(config, overrides), tmp_path / name, tiny_cifar_root)
    assert metrics["files"]["top1"] == metrics["memory"]["top1"]
    assert metrics["files"]["per_class"] == metrics["memory"]["per_class"]
    assert metrics["files"]["confusion"] == metrics["memory"]["confusion"]
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


LAYOUTS = {  # the published path layouts: class c, split, image i -> path
    "inat": lambda c, kingdom, split, i: f"train_val2018/{kingdom}/{c:04d}/{split}{i}.jpg",
    "imagenet": lambda c, kingdom, split, i: f"{split}/n0{c:07d}/n0{c:07d}_{i}.JPEG",
    "places": lambda c, kingdom, split, i: f"data_256/{'abcd'[c]}/scene{c}/{split}{i:08d}.jpg",
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_split_file_benchmark_in_each_published_layout_trains_with_2_workers(tmp_path, layout):
    """A tiny benchmark registered like the published ones (split files; iNaturalist's
    train_val2018/<kingdom>/<id>/<file>.jpg, ImageNet's <split>/<wnid>/<file>.JPEG, Places'
    data_256/<letter>/<scene>/<file>.jpg; val reported as test as for iNaturalist) streams JPEGs
    through imagenet_train / imagenet_eval at 64 px with 2 workers, trains ResNet-10 end to end
    and evaluates."""
    from conftest import TINY_RUN

    from longtail.core.config import load_config
    from longtail.data.files import FileDatasetSpec, register_file_dataset
    from longtail.engine.trainer import fit

    spec = f"tiny-{layout}-layout"
    register_file_dataset(
        FileDatasetSpec(
            name=spec,
            title="tiny iNaturalist-like",
            num_classes=4,
            split_files={"train": "tiny_train.txt", "val": "tiny_val.txt", "test": "tiny_val.txt"},
            names_from_paths=False,
            super_from_paths=layout == "inat",
        )
    )
    rng = np.random.default_rng(0)
    lines = {"train": [], "val": []}
    for c, (kingdom, n) in enumerate([("Plantae", 12), ("Plantae", 6), ("Aves", 4), ("Aves", 2)]):
        for split, count in (("train", n), ("val", 2)):
            for i in range(count):
                rel = LAYOUTS[layout](c, kingdom, split, i)
                (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (48 + 8 * c, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / rel, quality=90)
                lines[split].append(f"{rel} {c}\n")
    for split, rows in lines.items():
        (tmp_path / f"tiny_{split}.txt").write_text("".join(rows))
    config = Path(__file__).resolve().parents[1] / "configs" / "methods" / "ce.yaml"
    overrides = [
        *TINY_RUN,
        f"data.dataset={spec}",
        "model.backbone=resnet10",
        "train.batch_size=8",
        "train.epochs=2",
        "data.transform=imagenet_train",
        "data.transform_params={size: 64}",
        "data.eval_transform=imagenet_eval",
        "data.eval_transform_params={size: 64, resize: 72}",
        "data.num_workers=2",
        "train.channels_last=false",
    ]
    metrics = fit(load_config(config, overrides), tmp_path / "run", tmp_path)
    assert metrics["num_samples"] == 8 and metrics["epochs"] == 2
    assert metrics["val"]["num_samples"] == 8  # val is the test split here
    assert len(metrics["per_class"]) == 4 and metrics["top5"] == pytest.approx(100.0)
    history = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    assert len(history) == 2


def test_a_missing_listed_image_stops_the_run_before_anything_is_written(small_set, tmp_path):
    from conftest import TINY_RUN

    from longtail.core.config import load_config
    from longtail.core.errors import LongtailError
    from longtail.engine.trainer import fit

    images, labels, root, paths = small_set
    split = tmp_path / "train.txt"
    split.write_text(
        (root / "train.txt").read_text() + "train/2/gone.png 2\n"
    )  # one more line, no such file
    config = Path(__file__).resolve().parents[1] / "configs" / "methods" / "ce.yaml"
    cfg = load_config(
        config,
        [
            *TINY_RUN,
            f"data.dataset=folder:{root}",
            f"data.split_file={split}",
            f"data.test_file={root / 'train.txt'}",
            "data.val_per_class=0",
        ],
    )
    with pytest.raises(
        LongtailError, match=r"1 of 71 listed images are missing.*gone.png \(image 71"
    ):
        fit(cfg, tmp_path / "run", root)
    assert not (tmp_path / "run").exists()
