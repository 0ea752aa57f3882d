"""Benchmark suites: a YAML list of runs, each a config plus overrides, resolved into a plan.

A suite file (``configs/bench/<name>.yaml``) has the keys ``description``, ``epochs``,
``overrides``, ``data``, ``baseline``, ``runs`` (each: ``name``, ``config``, ``data``,
``overrides``, ``stage1``, ``imbalance_factor``, ``epochs``, ``method``, ``seeds``), ``seeds`` and
``checks``. A run's config: dataset file <- config <- suite overrides <- imbalance_factor <- run
overrides <- ``seed`` <- epochs scaling <- ``stage1``; ``{run:NAME}`` in overrides is an earlier
run's folder. A run with several ``seeds`` is planned once per seed: the first keeps the run's
name, the others are ``NAME-s<seed>``; its stage 1 and ``{run:NAME}`` references resolve to the
same seed of the named run where it has that seed (else to its first).
The format, the lookup of paths and the checks: docs/index.md ("Benchmark suites").
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from longtail.core.config import Config, apply_overrides, compose, split_selectors, validate
from longtail.core.errors import LongtailError
from longtail.core.scale import scaled_settings
from longtail.engine.config_check import check_config
from longtail.engine.pipeline import expand_stages

SUITE_KEYS = ("description", "epochs", "overrides", "data", "baseline", "seeds", "runs", "checks")
CHECK_KEYS = ("run", "beats", "by", "metrics", "claim")  # not "on": YAML reads it as true
# what a check compares: top-1 on test / val, or a test shot group, or val mean-class accuracy
CHECK_METRICS = ("test", "val", "many", "medium", "few", "val_mean_class")
RUN_KEYS = (
    "name",
    "config",
    "data",
    "overrides",
    "stage1",
    "imbalance_factor",
    "epochs",
    "method",
    "seeds",
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_RUN_REF = re.compile(r"\{run:([^{}]*)\}")
_INHERIT = object()  # a run without its own ``epochs`` key takes the suite's
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RunSpec:
    name: str
    config: Path
    overrides: List[str] = field(default_factory=list)
    stage1: Optional[str] = None
    imbalance_factor: Optional[float] = None
    epochs: Any = _INHERIT  # int, None (the config's own), or _INHERIT
    method: Optional[str] = None
    config_text: str = ""  # as written in the suite file
    data: Any = _INHERIT  # dataset selector (data=NAME), None, or _INHERIT
    seeds: Optional[List[int]] = None  # None: the config's own seed, once

    @property
    def label(self) -> str:
        return self.method or self.config.stem

    @property
    def needs(self) -> List[str]:
        """Earlier runs this one uses: ``stage1`` and every ``{run:NAME}`` of its overrides."""
        names = [self.stage1] if self.stage1 else []
        for o in self.overrides:
            names += [n for n in _RUN_REF.findall(o) if n not in names]
        return names


@dataclass
class Check:
    """A claim the suite's results must show: ``run`` beats ``beats`` by at least ``by`` points
    (0: at least as good) on every metric of ``metrics``."""

    run: str
    beats: str
    by: float = 0.0
    metrics: List[str] = field(default_factory=lambda: ["test", "val"])
    claim: str = ""

    def as_dict(self) -> Dict[str, Any]:
        return {
            "run": self.run,
            "beats": self.beats,
            "by": self.by,
            "metrics": list(self.metrics),
            "claim": self.claim,
        }


@dataclass
class Suite:
    name: str
    path: Path
    description: str = ""
    epochs: Optional[int] = None
    overrides: List[str] = field(default_factory=list)
    data: Optional[str] = None  # default dataset selector of the runs
    baseline: Optional[str] = None  # the method whose runs the time ratios compare with
    seeds: Optional[List[int]] = None  # the default of runs without their own
    runs: List[RunSpec] = field(default_factory=list)
    checks: List[Check] = field(default_factory=list)

    def run(self, name: str) -> RunSpec:
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(name)


@dataclass
class PlannedRun:
    """One run of a suite, resolved: its folder, the full override list and the config."""

    spec: RunSpec
    run_dir: Path
    overrides: List[str]  # everything after the config file, in order
    cfg: Optional[Config]  # None when the config could not be loaded
    base_epochs: Optional[int] = None  # train.epochs before scaling
    scaled: Dict[str, Any] = field(default_factory=dict)  # key -> (old, new)
    stage1_dir: Optional[Path] = None
    error: Optional[str] = None
    stages: List[Any] = field(default_factory=list)  # a multi-stage config's resolved stages
    seed: Optional[int] = None  # the seed this instance sets (None: the config's own)
    instance: str = ""  # the instance's name (the run's name for its first seed)
    needs: List[str] = field(default_factory=list)  # instances this one uses (stage1, {run:})

    @property
    def name(self) -> str:
        return self.instance or self.spec.name

    @property
    def group(self) -> str:
        """The suite run this instance belongs to (rows of one group are its seeds)."""
        return self.spec.name

    def train_argv(self, data_root: Optional[str] = None) -> List[str]:
        """``longtail train`` arguments that make this run (after ``python -m longtail``)."""
        argv = ["train", str(self.spec.config), *self.overrides, "--out", str(self.run_dir)]
        return argv + (["--data-root", str(data_root)] if data_root else [])


# ---------------------------------------------------------------------------------------------
# loading


def suite_dirs() -> List[Path]:
    """Where suite names are looked up: ./configs/bench, then the project's configs/bench."""
    out = [Path.cwd() / "configs" / "bench", PROJECT_ROOT / "configs" / "bench"]
    return list(dict.fromkeys(p.resolve() for p in out))


