"""Multi-stage runs: one config describes a sequence of stages that ``longtail train`` runs in order.

A config with a top-level ``stages`` list is a *pipeline* (the three-stage strategy: Li, Tan, Pan,
arXiv 2104.09830, 2021). Its own settings are the base of every stage; each stage is a run folder
``RUN_DIR/<name>/`` whose next stage reads it through ``stage1``. Stage keys: ``name``,
``config``, ``overrides``, ``lr_scale``, ``epochs_scale``. A stage's config::

    pipeline settings <- stage config <- stage overrides <- command line <- scales <- stage1

``RUN_DIR/config.yaml`` records every stage resolved; ``--resume RUN_DIR`` skips finished stages.
Details (lookup, scaling, checks, resume, metrics): docs/methods/three_stage.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from longtail.core.config import (
    Config,
    apply_overrides,
    compose,
    deep_merge,
    diff_trees,
    has_dotted,
    split_selectors,
    validate,
)
from longtail.core.distributed import barrier
from longtail.core.errors import ConfigError, LongtailError
from longtail.core.run_folder import RunFolder
from longtail.core.scale import scale_epochs
from longtail.engine import trainer
from longtail.engine.config_check import check_config, option_accepted

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# the options that decide the training set (longtail.methods.decoupled.DATA_KEYS)
TRAINING_SET_KEYS = ("dataset", "imbalance_factor", "profile", "subset_seed", "max_per_class")


@dataclass
class Stage:
    """One resolved stage: its position, name and complete config (``stage1`` chained when the
    pipeline's run folder is known)."""

    index: int
    name: str
    cfg: Config


# ---------------------------------------------------------------------------------------------
# resolving


def nest(overrides: Dict[str, Any], where: str) -> Dict[str, Any]:
    """``{"optim.lr": 0.01, "data": {"flip": False}}`` -> nested sections, merged in order."""
    out: Dict[str, Any] = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        if not all(parts):
            raise ConfigError(
                f"{where}: override key {key!r} is malformed; use dotted names like "
                f"optim.lr or nested sections."
            )
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"{where}: override {key!r}: '{'.'.join(parts[: i + 1])}' is "
                    f"given a value elsewhere, not a section."
                )
            node = child
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = deep_merge(node[last], value)
        else:
            node[last] = copy.deepcopy(value)
    return out


def _methods_folders(source: Optional[Path]) -> List[Path]:
    """The ``methods/`` folder of the first folder from the pipeline's file upwards that has one,
    then ./configs/methods/, then the project's configs/methods/."""
    out: List[Path] = []
    if source is not None:
        here = Path(source).resolve().parent
        for parent in (here, *here.parents):
            if (parent / "methods").is_dir():
                out.append(parent / "methods")
                break
    out += [Path.cwd() / "configs" / "methods", PROJECT_ROOT / "configs" / "methods"]
    return list(dict.fromkeys(p.resolve() for p in out))


def resolve_stage_config(text: str, source: Optional[Path], where: str) -> Path:
    """A stage's ``config``: absolute, next to the pipeline's file, in the cwd or the project,
    else a recipe of the ``methods/`` folder (configs/methods/)."""
    path = Path(text).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        roots = ([Path(source).resolve().parent] if source is not None else []) + [
            Path.cwd(),
            PROJECT_ROOT,
        ]
        roots += [m for m in _methods_folders(source) if m not in roots]
        candidates = [root / path for root in roots]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(
        f"{where}: config {text!r} not found (looked in "
        f"{', '.join(str(c.parent) for c in candidates)}). Give a path relative to the "
        f"pipeline's config file or an absolute one."
    )


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def applicable_overrides(tree: Dict[str, Any], overrides: Sequence[str], where: str) -> Config:
    """``tree`` with the command line's overrides, validated, except the options of components
    this stage does not use (``schedule.milestones`` for a stage on the cosine schedule): those
    are the other stages' options."""
    for item in overrides:
        current = validate(copy.deepcopy(tree), where)
        if option_accepted(current, item.split("=", 1)[0].strip()) is not False:
            tree = apply_overrides(tree, [item])
    return validate(tree, where)


