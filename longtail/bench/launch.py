"""Where a suite's runs execute: in this process, in N local processes at once, or as submitit
jobs (SLURM, or submitit's local executor).

Every launcher takes a :class:`Job` (one ``longtail train`` invocation) and returns a handle with
``done()`` and ``result()`` (a dict with the exit status ``rc`` and the job's own ``wall``
seconds), so the suite runner schedules them all alike. Parallel runs give the numbers each gives
alone with the same settings: a run's result depends on its config, its seed and its torch thread
count (set per job with ``threads``), never on what runs beside it.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol

import torch

from longtail.core.errors import LongtailError

LAUNCHERS = ("local", "slurm", "submitit-local")
# submitit parameters set unless the command line names them (AutoExecutor.update_parameters)
SUBMITIT_DEFAULTS: Dict[str, Any] = {"timeout_min": 720, "nodes": 1, "tasks_per_node": 1}


@dataclass
class Job:
    """One ``python -m longtail <argv>`` with its thread count, GPU and log file."""

    name: str
    argv: List[str]
    log: Optional[Path] = None  # None: inherit this process's output
    threads: Optional[int] = None  # torch intra-op threads (None: torch's default)
    env: Dict[str, str] = field(default_factory=dict)


def job_env(threads: Optional[int], extra: Dict[str, str]) -> Dict[str, str]:
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra)
    return env


def execute(job: Job) -> Dict[str, Any]:
    """Run ``job`` as a child process; its exit status and wall seconds. Runs in a worker thread
    of this process or inside a submitit job (it must stay importable and picklable)."""
    cmd = [sys.executable, "-m", "longtail", *job.argv]
    start = time.perf_counter()
    if job.log is None:
        rc = subprocess.run(cmd, env=job_env(job.threads, job.env)).returncode
    else:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=job_env(job.threads, job.env)
            ).returncode
    return {"rc": rc, "wall": time.perf_counter() - start}


class Handle(Protocol):
    def done(self) -> bool: ...

    def result(self) -> Dict[str, Any]: ...


class Launcher(Protocol):
    slots: int  # runs at a time
    mode: str  # recorded in each run's bench.json
    poll: float  # seconds between looks at running jobs
    where: str  # for the log line

    def submit(self, job: Job, inline: Callable[[], None]) -> Handle: ...

    def close(self) -> None: ...


class InlineLauncher:
    """One run at a time in this process (``inline()``: the trainer called directly)."""

    slots, poll, where, mode = 1, 0.0, "in-process", "in-process"

    def __init__(self, threads: Optional[int] = None):
        self.threads = threads

    def submit(self, job: Job, inline: Callable[[], None]) -> Handle:
        future: concurrent.futures.Future = concurrent.futures.Future()
        before = torch.get_num_threads()
        start = time.perf_counter()
        try:
            if self.threads:
                torch.set_num_threads(self.threads)
            inline()
            future.set_result({"rc": 0, "wall": time.perf_counter() - start})
        except Exception as err:  # reported by the runner; KeyboardInterrupt propagates
            future.set_exception(err)
        finally:
            torch.set_num_threads(before)
        return future

    def close(self) -> None:
        pass


class ProcessLauncher:
    """Up to ``slots`` child processes at once on this machine. With several CUDA devices each
    slot uses one (slot k: device k mod count); with one, every run shares it."""

    poll = 0.05

    def __init__(self, slots: int, gpus: int = 0):
        self.slots, self.gpus = slots, gpus
        self.where = f"{slots} local process{'es' if slots > 1 else ''}"
        self.mode = "subprocess" if slots == 1 else f"{slots} processes"
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=slots)
        self.free = list(range(slots))
        self.lock = threading.Lock()

    def submit(self, job: Job, inline: Callable[[], None]) -> Handle:
        with self.lock:
            slot = self.free.pop(0)
        if self.gpus > 1:
            job.env.setdefault("CUDA_VISIBLE_DEVICES", str(slot % self.gpus))
        future = self.pool.submit(execute, job)

        def release(_: Any) -> None:
            with self.lock:
                self.free.append(slot)

        future.add_done_callback(release)
        return future

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class SubmititLauncher:
    """One submitit job per run: SLURM (``cluster="slurm"``) or submitit's local executor
    (``cluster="local"``, for trying a suite's jobs without a cluster). ``params`` go to
    ``AutoExecutor.update_parameters`` (e.g. ``slurm_partition``, ``gpus_per_node``,
    ``cpus_per_task``, ``timeout_min``); parameters of the other cluster kind are ignored."""

    poll = 1.0

    def __init__(self, folder: Path, cluster: str, slots: int, params: Dict[str, Any]):
        try:
            import submitit
        except ImportError:
            raise LongtailError(
                "--launcher slurm / submitit-local needs submitit: "
                "pip install 'longtail[cluster]' (or pip install submitit)."
            ) from None
        self.slots, self.mode = slots, f"submitit-{cluster}"
        self.where = f"submitit ({cluster}), {slots} job(s) at a time, logs in {folder}"
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        try:
            self.executor.update_parameters(**{**SUBMITIT_DEFAULTS, **params})
        except (TypeError, ValueError) as err:
            raise LongtailError(f"--slurm: submitit refused the parameters ({err}).") from None

    def submit(self, job: Job, inline: Callable[[], None]) -> Handle:
        self.executor.update_parameters(name=f"longtail-{job.name}")
        return self.executor.submit(execute, job)

    def close(self) -> None:
        pass


def make_launcher(
    kind: str,
    jobs: int,
    subprocess_mode: bool,
    folder: Path,
    threads: Optional[int],
    params: Dict[str, Any],
) -> Launcher:
    if kind not in LAUNCHERS:
        raise LongtailError(f"--launcher {kind!r}: use one of {', '.join(LAUNCHERS)}.")
    if jobs < 1:
        raise LongtailError(f"--jobs must be >= 1, got {jobs}.")
    if kind == "slurm":
        return SubmititLauncher(folder, "slurm", jobs, params)
    if kind == "submitit-local":
        return SubmititLauncher(folder, "local", jobs, params)
    if jobs == 1 and not subprocess_mode:
        return InlineLauncher(threads)
    return ProcessLauncher(jobs, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def default_threads(kind: str, jobs: int, cores: int, params: Dict[str, Any]) -> Optional[int]:
    """Torch threads per run: the cores split between the local runs at once (None: torch's own
    default, for a single run or a cluster job that sets ``cpus_per_task``)."""
    if kind == "local":
        return None if jobs == 1 else max(1, cores // jobs)
    cpus = params.get("cpus_per_task")
    return int(cpus) if cpus else None


def wait_any(handles: List[Handle], poll: float) -> List[Handle]:
    """Block until at least one handle is done; the done ones."""
    while True:
        done = [h for h in handles if h.done()]
        if done or not handles:
            return done
        time.sleep(poll)
