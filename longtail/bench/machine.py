"""Machine facts, git commit and command line for benchmark results.

The repository's ``benchmarks/_common.py`` (shared by the scripts in ``benchmarks/``) is the one
implementation; it is loaded from the source tree this package sits in. Where the package runs
without that tree (an installed wheel), small fall-backs give the same keys.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
_ENV_KEYS = ("LONGTAIL_DATA", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


@lru_cache(maxsize=1)
def _common() -> Optional[ModuleType]:
    path = REPO_ROOT / "benchmarks" / "_common.py"
    if not path.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location("longtail_benchmarks_common", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module
    except Exception:  # a broken helper must not stop a benchmark from recording its numbers
        return None


def machine_info() -> Dict[str, Any]:
    """platform, python, cpu_model, cpu_count, usable_cores, torch, torch_num_threads, cuda, ..."""
    common = _common()
    if common is not None:
        return common.machine_info()
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_model": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "usable_cores": cores, "torch": torch.__version__,
            "torch_num_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            **({"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
               if torch.cuda.is_available() else {})}


def git_info() -> Dict[str, Any]:
    """``commit`` (HEAD), ``dirty`` (working tree differs) and ``changed_files``."""
    common = _common()
    if common is not None:
        return common.git_info(REPO_ROOT)

    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    changed = [line[3:] for line in (status or "").splitlines() if line.strip()]
    return {"commit": commit.strip() if commit else None,
            "dirty": bool(changed) if status is not None else None, "changed_files": changed}


def environment() -> Dict[str, str]:
    """The environment variables that change what a run does or measures (those that are set)."""
    return {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}


def short_machine(info: Dict[str, Any]) -> str:
    """One line: CPU (cores), GPU if any, torch version, platform."""
    gpu = f", GPU {', '.join(info['gpus'])}" if info.get("gpus") else ""
    cores = info.get("usable_cores", info.get("cpu_count"))
    return (f"{info.get('cpu_model', '?')} ({cores} usable cores, torch threads "
            f"{info.get('torch_num_threads', '?')}){gpu}; torch {info.get('torch', '?')}; "
            f"{info.get('platform', '?')}; Python {info.get('python', sys.version.split()[0])}")
