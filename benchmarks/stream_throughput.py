#!/usr/bin/env python
"""Streaming input throughput at 224 px: bare Pillow decoding of JPEG files, the loader's decode +
``imagenet_train`` augmentation per worker (and with all workers), against the training speed of
ResNet-50 on this machine's device: is the model kept fed?

The images are generated (``--images`` JPEGs of 500x375, ImageNet's typical size, smooth noise
so they compress like photos) in a temporary folder; every number is measured in this one run.

    python benchmarks/stream_throughput.py              # ~1-2 minutes on a 2-core CPU
    python benchmarks/stream_throughput.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import RESULTS_DIR, format_table, run_header, write_json  # noqa: E402
from PIL import Image  # noqa: E402

from longtail.data.stream import FileBatches, decode  # noqa: E402
from longtail.data.transforms import build_pipeline  # noqa: E402
from longtail.models.resnet_imagenet import resnet50  # noqa: E402


def make_images(folder: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.BILINEAR)
        paths.append(f"{i:05d}.jpg")
        img.save(folder / paths[-1], quality=90)
    return paths


def bare_decode(folder: Path, paths: list[str]) -> float:
    start = time.perf_counter()
    for p in paths:
        with Image.open(folder / p) as im:
            im.convert("RGB").load()
    return len(paths) / (time.perf_counter() - start)


def loader_rate(folder: Path, paths: list[str], workers: int, batch: int) -> float:
    files = FileBatches(
        folder, paths, transform=build_pipeline("imagenet_train"), num_workers=workers
    )
    idx = [np.arange(a, min(a + batch, len(paths))) for a in range(0, len(paths), batch)]
    it = files.batches(0, idx, idx)
    next(it)  # workers started and the first batch made
    start = time.perf_counter()
    n = sum(len(b) for b in it)
    return n / (time.perf_counter() - start)


def model_rate(device: torch.device, batch: int, steps: int) -> float:
    model = resnet50().to(device).to(memory_format=torch.channels_last)
    head = torch.nn.Linear(model.num_features, 1000).to(device)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(head(model.forward_features(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.steps, args.batch = 32, 1, 4
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="longtail-stream-") as tmp:
        folder = Path(tmp)
        paths = make_images(folder, args.images)
        draft = decode(folder / paths[0], draft=256).size
        bare = bare_decode(folder, paths)
        one = loader_rate(folder, paths, 1, args.batch)
        full = loader_rate(folder, paths, args.workers, args.batch)
    trained = model_rate(device, args.batch, args.steps)
    rows = [
        ["bare Pillow decode (1 process)", f"{bare:.1f}", "1.00x"],
        ["decode + imagenet_train, 1 worker", f"{one:.1f}", f"{one / bare:.2f}x"],
        [f"decode + imagenet_train, {args.workers} workers", f"{full:.1f}", f"{full / bare:.2f}x"],
        [
            f"ResNet-50 training at 224 px ({device.type}, batch {args.batch})",
            f"{trained:.1f}",
            "–",
        ],
    ]
    print(format_table(["what", "images/s", "vs bare decode"], rows))
    fed = full >= trained
    print(
        f"\nloader / model: {full / trained:.1f}x -> "
        f"{'the loader keeps the model fed' if fed else 'the model waits for the loader'}"
        f" (JPEG draft at 256 decodes 500x375 as {draft[0]}x{draft[1]})"
    )
    record = {
        **run_header("stream_throughput"),
        "settings": vars(args),
        "results": {
            "bare_decode_images_per_s": bare,
            "loader_1_worker_images_per_s": one,
            "loader_images_per_s": full,
            "workers": args.workers,
            "resnet50_train_images_per_s": trained,
            "loader_over_model": full / trained,
            "model_fed": fed,
        },
        "table": format_table(["what", "images/s", "vs bare decode"], rows),
    }
    name = f"stream_throughput-{device.type}{'-quick' if args.quick else ''}.json"
    print(f"written: {write_json(Path(args.out) if args.out else RESULTS_DIR / name, record)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
