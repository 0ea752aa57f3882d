"""Machine facts, git commit and command line recorded with every benchmark result.

The one implementation, used by ``longtail bench`` and by the scripts in ``benchmarks/`` alike, so a
number can always be traced to the code, the machine and the exact invocation that produced it.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]

# environment variables that change what a run does or measures; recorded when set
_ENV_KEYS = (
    "LONGTAIL_DATA",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "KMP_AFFINITY",
    "OMP_PROC_BIND",
    "DNNL_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    "CUDA_VISIBLE_DEVICES",
)


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """CPU cores this process may run on (affinity mask where the OS exposes one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_info() -> Dict[str, Any]:
    """Platform, CPU, core counts, torch build and its thread settings (call after setting threads)."""
    import torch

    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": _cpu_capability(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    try:
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        pass
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _cpu_capability() -> Optional[str]:
    import torch

    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        return None


def git_info(repo: Path = REPO_ROOT, ignore: Sequence[Path] = ()) -> Dict[str, Any]:
    """``git rev-parse HEAD`` and whether the working tree differs from it (tracked or untracked).
    ``ignore``: files that do not count, such as a suite's own result files, which it rewrites after
    every batch and which would otherwise mark every later run of the suite dirty."""

    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(
                ["git", *args], cwd=repo, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    skip = {_repo_relative(Path(p), repo) for p in ignore}
    changed = [line[3:] for line in (status or "").splitlines() if line.strip()]
    changed = [f for f in changed if f not in skip]
    return {
        "commit": commit.strip() if commit else None,
        "dirty": bool(changed) if status is not None else None,
        "changed_files": changed,
    }


def _repo_relative(path: Path, repo: Path) -> str:
    """``path`` as ``git status --porcelain`` names it: relative to the repository, '/'-separated."""
    try:
        return Path(path).resolve().relative_to(Path(repo).resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def command_info() -> Dict[str, Any]:
    """The exact command line (re-runnable from ``cwd``) and the environment that affects it."""
    return {
        "command": shlex.join(["python", *sys.argv]),
        "argv": list(sys.argv),
        "python_executable": sys.executable,
        "cwd": os.getcwd(),
        "env": {k: os.environ[k] for k in _ENV_KEYS if k in os.environ},
    }


def environment() -> Dict[str, str]:
    """The environment variables that change what a run does or measures (those that are set)."""
    return {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}


def short_machine(info: Dict[str, Any]) -> str:
    """One line: CPU (cores), GPU if any, torch version, platform."""
    gpu = f", GPU {', '.join(info['gpus'])}" if info.get("gpus") else ""
    cores = info.get("usable_cores", info.get("cpu_count"))
    return (
        f"{info.get('cpu_model', '?')} ({cores} usable cores, torch threads "
        f"{info.get('torch_num_threads', '?')}){gpu}; torch {info.get('torch', '?')}; "
        f"{info.get('platform', '?')}; Python {info.get('python', sys.version.split()[0])}"
    )
