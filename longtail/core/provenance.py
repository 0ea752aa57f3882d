"""Provenance of a run: which code, software, machine and data produced its numbers.

``provenance(data, data_cfg, device)`` is the ``provenance`` entry of ``metrics.json``: the package
version, the git commit of the checkout it ran from (with a dirty flag; None when installed from
a wheel), torch / CUDA / cuDNN versions, the device's name, the command line, the class names and
the dataset's identity. Two runs trained on the same images have the same
``dataset.sha256.train``: the sha256 of the training set's indices into the official split
(int64, little-endian) followed by its labels (int64, little-endian); likewise for val and test.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from longtail.core.config import DataConfig

PACKAGE = "longtail"
GIT_TIMEOUT_S = 2.0
_CHECKOUT = Path(__file__).resolve().parents[2]  # the folder holding longtail/ (a repo root?)


def package_version() -> Optional[str]:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(
            ["git", "-C", str(_CHECKOUT), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> Dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` when the package runs from a git checkout (its
    repository root holds this ``longtail/``), ``{"commit": None, "dirty": None}`` otherwise
    (an installed wheel, no git, or git taking longer than GIT_TIMEOUT_S)."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != _CHECKOUT:
        return {"commit": None, "dirty": None}
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def cpu_name() -> str:
    """The CPU's model string (/proc/cpuinfo on Linux), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({cpu_name()})"
    return cpu_name()


def software(device: torch.device) -> Dict[str, Any]:
    cuda = device.type == "cuda" and torch.cuda.is_available()
    return {
        "longtail": package_version(),
        **git_state(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # the CUDA torch was built with (None: a CPU build)
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name(device),
        "command": list(sys.argv),
    }


def split_sha256(indices: Any, labels: Any) -> str:
    """sha256 of a split's indices (int64 LE) then its labels (int64 LE), hex."""
    h = hashlib.sha256()
    for values in (indices, labels):
        if isinstance(values, torch.Tensor):
            values = values.numpy()
        h.update(np.ascontiguousarray(np.asarray(values), dtype="<i8").tobytes())
    return h.hexdigest()


def dataset_identity(data: Any, data_cfg: DataConfig) -> Dict[str, Any]:
    """The data a run trained and was evaluated on. ``data``: a data bundle (``name``, ``train``
    / ``val`` / ``test`` with ``indices`` and ``labels``, ``class_counts``)."""
    counts: List[int] = [int(n) for n in data.class_counts]
    present = [n for n in counts if n > 0]
    splits = {s: getattr(data, s, None) for s in ("train", "val", "test")}
    return {
        "name": data.name,
        "config_name": data_cfg.dataset,
        "imbalance_factor": data_cfg.imbalance_factor,
        "profile": data_cfg.profile,
        "subset_seed": data_cfg.subset_seed,
        "max_per_class": data_cfg.max_per_class,
        "max_test_per_class": data_cfg.max_test_per_class,
        "measured_imbalance": max(present) / min(present) if present else None,
        "num_classes": len(counts),
        "images": {s: (len(part) if part is not None else 0) for s, part in splits.items()},
        "sha256": {
            s: split_sha256(part.indices, part.labels)
            for s, part in splits.items()
            if part is not None
        },
    }


def provenance(data: Any, data_cfg: DataConfig, device: torch.device) -> Dict[str, Any]:
    """The ``provenance`` entry of metrics.json (see the module docstring)."""
    classes = getattr(data.train, "classes", None)
    return {
        **software(device),
        "classes": list(classes) if classes is not None else None,
        "dataset": dataset_identity(data, data_cfg),
    }
