"""The run folder: the one place that knows its layout.

=========================  ==========================================================
``config.yaml``            the resolved config (written first; marks the folder as a run)
``history.jsonl``          one JSON line per finished epoch
``last.pt``                the resumable state (``torch.load(weights_only=True)``)
``model.safetensors``      the final weights
``metrics.json``           the final metrics (written last; marks the run as finished)
``per_class_accuracy.png`` accuracy against class frequency
``training_curves.png``    loss, lr and the evaluations per epoch
``confusion_matrix.png``   the test confusion matrix (classes by frequency, binned above 30)
``method_curves.png``      a method's / hook's own per-epoch numbers (when it records any)
``resumes.jsonl``          one line per resume that changed a setting (what, when)
``.lock``                  held (exclusively) by the process training into the folder
anything else              artifacts of methods and hooks (``artifact(name)``)
=========================  ==========================================================
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import filelock
import yaml

from longtail.core import io
from longtail.core.config import Config, load_yaml_tree, validate
from longtail.core.errors import LongtailError


class RunFolder:
    CONFIG = "config.yaml"
    HISTORY = "history.jsonl"
    CHECKPOINT = "last.pt"
    WEIGHTS = "model.safetensors"
    METRICS = "metrics.json"
    PER_CLASS_PLOT = "per_class_accuracy.png"
    RESUMES = "resumes.jsonl"
    LOCK = ".lock"
    LOCK_PID = ".lock.pid"

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # -- paths -------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def history_path(self) -> Path:
        return self.path / self.HISTORY

    @property
    def checkpoint_path(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def weights_path(self) -> Path:
        return self.path / self.WEIGHTS

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def plot_path(self) -> Path:
        return self.path / self.PER_CLASS_PLOT

    def artifact(self, name: str) -> Path:
        return self.path / name

    # -- state -------------------------------------------------------------------------------
    def is_run(self) -> bool:
        return self.config_path.is_file()

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def has_weights(self) -> bool:
        return self.weights_path.is_file()

    def is_finished(self) -> bool:
        return self.metrics_path.is_file()

    def epochs_done(self) -> int:
        """Lines in history.jsonl (0 when there is none)."""
        try:
            return sum(1 for line in self.history_path.read_text().splitlines() if line.strip())
        except OSError:
            return 0

    def user_files(self) -> List[str]:
        """What the folder holds besides the lock (sorted names)."""
        if not self.path.is_dir():
            return []
        return sorted(
            p.name for p in self.path.iterdir() if p.name not in (self.LOCK, self.LOCK_PID)
        )

    def remove_if_unused(self) -> bool:
        """Delete the folder if it holds nothing but its lock files (a run that never started)."""
        if not self.path.is_dir() or self.user_files():
            return False
        for name in (self.LOCK, self.LOCK_PID):
            (self.path / name).unlink(missing_ok=True)
        self.path.rmdir()
        return True

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder exclusively (a second process is refused at once, naming the holder's
        pid); released when the block ends or the process dies, kill -9 included. Stale temp
        files of killed writes are removed once the lock is held."""
        lock_path = self.path / self.LOCK
        lock = filelock.FileLock(str(lock_path), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            try:
                holder = (self.path / self.LOCK_PID).read_text().strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise LongtailError(
                f"{self.path} is in use by another longtail process (pid {holder}). Wait for it "
                f"to finish, or train into another folder with --out DIR."
            ) from None
        try:
            (self.path / self.LOCK_PID).write_text(f"{os.getpid()}\n")
            io.remove_stale_temporaries(self.path)
            yield
        finally:
            (self.path / self.LOCK_PID).unlink(missing_ok=True)
            lock.release()

    # -- config ------------------------------------------------------------------------------
    def write_config(self, cfg: Config, exclusive: bool = False) -> None:
        """The run's identity; ``exclusive``: create it (FileExistsError if the folder already
        holds a run)."""
        io.atomic_write(
            self.config_path, lambda tmp: tmp.write_text(cfg.to_yaml()), exclusive=exclusive
        )

    def config_tree(self) -> Dict[str, Any]:
        """The saved config as a YAML tree; LongtailError when missing or unreadable."""
        if not self.is_run():
            raise LongtailError(
                f"{self.path} is not a run folder (no {self.CONFIG}). Pass the "
                f"folder that `longtail train` wrote, e.g. runs/<name>."
            )
        try:
            return load_yaml_tree(self.config_path)
        except (yaml.YAMLError, OSError) as err:
            raise LongtailError(f"{self.config_path} cannot be read ({err}).") from None

    def load_config(self) -> Config:
        return validate(self.config_tree(), f"config {self.config_path}")

    # -- history -----------------------------------------------------------------------------
    def read_history(self, upto_epoch: Optional[int] = None) -> List[Dict[str, Any]]:
        """History rows (of epochs <= upto_epoch: later ones belong to an interrupted epoch)."""
        if not self.history_path.exists():
            return []
        rows = []
        for number, line in enumerate(self.history_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                int(row["epoch"])
            except (ValueError, KeyError, TypeError) as err:
                raise LongtailError(
                    f"{self.history_path} line {number} is not a history row ({err}). Restore the "
                    f"file, or delete that line and the ones after it and resume (the epochs after "
                    f"the checkpoint are trained again)."
                ) from None
            rows.append(row)
        return rows if upto_epoch is None else [r for r in rows if r["epoch"] <= upto_epoch]

    def write_history(self, rows: List[Dict[str, Any]]) -> None:
        io.atomic_write_text(self.history_path, "".join(io.to_json(r) + "\n" for r in rows))

    def record_resume(self, changes: Dict[str, Any]) -> None:
        """Append ``{utc, changes}`` to resumes.jsonl (the settings a resume changed)."""
        path = self.path / self.RESUMES
        old = path.read_text() if path.exists() else ""
        line = io.to_json(
            {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "changes": changes}
        )
        io.atomic_write_text(path, old + line + "\n")

    # -- checkpoint, weights, metrics --------------------------------------------------------
    def save_checkpoint(self, state: Dict[str, Any]) -> None:
        io.save_checkpoint(self.checkpoint_path, state)

    def load_checkpoint(self) -> Dict[str, Any]:
        return io.load_checkpoint(self.checkpoint_path)

    def save_weights(self, state_dict, metadata: Dict[str, str]) -> None:
        io.save_weights(self.weights_path, state_dict, metadata)

    def load_weights(self):
        try:
            return io.load_weights(self.weights_path)
        except FileNotFoundError:
            raise LongtailError(
                f"{self.weights_path} does not exist: the run has not finished."
            ) from None
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise LongtailError(
                f"{self.weights_path} cannot be read ({err}); it is corrupt or not "
                f"written by longtail. Train the run again."
            ) from None

    def write_metrics(self, metrics: Dict[str, Any]) -> None:
        io.atomic_write_json(self.metrics_path, metrics)

    def read_metrics(self) -> Optional[Dict[str, Any]]:
        try:
            return json.loads(self.metrics_path.read_text())
        except (OSError, ValueError):
            return None
