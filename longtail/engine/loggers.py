"""Experiment loggers: the scalars of ``history.jsonl`` and the final metrics, sent to the tools
researchers use (``train.logger``: none | csv | tensorboard | wandb | mlflow, or a list).

Each logger has ``log_params(config)``, ``log_metrics(scalars, step)``, ``log_final(scalars,
step)`` and ``close()``; it imports its library when the run starts, and a missing library is a
ConfigError naming the pip extra. Only rank 0 logs. An epoch logs every numeric entry of its
history row (nested ones as ``test/top1``) at step = the epoch; the final metrics are logged as
``final/<key>`` at step = ``train.epochs``. Files go into the run folder (docs/logging.md).
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import io as text_io
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar, Dict, FrozenSet, List, Optional, Sequence, Type, Union, cast

import yaml

from longtail.core import io
from longtail.core.distributed import DistInfo, all_ok
from longtail.core.errors import ConfigError, LongtailError
from longtail.core.registry import Registry

LOGGERS = Registry("logger")
FINAL_PREFIX = "final/"
# final-metrics entries that are no scalars of the run's results
FINAL_SKIP = frozenset({"provenance", "groups", "class_counts", "per_class", "confusion"})


def scalars(
    tree: Dict[str, Any], prefix: str = "", skip: FrozenSet[str] = frozenset()
) -> Dict[str, float]:
    """Every int / float leaf of ``tree`` (nested dicts as ``a/b``; bools, None, lists, strings and
    the top-level keys in ``skip`` left out)."""
    out: Dict[str, float] = {}
    for key, value in tree.items():
        if key in skip:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def flat_params(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A config tree as ``{dotted.key: value}`` (lists and empty sections as one value)."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def logger_class(name: str) -> Type["RunLogger"]:
    """The registered logger class ``name`` (ConfigError listing the names otherwise)."""
    return cast(Type[RunLogger], LOGGERS.get(name))


def require(module: str, logger: str) -> Any:
    """``importlib.import_module(module)``; ConfigError naming the pip extra when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(missing_message(logger, err)) from None


def missing_message(logger: str, err: Optional[BaseException] = None) -> str:
    extra = logger_class(logger).extra
    why = f" ({err})" if err is not None else ""
    return (
        f"train.logger={logger} needs its library{why}: install it with "
        f'pip install "longtail[{extra}]", or choose another train.logger (csv needs nothing).'
    )


