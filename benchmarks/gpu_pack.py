#!/usr/bin/env python
"""Prepare what benchmarks/gpu_check.sh needs on a bare GPU machine, in ``.gpu/`` (git-ignored):

* ``cifar10-lt.tgz``: the CIFAR-10 folder with only the images the suite uses (the IF-100
  long-tailed training subset and the balanced val split; every other training image zeroed, the
  layout and labels kept, so the same indices select the same images), made by the shared data
  folder's ``materialize.py --keep`` (about 37 MB);
* ``whl/``: wheels of the dependencies the GPU machine lacks (pydantic and its needs), for
  Python 3.12 on x86-64 Linux, installed there without internet;
* ``COMMIT``: the commit and whether the tree was dirty (the GPU machine may get no ``.git``).

    python benchmarks/gpu_pack.py --shared ../shared/data     # then, with the device tool:
    run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"])
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the device machine's Python and what pip must fetch for it (the rest is there already)
WHEELS = [
    "pydantic==2.13.4",
    "pydantic-core==2.46.4",
    "annotated-types==0.7.0",
    "typing-inspection==0.4.2",
]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def used_indices(data_root: Path) -> list[int]:
    """Training-set indices of CIFAR-10-LT IF100's train and val splits (configs/datasets)."""
    from longtail.core.config import load_config
    from longtail.data.sources import build_bundle

    cfg = load_config(ROOT / "configs" / "methods" / "ce.yaml", ["data=cifar10_lt"])
    data = build_bundle(cfg.data, data_root)
    keep = set(data.train.indices.tolist()) | set(data.val.indices.tolist())
    return sorted(keep)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shared",
        default=str(ROOT.parent / "shared" / "data"),
        help="the shared data folder holding materialize.py",
    )
    p.add_argument("--data-root", default=None, help="full CIFAR-10 (default $LONGTAIL_DATA)")
    p.add_argument("--out", default=str(ROOT / ".gpu"))
    p.add_argument("--no-wheels", action="store_true")
    args = p.parse_args(argv)
    from longtail.bench.machine import git_info
    from longtail.data.paths import resolve_data_root

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keep = used_indices(resolve_data_root(args.data_root))
    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "keep.txt"
        rows.write_text("".join(f"{i} 0\n" for i in keep))
        folder = Path(tmp) / "data"
        subprocess.run(
            [
                sys.executable,
                str(Path(args.shared) / "materialize.py"),
                str(folder),
                "cifar10",
                "--keep",
                str(rows),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        with tarfile.open(out / "cifar10-lt.tgz", "w:gz") as tar:
            tar.add(folder / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    print(
        f"{out / 'cifar10-lt.tgz'}: {len(keep)} training images kept "
        f"({(out / 'cifar10-lt.tgz').stat().st_size / 2**20:.1f} MiB)"
    )
    if not args.no_wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.12",
                "--implementation",
                "cp",
                *[a for plat in PLATFORMS for a in ("--platform", plat)],
                "-d",
                str(out / "whl"),
                *WHEELS,
            ],
            check=True,
        )
        print(f"{out / 'whl'}: {', '.join(sorted(f.name for f in (out / 'whl').glob('*.whl')))}")
    git = git_info()
    (out / "COMMIT").write_text(json.dumps({"commit": git["commit"], "dirty": git["dirty"]}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
