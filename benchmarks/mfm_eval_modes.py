#!/usr/bin/env python
"""MFM at test time: the same trained weights evaluated unmodulated, modulated, and unmodulated
after re-estimating the BatchNorm statistics on unmodulated training images.

MFM (METHODS.md §1, [PROPOSED]) modulates the long-tailed training batches only and deploys the
plain network f(x; θ). Its BatchNorm layers, though, keep running statistics of *modulated*
features (every training forward is modulated), and the meta loss is computed with batch
statistics, so nothing in training measures the deployed network with running statistics. This
benchmark shows how large that gap is on finished runs (the cifar-short MFM rows by default):

- ``unmodulated``: the method's evaluation (``modulate_at_test: false``), as in metrics.json;
- ``modulated``: the modulator applied at test too (``method.modulate_at_test=true``);
- ``unmodulated, BN re-estimated``: running statistics recomputed over the unmodulated training
  subset (``torch.optim.swa_utils.update_bn``, no augmentation), then unmodulated.

    LONGTAIL_DATA=/work/data python benchmarks/mfm_eval_modes.py [RUN_DIR ...]   # ~2 min on 2 cores

Results: ``benchmarks/results/mfm_eval_modes-cpu.json`` with machine, git commit and command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import REPO_ROOT, RESULTS_DIR, format_table, run_header, write_json  # noqa: E402

DEFAULT_RUNS = ["c10-mfm", "fm-mfm", "c10-mfm_from_fm", "fm-mfm_from_c10"]


def training_images(data, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """The training subset, normalised as for evaluation (no augmentation): float [B, C, H, W]."""
    from longtail.data.augment import normalize

    images = data.train.images
    for start in range(0, len(images), batch_size):
        yield normalize(images[start : start + batch_size], data.mean, data.std)


def evaluate_modes(run_dir: Path, data_root: Path) -> Dict[str, Any]:
    from longtail.engine.evaluate_run import load_finished_run
    from longtail.engine.trainer import evaluate_splits

    run = load_finished_run(run_dir, data_root)
    if run.cfg.method.name != "mfm":
        raise SystemExit(f"{run_dir} is not an MFM run (method.name={run.cfg.method.name}).")

    def scores() -> Dict[str, Any]:
        res = evaluate_splits(run)
        return {
            "test_top1": res["test"]["top1"],
            "test_medium": res["test"]["medium"],
            "test_ece": res["test"]["ece"],
            "val_top1": res["val"]["top1"] if "val" in res else None,
        }

    out = {"unmodulated": scores()}
    modulation = run.method.modulation
    modulation.default = True
    out["modulated"] = scores()
    modulation.default = False
    model = run.method.model
    with torch.no_grad():
        torch.optim.swa_utils.update_bn(training_images(run.data), model)
    model.eval()
    out["unmodulated, BN re-estimated"] = scores()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="MFM run folders (default: the cifar-short MFM rows)")
    p.add_argument("--data-root", default=None, help="datasets folder (default: $LONGTAIL_DATA)")
    p.add_argument("--out", default=str(RESULTS_DIR / "mfm_eval_modes-cpu.json"))
    args = p.parse_args(argv)
    from longtail.data.paths import resolve_data_root

    data_root = resolve_data_root(args.data_root)
    runs = [Path(r) for r in args.runs] or [
        REPO_ROOT / "runs" / "bench" / "cifar-short" / n for n in DEFAULT_RUNS
    ]
    results, rows = {}, []
    for run_dir in runs:
        results[run_dir.name] = modes = evaluate_modes(run_dir, data_root)
        for mode, s in modes.items():
            rows.append(
                [
                    run_dir.name,
                    mode,
                    f"{s['test_top1']:.2f}",
                    f"{s['test_medium']:.2f}",
                    f"{s['test_ece']:.2f}",
                    "–" if s["val_top1"] is None else f"{s['val_top1']:.2f}",
                ]
            )
    table = format_table(
        ["run", "evaluation", "test top-1", "test medium", "test ECE", "val top-1"], rows
    )
    print(table)
    result = run_header("mfm_eval_modes")
    result.update(
        {
            "settings": {"runs": [str(r) for r in runs], "data_root": str(data_root)},
            "results": results,
            "table": table,
        }
    )
    print(f"\nresults: {write_json(Path(args.out), result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