def _persistent_id(run_dir: Path, file_name: str) -> Optional[str]:
    path = run_dir / file_name
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class RunLogger:
    """One experiment logger of a run (subclass and register with ``@LOGGERS.register(name)``).

    ``OPTIONS``: the ``train.logger_params`` keys it reads; ``extra``: the pip extra that installs
    its library; ``module``: the module it imports (None: nothing to install)."""

    OPTIONS: ClassVar[FrozenSet[str]] = frozenset()
    extra: ClassVar[str] = ""
    module: ClassVar[Optional[str]] = None

    def __init__(self, run_dir: Path, params: Dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.params = params

    @property
    def run_name(self) -> str:
        return str(self.params.get("name") or self.run_dir.resolve().name)

    def log_params(self, config: Dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_final(self, metrics: Dict[str, float], step: int) -> None:
        self.log_metrics(metrics, step)

    def close(self) -> None:
        pass


@LOGGERS.register("csv")
class CSVLogger(RunLogger):
    """``metrics.csv``: one row per epoch (columns: epoch, then every scalar in order of first
    appearance; a later log of the same epoch fills its row); ``final_metrics.csv``: key, value."""

    FILE = "metrics.csv"
    FINAL_FILE = "final_metrics.csv"

    def __init__(self, run_dir: Path, params: Dict[str, Any]):
        super().__init__(run_dir, params)
        self.rows: Dict[int, Dict[str, float]] = {}
        path = self.run_dir / self.FILE
        if path.is_file():  # a resumed run: keep the epochs logged before
            for line in csv.DictReader(path.read_text().splitlines()):
                step = int(float(line.pop("epoch")))
                self.rows[step] = {k: float(v) for k, v in line.items() if v not in ("", None)}

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        self.rows.setdefault(int(step), {}).update(metrics)
        columns: Dict[str, None] = {}
        for row in self.rows.values():
            columns.update(dict.fromkeys(row))
        out = text_io.StringIO()
        writer = csv.DictWriter(out, ["epoch", *columns], lineterminator="\n")
        writer.writeheader()
        for step_ in sorted(self.rows):
            writer.writerow({"epoch": step_, **{k: repr(v) for k, v in self.rows[step_].items()}})
        io.atomic_write_text(self.run_dir / self.FILE, out.getvalue())

    def log_final(self, metrics: Dict[str, float], step: int) -> None:
        lines = ["key,value"] + [f"{k},{v!r}" for k, v in metrics.items()]
        io.atomic_write_text(self.run_dir / self.FINAL_FILE, "\n".join(lines) + "\n")


@LOGGERS.register("tensorboard")
class TensorBoardLogger(RunLogger):
    """Event files in ``tb/`` (torch.utils.tensorboard): a scalar per key and step, the config as
    text; view with ``tensorboard --logdir RUN_DIR/tb``."""

    extra = "tensorboard"
    module = "tensorboard"
    DIR = "tb"

    def __init__(self, run_dir: Path, params: Dict[str, Any]):
        super().__init__(run_dir, params)
        require("tensorboard", "tensorboard")  # torch.utils.tensorboard writes with it
        board = require("torch.utils.tensorboard", "tensorboard")
        self.writer = board.SummaryWriter(log_dir=str(self.run_dir / self.DIR))

    def log_params(self, config: Dict[str, Any]) -> None:
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()))

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@LOGGERS.register("mlflow")
class MLflowLogger(RunLogger):
    """An MLflow run (MlflowClient): experiment ``project`` (default ``longtail``), run name
    ``name`` (default: the run folder's), params = the config's dotted keys, metrics per step.
    Tracking URI: ``tracking_uri``, else $MLFLOW_TRACKING_URI, else a file store in
    ``RUN_DIR/mlruns`` (``mlflow ui --backend-store-uri RUN_DIR/mlruns``). A resumed run logs into
    the same MLflow run (its id is kept in ``mlflow_run_id.txt``)."""

    OPTIONS = frozenset({"project", "name", "tracking_uri", "tags"})
    extra = "mlflow"
    module = "mlflow"
    ID_FILE = "mlflow_run_id.txt"
    MAX_PARAMS = 100  # per log_batch call (MLflow's limit)
    MAX_METRICS = 1000
    MAX_VALUE = 500  # characters of a param value (MLflow's smallest limit)

    def __init__(self, run_dir: Path, params: Dict[str, Any]):
        super().__init__(run_dir, params)
        tracking = require("mlflow.tracking", "mlflow")
        self.entities = require("mlflow.entities", "mlflow")
        uri = params.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps the file store but refuses it unless asked: a local store is the point
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (self.run_dir / "mlruns").resolve().as_uri()
        self.client = tracking.MlflowClient(tracking_uri=str(uri))
        self.run_id = self._open_run(str(params.get("project") or "longtail"))
        self.known: Dict[str, str] = dict(self.client.get_run(self.run_id).data.params)

    def _open_run(self, project: str) -> str:
        previous = _persistent_id(self.run_dir, self.ID_FILE)
        if previous is not None:
            try:
                self.client.get_run(previous)
                return previous
            except Exception:  # noqa: BLE001 - another store, or deleted: start a new MLflow run
                pass
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(project)
        )
        tags = {str(t): "" for t in self.params.get("tags") or []}
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        io.atomic_write_text(self.run_dir / self.ID_FILE, run.info.run_id + "\n")
        return str(run.info.run_id)

    def log_params(self, config: Dict[str, Any]) -> None:
        Param = self.entities.Param
        values = {
            k: (v if isinstance(v, str) else json.dumps(v))[: self.MAX_VALUE]
            for k, v in flat_params(config).items()
        }
        # params are immutable in MLflow: a resumed run keeps the values it logged first
        new = [Param(k, v) for k, v in values.items() if k not in self.known]
        for i in range(0, len(new), self.MAX_PARAMS):
            self.client.log_batch(self.run_id, params=new[i : i + self.MAX_PARAMS])
        self.known.update(values)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        Metric = self.entities.Metric
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, int(step)) for k, v in metrics.items() if math.isfinite(v)]
        for i in range(0, len(items), self.MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=items[i : i + self.MAX_METRICS])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


@LOGGERS.register("wandb")
class WandbLogger(RunLogger):
    """A Weights & Biases run in ``RUN_DIR/wandb/``: offline unless ``mode`` or $WANDB_MODE says
    otherwise (``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later); project ``project``
    (default ``longtail``), ``name``, ``entity``, ``group``, ``tags``; the config as its config,
    each epoch's scalars at step = epoch, the final metrics in its summary. A resumed run
    continues the same wandb run (its id is kept in ``wandb_run_id.txt``)."""

    OPTIONS = frozenset({"project", "name", "mode", "entity", "group", "tags"})
    extra = "wandb"
    module = "wandb"
    ID_FILE = "wandb_run_id.txt"

    def __init__(self, run_dir: Path, params: Dict[str, Any]):
        super().__init__(run_dir, params)
        self.wandb = require("wandb", "wandb")
        self.mode = str(params.get("mode") or os.environ.get("WANDB_MODE") or "offline")
        run_id = _persistent_id(self.run_dir, self.ID_FILE) or uuid.uuid4().hex[:8]
        io.atomic_write_text(self.run_dir / self.ID_FILE, run_id + "\n")
        self.run = self.wandb.init(
            project=str(params.get("project") or "longtail"),
            name=self.run_name,
            entity=params.get("entity"),
            group=params.get("group"),
            tags=list(params.get("tags") or []) or None,
            dir=str(self.run_dir),
            mode=self.mode,
            id=run_id,
            resume="allow",
            settings=self.wandb.Settings(silent=True, console="off"),
        )

    def log_params(self, config: Dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=int(step))

    def log_final(self, metrics: Dict[str, float], step: int) -> None:
        self.run.summary.update(dict(metrics))

    def close(self) -> None:
        self.run.finish()


