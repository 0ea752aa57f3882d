#!/usr/bin/env python
"""Real images through the file path: the real CIFAR-10-LT IF100 training subset and test batch
exported as PNG files with split files, trained with CE as a folder dataset streamed by worker
processes, against the same run on the built-in in-memory set (same seed, same schedule).

The two paths give the same batches, so the runs should agree exactly (not just within seed
noise); the table prints both and whether the weights are bit-identical.

    LONGTAIL_DATA=/tmp/ltdata python benchmarks/stream_parity.py --epochs 1
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO_ROOT, RESULTS_DIR, format_table, run_header, write_json  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from longtail.core.config import load_config  # noqa: E402
from longtail.data import build_data  # noqa: E402
from longtail.data.build import NORMALIZATION  # noqa: E402
from longtail.data.paths import resolve_data_root  # noqa: E402
from longtail.engine.trainer import fit  # noqa: E402


def export(images, labels, root: Path, split: str) -> None:
    lines = []
    for i, (x, y) in enumerate(zip(images, labels)):
        rel = f"{split}/{int(y)}/{i:05d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(root / rel)
        lines.append(f"{rel} {int(y)}\n")
    (root / f"{split}.txt").write_text("".join(lines))


def weights_hash(run: Path) -> str:
    w = load_file(str(run / "model.safetensors"))
    h = hashlib.sha256()
    for k in sorted(w):
        h.update(k.encode() + w[k].numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default=str(RESULTS_DIR / "stream_parity-cpu.json"))
    args = p.parse_args(argv)
    root = resolve_data_root(args.data_root)
    data = build_data("cifar10-lt", root, val_per_class=0)
    mean, std = NORMALIZATION["cifar10"]
    common = [
        "data=cifar10_lt",
        "data.val_per_class=0",
        f"train.epochs={args.epochs}",
        "train.eval_every=0",
        "train.progress=false",
        "train.amp=none",
        "schedule=cosine",
        "schedule.warmup_epochs=0",
    ]
    out = {}
    with tempfile.TemporaryDirectory(prefix="longtail-parity-") as tmp:
        png = Path(tmp) / "png"
        t0 = time.perf_counter()
        export(data.train.images, data.train.labels, png, "train")
        export(data.test.images, data.test.labels, png, "test")
        export_s = time.perf_counter() - t0
        runs = {
            "in memory (built-in)": common,
            f"files, streamed ({args.workers} workers)": [
                *common,
                f"data.dataset=folder:{png}",
                f"data.split_file={png / 'train.txt'}",
                f"data.test_file={png / 'test.txt'}",
                f"data.mean={list(mean)}",
                f"data.std={list(std)}",
                "data.in_memory=false",
                f"data.num_workers={args.workers}",
            ],
        }
        for i, (name, overrides) in enumerate(runs.items()):
            cfg = load_config(REPO_ROOT / "configs" / "methods" / "ce.yaml", overrides)
            start = time.perf_counter()
            m = fit(cfg, Path(tmp) / f"run{i}", root)
            out[name] = {
                "top1": m["top1"],
                "many": m["many"],
                "medium": m["medium"],
                "images_per_s": m["images_per_s"],
                "seconds": time.perf_counter() - start,
                "weights": weights_hash(Path(tmp) / f"run{i}"),
            }
    rows = [
        [n, f"{r['top1']:.2f}", f"{r['medium']:.2f}", f"{r['images_per_s']:.0f}", r["weights"]]
        for n, r in out.items()
    ]
    table = format_table(["path", "test top-1", "medium", "train img/s", "weights sha256"], rows)
    same = len({r["weights"] for r in out.values()}) == 1
    print(table)
    print(f"\nweights bit-identical: {same}; {len(data.train)} PNGs exported in {export_s:.0f}s")
    record = {
        **run_header("stream_parity"),
        "settings": vars(args),
        "results": out,
        "bit_identical": same,
        "table": table,
    }
    print(f"written: {write_json(Path(args.out), record)}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