def expand_stages(
    cfg: Config,
    overrides: Sequence[str] = (),
    source: Optional[Path] = None,
    run_dir: Optional[Path] = None,
) -> List[Stage]:
    """Every stage of the pipeline ``cfg`` as a complete, validated Config (see the module doc).

    ``overrides``: the command line's ``key=value`` list (normally already in ``cfg``; applied
    again to each stage after its own settings; its selectors ``data=NAME`` / ``model=NAME``
    compose each stage's ``config`` file as they composed the pipeline's); ``source``: the
    pipeline's config file (for relative stage ``config`` paths); ``run_dir``: the pipeline's folder (chains ``stage1``; None leaves it
    unset for the stages after the first). ConfigError names the stage and the key.
    """
    if not cfg.stages:
        raise ConfigError(
            "This config has no `stages`: it is a single run (longtail train runs it directly)."
        )
    selectors, overrides = split_selectors(overrides)  # data=NAME: composes the stage files
    if overrides:  # cfg normally holds them already; applying them again changes nothing then
        cfg = validate(apply_overrides(cfg.to_dict(), overrides), "pipeline config")
    check_config(cfg, "pipeline config")
    base = cfg.to_dict()
    base["stages"] = None
    label = f" of {source}" if source is not None else ""
    seen: Dict[str, int] = {}
    out: List[Stage] = []
    for i, spec in enumerate(cfg.stages):
        where = f"stage '{spec.name}' (#{i + 1}){label}"
        if spec.name in seen:
            raise ConfigError(
                f"Two stages are named '{spec.name}' (#{seen[spec.name] + 1} and "
                f"#{i + 1}){label}; stage names are folder names and must be unique."
            )
        seen[spec.name] = i
        delta: Dict[str, Any] = {}
        if spec.config:
            path = resolve_stage_config(spec.config, source, where)
            delta = compose(path, selectors, require_dataset=False)
            if delta.get("stages"):
                raise ConfigError(
                    f"{where}: its config {path} is itself a pipeline (has `stages`); "
                    f"a stage must be a single run."
                )
            delta.pop("stages", None)
        delta = deep_merge(delta, nest(spec.overrides, where))
        if "stages" in delta:
            raise ConfigError(f"{where}: `stages` cannot be overridden inside a stage.")
        if spec.lr_scale is not None and has_dotted(delta, "optim.lr"):
            raise ConfigError(
                f"{where}: sets both lr_scale ({spec.lr_scale}) and optim.lr (in its "
                f"config or overrides); keep one of them."
            )
        tree = deep_merge(copy.deepcopy(base), delta)
        # a command-line option of a component this stage does not use (schedule.milestones for
        # a stage on the cosine schedule) is the other stages' option: not applied here
        stage_cfg = check_config(
            applicable_overrides(tree, overrides, f"{where}: config"), f"{where}: config"
        )
        if spec.epochs_scale is not None:
            if stage_cfg.train.epochs == 0:
                raise ConfigError(
                    f"{where}: epochs_scale needs a stage that trains (its "
                    f"train.epochs is 0); remove epochs_scale."
                )
            stage_cfg = scale_epochs(
                stage_cfg, max(1, _round(spec.epochs_scale * cfg.train.epochs))
            )
        if spec.lr_scale is not None:
            # 12 significant digits: 0.01, not 0.010000000000000002
            stage_cfg.optim.lr = float(f"{spec.lr_scale * cfg.optim.lr:.12g}")
        for key in TRAINING_SET_KEYS:
            mine, theirs = getattr(stage_cfg.data, key), getattr(cfg.data, key)
            if mine != theirs:
                raise ConfigError(
                    f"{where}: trains on data.{key}={mine!r} but the pipeline on {theirs!r}. Every "
                    f"stage must train on the pipeline's training set (a later stage loads the "
                    f"previous one): set data.{key} at the pipeline's level (its file or the "
                    f"command line), not in one stage or its config file."
                )
        if i > 0:
            stage_cfg.stage1 = str(Path(run_dir) / out[-1].name) if run_dir is not None else None
        out.append(Stage(i, spec.name, stage_cfg))
    return out