# ---------------------------------------------------------------------------------------------
# the config's side


def logger_names(logger: Union[str, Sequence[str], None]) -> List[str]:
    """``train.logger`` as a list of names (``none`` and repeats dropped)."""
    names = [logger] if isinstance(logger, str) or logger is None else list(logger)
    return list(dict.fromkeys(str(n) for n in names if n not in (None, "none", "")))


def params_for(name: str, params: Dict[str, Any]) -> Dict[str, Any]:
    """The ``train.logger_params`` of logger ``name``: the shared keys, with a section named after
    the logger (``logger_params: {mlflow: {project: x}}``) taking precedence."""
    own = params.get(name)
    shared = {k: v for k, v in params.items() if k not in LOGGERS}
    return {**shared, **(own if isinstance(own, dict) else {})}


def check_logger_config(logger: Union[str, Sequence[str]], params: Dict[str, Any]) -> List[str]:
    """Problems of ``train.logger`` / ``train.logger_params`` (unknown names or keys, a library
    that is not installed), one sentence each."""
    problems = []
    names = logger_names(logger)
    for name in names:
        if name not in LOGGERS:
            problems.append(
                f"'train.logger': no logger named {name!r}. Available: none, "
                f"{', '.join(LOGGERS.names())}."
            )
            continue
        module = logger_class(name).module
        if module is not None and importlib.util.find_spec(module) is None:
            problems.append(missing_message(name))
    known = set().union(*(logger_class(n).OPTIONS for n in LOGGERS.names()))
    for key, value in params.items():
        if key not in LOGGERS:
            if key not in known:
                problems.append(
                    f"unknown key 'train.logger_params.{key}'. The loggers' keys: "
                    f"{', '.join(sorted(known))} (or a section per logger: "
                    f"{', '.join(LOGGERS.names())})."
                )
            continue
        accepted = logger_class(key).OPTIONS
        if not isinstance(value, dict):
            problems.append(f"'train.logger_params.{key}' must be a mapping of {key}'s keys.")
            continue
        for bad in sorted(set(value) - accepted):
            problems.append(
                f"unknown key 'train.logger_params.{key}.{bad}'. The keys of {key}: "
                f"{', '.join(sorted(accepted)) or 'none'}."
            )
    return problems


# ---------------------------------------------------------------------------------------------
# the run's side


class Loggers:
    """The run's loggers together (none on ranks other than 0). A logger that fails while the run
    trains is reported on stderr and dropped: the training goes on."""

    def __init__(self, loggers: Sequence[RunLogger] = ()):
        self.loggers = list(loggers)

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def _each(self, what: str, *args: Any) -> None:
        for logger in list(self.loggers):
            try:
                getattr(logger, what)(*args)
            except Exception as err:  # noqa: BLE001 - a logging service must not stop training
                print(
                    f"warning: the {type(logger).__name__} failed ({type(err).__name__}: {err}); "
                    f"it logs nothing more in this run.",
                    file=sys.stderr,
                )
                self.loggers.remove(logger)

    def log_params(self, config: Dict[str, Any]) -> None:
        self._each("log_params", config)

    def log_epoch(self, row: Dict[str, Any]) -> None:
        """A history row: every scalar but the epoch, at step = the epoch."""
        self._each("log_metrics", scalars(row, skip=frozenset({"epoch"})), int(row["epoch"]))

    def log_final(self, metrics: Dict[str, Any], step: int) -> None:
        self._each("log_final", scalars(metrics, FINAL_PREFIX, skip=FINAL_SKIP), int(step))

    def close(self) -> None:
        self._each("close")
        self.loggers = []


def open_loggers(
    logger: Union[str, Sequence[str]],
    params: Dict[str, Any],
    run_dir: Path,
    info: DistInfo = DistInfo(),
) -> Loggers:
    """The loggers ``train.logger`` names, opened by rank 0 (every rank fails together)."""
    opened: List[RunLogger] = []
    error: Optional[LongtailError] = None
    if info.is_main:
        try:
            for name in logger_names(logger):
                opened.append(logger_class(name)(Path(run_dir), params_for(name, params)))
        except LongtailError as err:
            error = err
        except Exception as err:  # noqa: BLE001 - the library's own errors (a server, a login)
            error = LongtailError(
                f"train.logger: {name} could not start ({type(err).__name__}: {err}). Fix its "
                f"train.logger_params, or train without it (train.logger=none)."
            )
    if not all_ok(error is None, info):
        Loggers(opened).close()
        raise error or LongtailError("train.logger: rank 0 could not start its loggers.")
    return Loggers(opened)
