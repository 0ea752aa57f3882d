"""``longtail eval RUN_DIR``: rebuild a finished run from its saved config and weights, re-evaluate.

The numbers equal those in the run's ``metrics.json`` (same data, same code path, same weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from longtail.core.errors import LongtailError
from longtail.core.modules import load_fitting_state
from longtail.core.run_folder import RunFolder
from longtail.engine.trainer import Run, build_run, evaluate_splits


def load_finished_run(run_dir: Path, data_root: Path) -> Run:
    """Rebuild a run from its saved ``config.yaml`` with its final weights and method state
    (a tau picked on val, MFM's modulator and deployment choice, ...), ready to evaluate."""
    folder = RunFolder(run_dir)
    cfg = folder.load_config()
    run = build_run(cfg, folder.path, data_root)
    if folder.has_weights():
        weights = folder.load_weights()
    elif folder.has_checkpoint():
        weights = folder.load_checkpoint()["model"]
        print(f"note: {run_dir} has not finished; evaluating its last checkpoint.")
    else:
        raise LongtailError(
            f"{run_dir} has no weights yet ({folder.WEIGHTS} or {folder.CHECKPOINT}). "
            f"Train it first or resume it with `longtail train --resume {run_dir}`."
        )
    source = folder.weights_path if folder.has_weights() else folder.checkpoint_path
    load_fitting_state(run.method.model, weights, str(source))
    if folder.has_checkpoint():
        run.method.load_state_dict(folder.load_checkpoint()["method"])
    return run


def evaluate_run(run_dir: Path, data_root: Path) -> Dict[str, Any]:
    """Metrics of the run's final weights: the test metrics at the top level, ``val`` nested."""
    folder = RunFolder(run_dir)
    if folder.is_run():
        cfg = folder.load_config()
        if (
            cfg.stages
        ):  # a multi-stage run: its metrics.json is its last stage's (engine/pipeline.py)
            return evaluate_run(folder.path / cfg.stages[-1].name, data_root)
    run = load_finished_run(folder.path, data_root)
    results = evaluate_splits(run)
    out: Dict[str, Any] = dict(results["test"])
    out.update(run.method.extra_metrics())
    for split, m in results.items():
        if split != "test":
            out[split] = m
    return out