def find_suite(suite: str | Path) -> Path:
    """A suite file from a path or a name (``configs/bench/<name>.yaml``)."""
    path = Path(suite).expanduser()
    if path.is_file():
        return path.resolve()
    if path.suffix not in (".yaml", ".yml") and len(path.parts) == 1:
        for folder in suite_dirs():
            candidate = folder / f"{suite}.yaml"
            if candidate.is_file():
                return candidate
    known = sorted({p.stem for d in suite_dirs() if d.is_dir() for p in d.glob("*.yaml")})
    raise LongtailError(
        f"No benchmark suite {str(suite)!r}: pass a suite file or one of the names "
        f"in configs/bench/ ({', '.join(known) or 'none found'})."
    )


def _overrides(value: Any, where: str) -> List[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={json.dumps(v)}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        bad = [v for v in value if "=" not in v]
        if bad:
            raise LongtailError(
                f"{where}: override {bad[0]!r} is not of the form key=value (e.g. optim.lr=0.05)."
            )
        return list(value)
    raise LongtailError(
        f"{where}: 'overrides' must be a list of key=value strings or a mapping "
        f"of dotted keys to values, not {type(value).__name__}."
    )


def _epochs(value: Any, where: str, allow_null: bool) -> Optional[int]:
    if value is None and allow_null:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LongtailError(
            f"{where}: 'epochs' must be a positive integer"
            f"{' or null' if allow_null else ''}, got {value!r}."
        )
    return value


def _data(value: Any, where: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "=" in value:
        raise LongtailError(
            f"{where}: 'data' must name a dataset file (configs/datasets/NAME.yaml, "
            f"e.g. cifar10_lt) or be a path to one, got {value!r}."
        )
    return value.strip()


def _seeds(value: Any, where: str) -> Optional[List[int]]:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    ok = (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )
    if not ok or len(set(value)) != len(value):
        raise LongtailError(
            f"{where}: 'seeds' must be a list of distinct non-negative integers "
            f"(e.g. [0, 1, 2]), got {value!r}."
        )
    return list(value)


def instance_name(name: str, seed: Optional[int], first: Optional[int]) -> str:
    """A seed's instance of run ``name``: the run's own name for its first seed, else
    ``NAME-s<seed>``."""
    return name if seed is None or seed == first else f"{name}-s{seed}"


def instance_names(spec: RunSpec) -> List[str]:
    seeds = spec.seeds or [None]
    return [instance_name(spec.name, s, seeds[0]) for s in seeds]


def _baseline(value: Any, where: str) -> Optional[str]:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise LongtailError(
            f"{where}: 'baseline' must name the method (a run's label, e.g. ce) "
            f"whose runs the time ratios compare with, got {value!r}."
        )
    return None if value is None else value.strip()


def _unknown(keys: Sequence[str], allowed: Sequence[str], where: str) -> None:
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise LongtailError(
                f"{where}: unknown key '{key}'.{hint} Allowed keys: {', '.join(allowed)}."
            )


def resolve_config_path(text: str, suite_path: Path) -> Path:
    """A run's config: absolute, next to the suite file, in the project root, or in the cwd."""
    path = Path(text).expanduser()
    if path.is_absolute():
        return path
    roots = [suite_path.parent]
    for parent in suite_path.parents:  # the folder holding configs/
        if parent.name == "configs":
            roots.append(parent.parent)
            break
    roots += [PROJECT_ROOT, Path.cwd()]
    for root in roots:
        if (root / path).is_file():
            return (root / path).resolve()
    return (roots[-1] / path).resolve()  # missing: reported by load_suite/plan


def load_suite(suite: str | Path) -> Suite:
    """Read and check a suite file; unknown keys, duplicate names and bad stage1 references fail
    with a LongtailError naming the run and the key."""
    path = find_suite(suite)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise LongtailError(
            f"Suite file {path} is not valid YAML: {err}. Fix the syntax."
        ) from None
    where = f"Suite {path}"
    if not isinstance(data, dict):
        raise LongtailError(f"{where} must hold a mapping with a 'runs' list.")
    _unknown(list(data), SUITE_KEYS, where)
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise LongtailError(
            f"{where}: 'runs' must be a non-empty list of runs ({{name: ..., config: ...}})."
        )
    out = Suite(
        name=path.stem,
        path=path,
        description=str(data.get("description") or "").strip(),
        epochs=_epochs(data["epochs"], where, True) if "epochs" in data else None,
        overrides=_overrides(data.get("overrides"), where),
        data=_data(data.get("data"), where),
        baseline=_baseline(data.get("baseline"), where),
        seeds=_seeds(data.get("seeds"), where),
    )
    seen: Dict[str, int] = {}
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            raise LongtailError(
                f"{where}: run #{i + 1} must be a mapping with 'name' and 'config'."
            )
        name = run.get("name")
        rwhere = f"{where}, run '{name}'" if name else f"{where}, run #{i + 1}"
        _unknown(list(run), RUN_KEYS, rwhere)
        if not isinstance(name, str) or not _NAME.match(name):
            raise LongtailError(
                f"{rwhere}: 'name' must be a folder-safe string (letters, digits, "
                f"'.', '_', '-'), got {name!r}."
            )
        if name in seen:
            raise LongtailError(
                f"{where}: two runs are named '{name}' (#{seen[name] + 1} and "
                f"#{i + 1}); names must be unique."
            )
        seen[name] = i
        if not isinstance(run.get("config"), str):
            raise LongtailError(f"{rwhere}: 'config' (a YAML file) is required.")
        stage1 = run.get("stage1")
        if stage1 is not None and (
            not isinstance(stage1, str) or stage1 not in seen or stage1 == name
        ):
            raise LongtailError(
                f"{rwhere}: 'stage1: {stage1}' must name an earlier run of the suite "
                f"(known before it: {', '.join(n for n in seen if n != name) or 'none'})."
            )
        for ref in (
            n for o in _overrides(run.get("overrides"), rwhere) for n in _RUN_REF.findall(o)
        ):
            if ref not in seen or ref == name:
                raise LongtailError(
                    f"{rwhere}: '{{run:{ref}}}' in its overrides must name an earlier "
                    f"run of the suite (known before it: "
                    f"{', '.join(n for n in seen if n != name) or 'none'})."
                )
        factor = run.get("imbalance_factor")
        if factor is not None and (
            isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1
        ):
            raise LongtailError(
                f"{rwhere}: 'imbalance_factor' must be a number >= 1, got {factor!r}."
            )
        method = run.get("method")
        if method is not None and not isinstance(method, str):
            raise LongtailError(f"{rwhere}: 'method' (a table label) must be a string.")
        out.runs.append(
            RunSpec(
                name=name,
                config=resolve_config_path(run["config"], path),
                overrides=_overrides(run.get("overrides"), rwhere),
                stage1=stage1,
                imbalance_factor=factor,
                epochs=_epochs(run["epochs"], rwhere, True) if "epochs" in run else _INHERIT,
                method=method,
                config_text=run["config"],
                data=_data(run["data"], rwhere) if "data" in run else _INHERIT,
                seeds=_seeds(run["seeds"], rwhere) if "seeds" in run else out.seeds,
            )
        )
    taken: Dict[str, str] = {}
    for spec in out.runs:
        for name in instance_names(spec):
            if name in taken:
                raise LongtailError(
                    f"{where}: run '{spec.name}' (seeds {spec.seeds}) plans an instance "
                    f"'{name}', which is also "
                    + ("a run's name" if taken[name] == name else f"an instance of '{taken[name]}'")
                    + "; rename one of them."
                )
            taken[name] = spec.name
    out.checks = _checks(data.get("checks"), seen, where)
    return out


def _checks(value: Any, names: Dict[str, int], where: str) -> List[Check]:
    """The suite's ``checks:`` list, each naming two runs of the suite."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise LongtailError(
            f"{where}: 'checks' must be a list of {{run: A, beats: B, by: 2, "
            f"metrics: [test, val]}} mappings."
        )
    out = []
    for i, item in enumerate(value):
        cwhere = f"{where}, check #{i + 1}"
        if not isinstance(item, dict):
            raise LongtailError(f"{cwhere} must be a mapping with 'run' and 'beats'.")
        if True in item:
            raise LongtailError(
                f"{cwhere}: YAML reads the key 'on' as true; name the metrics with "
                f"'metrics: [test, val]'."
            )
        _unknown(list(item), CHECK_KEYS, cwhere)
        for key in ("run", "beats"):
            if item.get(key) not in names:
                raise LongtailError(
                    f"{cwhere}: '{key}: {item.get(key)}' must name a run of the suite."
                )
        by = item.get("by", 0.0)
        if isinstance(by, bool) or not isinstance(by, (int, float)):
            raise LongtailError(f"{cwhere}: 'by' must be a number of points, got {by!r}.")
        on = item.get("metrics", ["test", "val"])
        on = [on] if isinstance(on, str) else on
        bad = [m for m in on if m not in CHECK_METRICS] if isinstance(on, list) else [on]
        if bad or not on:
            raise LongtailError(
                f"{cwhere}: 'metrics' must list some of {', '.join(CHECK_METRICS)}; "
                f"got {item.get('metrics')!r}."
            )
        out.append(
            Check(item["run"], item["beats"], float(by), list(on), str(item.get("claim", "")))
        )
    return out


# ---------------------------------------------------------------------------------------------
# planning


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def plan_run(
    suite: Suite, spec: RunSpec, suite_dir: Path, seed: Optional[int] = None
) -> PlannedRun:
    """Resolve one run (one seed of it); a config that cannot be loaded or validated sets
    ``error``."""
    seeds = {r.name: r.seeds for r in suite.runs}

    def ref(name: str) -> str:  # the instance of run ``name`` this one uses: same seed if it has it
        theirs = seeds.get(name) or [None]
        return instance_name(name, seed if seed in theirs else theirs[0], theirs[0])

    instance = instance_name(spec.name, seed, (spec.seeds or [None])[0])
    run_dir = (suite_dir / instance).resolve()
    data = suite.data if spec.data is _INHERIT else spec.data
    overrides = ([f"data={data}"] if data is not None else []) + list(suite.overrides)
    if spec.imbalance_factor is not None:
        overrides.append(f"data.imbalance_factor={_fmt_number(spec.imbalance_factor)}")
    overrides += [
        _RUN_REF.sub(lambda m: str((suite_dir / ref(m.group(1))).resolve()), o)
        for o in spec.overrides
    ]
    if seed is not None:
        overrides.append(f"seed={seed}")
    planned = PlannedRun(spec, run_dir, overrides, None, seed=seed, instance=instance)
    planned.needs = [ref(n) for n in spec.needs]
    where = f"Suite {suite.path}, run '{instance}'"
    if not spec.config.is_file():
        planned.error = (
            f"{where}: config {spec.config_text} not found (looked next to the suite, "
            f"in {PROJECT_ROOT} and in {Path.cwd()})."
        )
        return planned
    try:
        selectors, _ = split_selectors(overrides)
        tree = compose(spec.config, selectors)
        cfg = validate(
            apply_overrides(tree, split_selectors(overrides)[1]), f"config {spec.config}"
        )
        planned.base_epochs = cfg.train.epochs
        epochs = suite.epochs if spec.epochs is _INHERIT else spec.epochs
        if epochs is not None:
            planned.scaled = scaled_settings(cfg, epochs)
            overrides += [f"{k}={json.dumps(new)}" for k, (_, new) in planned.scaled.items()]
        if spec.stage1 is not None:
            planned.stage1_dir = (suite_dir / ref(spec.stage1)).resolve()
            overrides.append(f"stage1={planned.stage1_dir}")
        planned.cfg = validate(
            apply_overrides(tree, split_selectors(overrides)[1]), f"config {spec.config}"
        )
        if planned.cfg.stages:  # a pipeline: its stages follow the scaled settings (epochs_scale)
            planned.stages = expand_stages(
                planned.cfg, overrides, source=spec.config, run_dir=run_dir
            )
        else:
            check_config(planned.cfg, f"config {spec.config}")
    except LongtailError as err:
        planned.error = f"{where}: {err}"
    return planned


def plan_suite(suite: Suite, out_root: Path) -> List[PlannedRun]:
    """Every run of the suite (each seed of it) resolved against ``out_root/<suite name>/``."""
    suite_dir = Path(out_root) / suite.name
    return [
        plan_run(suite, spec, suite_dir, seed)
        for spec in suite.runs
        for seed in spec.seeds or [None]
    ]


def check_plan(plan: Sequence[PlannedRun]) -> None:
    """Raise the first planning error (config missing, unknown config key, ...)."""
    for p in plan:
        if p.error:
            raise LongtailError(p.error)