def record(cfg: Config, stages: Sequence[Stage]) -> Config:
    """The pipeline as ``RUN_DIR/config.yaml`` stores it: its settings, each stage as the plain
    overrides that turn them into the stage's config (``stage1`` chaining excluded)."""
    base = cfg.to_dict()
    base["stages"] = None
    entries = []
    for st in stages:
        tree = st.cfg.to_dict()
        tree["stage1"] = base["stage1"]
        changed = {k: new for k, (_, new) in diff_trees(base, tree).items() if has_dotted(tree, k)}
        entries.append({"name": st.name, "overrides": changed})
    rec = validate({**base, "stages": entries}, "pipeline record")
    for a, b in zip(expand_stages(rec), stages):  # the record must give the same stages back
        x, y = a.cfg.to_dict(), b.cfg.to_dict()
        x["stage1"] = y["stage1"] = None
        if x != y:
            raise LongtailError(
                f"internal: the record of stage '{b.name}' does not reproduce it "
                f"(differs in {sorted(diff_trees(x, y))})."
            )
    return rec


# ---------------------------------------------------------------------------------------------
# running


def stage_row(st: Stage, metrics: Dict[str, Any], run_dir: Path) -> Dict[str, Any]:
    val = metrics.get("val") or {}
    d = st.cfg.data
    return {
        "name": st.name,
        "run_dir": str(run_dir / st.name),
        "method": st.cfg.method.name,
        "loss": st.cfg.loss.name,
        "sampler": st.cfg.sampler.name,
        "exclude_classes": d.exclude_classes,
        "epochs": metrics.get("epochs"),
        "lr": st.cfg.optim.lr,
        "top1": metrics.get("top1"),
        "many": metrics.get("many"),
        "medium": metrics.get("medium"),
        "few": metrics.get("few"),
        "mean_class_acc": metrics.get("mean_class_acc"),
        "val_top1": val.get("top1"),
        "train_seconds": metrics.get("train_seconds"),
        "images_per_s": metrics.get("images_per_s"),
    }


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x:.2f}"


def summary_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Fixed-width table of the stages: what each trained and its test / val numbers."""
    head = (
        f"{'stage':<10} {'method':<10} {'sampler':<14} {'removed':<8} {'epochs':>6} "
        f"{'lr':>8} {'test':>7} {'many':>7} {'medium':>7} {'few':>7} {'val':>7} {'time':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        removed = r["exclude_classes"]
        removed = (
            "-"
            if removed is None
            else (removed if isinstance(removed, str) else ",".join(map(str, removed)))
        )
        secs = r.get("train_seconds")
        lines.append(
            f"{r['name']:<10} {r['method']:<10} {r['sampler']:<14} {removed:<8} "
            f"{str(r.get('epochs', '-')):>6} {r['lr']:>8.4g} {_pct(r['top1']):>7} "
            f"{_pct(r['many']):>7} {_pct(r['medium']):>7} {_pct(r['few']):>7} "
            f"{_pct(r['val_top1']):>7} {'-' if secs is None else f'{secs:.1f}s':>8}"
        )
    return "\n".join(lines)


def pipeline_metrics(stages: Sequence[Stage], run_dir: Path) -> Dict[str, Any]:
    """The last stage's metrics, with the cost fields summed over the stages and a row each."""
    per_stage = []
    for st in stages:
        m = RunFolder(run_dir / st.name).read_metrics()
        if m is None:
            raise LongtailError(
                f"stage '{st.name}' ended without a readable metrics.json in "
                f"{run_dir / st.name}. Resume with `longtail train --resume {run_dir}`."
            )
        per_stage.append(m)
    out = dict(per_stage[-1])
    seconds = sum(m.get("train_seconds") or 0.0 for m in per_stage)
    images = sum(
        (m.get("images_per_s") or 0.0) * (m.get("train_seconds") or 0.0) for m in per_stage
    )
    out.update(
        {
            "epochs": sum(int(m.get("epochs") or 0) for m in per_stage),
            "train_seconds": seconds,
            "images_per_s": images / seconds if seconds else None,
            "final_stage": stages[-1].name,
            "stages": [stage_row(st, m, run_dir) for st, m in zip(stages, per_stage)],
        }
    )
    return out


