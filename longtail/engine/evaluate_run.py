"""``longtail eval RUN_DIR``: rebuild a finished run from its saved config and weights, re-evaluate.

The numbers equal those in the run's ``metrics.json`` (same data, same code path, same weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from longtail.core.config import load_yaml_tree, validate
from longtail.core import io as ckpt
from longtail.engine.trainer import CHECKPOINT, WEIGHTS, Run, build_run, evaluate_splits
from longtail.core.errors import LongtailError


def load_finished_run(run_dir: Path, data_root: Path) -> Run:
    """Rebuild a run from its saved ``config.yaml`` with its final weights and method state
    (a tau picked on val, MFM's modulator and deployment choice, ...), ready to evaluate."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise LongtailError(f"{run_dir} is not a run folder (no config.yaml). Pass a folder written by "
                            f"`longtail train`.")
    cfg = validate(load_yaml_tree(saved), f"config {saved}")
    run = build_run(cfg, run_dir, data_root)
    if (run_dir / WEIGHTS).is_file():
        weights = ckpt.load_weights(run_dir / WEIGHTS)
    elif (run_dir / CHECKPOINT).is_file():
        weights = ckpt.load_checkpoint(run_dir / CHECKPOINT)["model"]
        print(f"note: {run_dir} has not finished; evaluating its last checkpoint.")
    else:
        raise LongtailError(f"{run_dir} has no weights yet ({WEIGHTS} or {CHECKPOINT}). Train it first "
                            f"or resume it with `longtail train --resume {run_dir}`.")
    run.method.model.load_state_dict(weights)
    if (run_dir / CHECKPOINT).is_file():
        run.method.load_state_dict(ckpt.load_checkpoint(run_dir / CHECKPOINT)["method"])
    return run


def evaluate_run(run_dir: Path, data_root: Path) -> Dict[str, Any]:
    """Metrics of the run's final weights: the test metrics at the top level, ``val`` nested."""
    saved = run_dir / "config.yaml"
    if saved.is_file():
        cfg = validate(load_yaml_tree(saved), f"config {saved}")
        if cfg.stages:   # a multi-stage run: its metrics.json is its last stage's (engine/pipeline.py)
            return evaluate_run(run_dir / cfg.stages[-1].name, data_root)
    run = load_finished_run(run_dir, data_root)
    results = evaluate_splits(run)
    out: Dict[str, Any] = dict(results["test"])
    out.update(run.method.extra_metrics())
    for split, m in results.items():
        if split != "test":
            out[split] = m
    return out