def run_pipeline(
    cfg: Config,
    run_dir: Path,
    data_root: Path,
    resume: bool = False,
    overrides: Sequence[str] = (),
    source: Optional[Path] = None,
) -> Dict[str, Any]:
    """Run (or continue, ``resume``) the pipeline ``cfg`` into ``run_dir``; returns its metrics.

    ``cfg``: the pipeline as loaded (the config file with ``overrides`` applied) or, to resume,
    as ``run_dir/config.yaml`` recorded it; ``overrides``: the command line's ``key=value`` list
    (applied again to every stage); ``source``: the config file (relative stage ``config`` paths).
    """
    run_dir = Path(run_dir)
    stages = expand_stages(cfg, overrides, source, run_dir=run_dir.resolve())
    _, info = trainer.setup_process(cfg)
    created = False
    if not resume:
        rec = record(cfg, stages)
        created = trainer.prepare_run_dir(run_dir, False, info)
        if info.is_main:
            RunFolder(run_dir).write_config(rec)
    else:
        trainer.prepare_run_dir(run_dir, True, info)
    barrier(info)
    try:
        return _run_stages(stages, run_dir, data_root, overrides, info)
    except Exception:
        # a pipeline whose first stage never started leaves no folder behind (as a single run)
        if created and info.is_main and not any((run_dir / st.name).exists() for st in stages):
            RunFolder(run_dir).config_path.unlink(missing_ok=True)
            if not any(run_dir.iterdir()):
                run_dir.rmdir()
        raise


def _run_stages(
    stages: Sequence[Stage], run_dir: Path, data_root: Path, overrides: Sequence[str], info
) -> Dict[str, Any]:
    if info.is_main:
        print(
            f"pipeline: {len(stages)} stages -> {run_dir}/ ("
            + ", ".join(
                f"{st.name}: {st.cfg.method.name} {st.cfg.train.epochs} ep" for st in stages
            )
            + ")",
            flush=True,
        )

    for st in stages:
        folder = RunFolder(run_dir / st.name)
        tag = f"== stage {st.index + 1}/{len(stages)} '{st.name}'"
        if folder.is_finished():
            if info.is_main:
                print(f"{tag}: finished earlier ({folder.metrics_path}), skipped", flush=True)
            continue
        if folder.is_run():
            if info.is_main:
                print(f"{tag}: resuming {folder} (its saved {folder.CONFIG})", flush=True)
            saved = applicable_overrides(
                folder.config_tree(), split_selectors(overrides)[1], f"config {folder.config_path}"
            )
            trainer.fit(saved, folder.path, data_root, resume=True)
        else:
            if info.is_main:
                print(
                    f"{tag}: {st.cfg.method.name}, {st.cfg.train.epochs} epochs"
                    + (f", from {st.cfg.stage1}" if st.cfg.stage1 else ""),
                    flush=True,
                )
            trainer.fit(st.cfg, folder.path, data_root)
        barrier(info)

    metrics = pipeline_metrics(stages, run_dir)
    if info.is_main:
        RunFolder(run_dir).write_metrics(metrics)
        print(
            f"\npipeline {run_dir}: {len(stages)} stages; the final metrics are those of stage "
            f"'{stages[-1].name}' (all {len(metrics.get('class_counts') or [])} classes)"
        )
        print(summary_table(metrics["stages"]))
        print(f"\nmetrics: {RunFolder(run_dir).metrics_path}")
    barrier(info)
    return metrics
