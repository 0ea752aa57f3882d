"""``train.amp=auto``: the precision a run trains in, chosen once when it is built.

CUDA: bf16 autocast where the GPU has native bf16, else fp32. CPU: bf16 only where the CPU has
native bf16 (AVX512-BF16 / AMX-BF16, Arm BF16) *and* a short probe (a few SGD steps of a copy of
the run's model, fp32 vs bf16 autocast) shows it faster by ``MIN_SPEEDUP``: bf16 autocast is
~1.5x faster than fp32 on such CPUs and many times slower on the others. The probe's verdict is
cached per machine and setting under ``($XDG_CACHE_HOME or ~/.cache)/longtail/amp-auto/``;
``$LONGTAIL_AMP_AUTO`` (none | bf16 | measure) fixes the outcome without measuring (CI, tests).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.core.errors import ConfigError, LongtailError
from longtail.core.io import atomic_write_json

ENV = "LONGTAIL_AMP_AUTO"
ENV_CHOICES = ("none", "bf16", "measure")
MIN_SPEEDUP = 1.1  # bf16 must be at least this much faster than fp32 to be chosen
PROBE_STEPS = 3  # timed steps of each precision, alternated; the medians are compared
PROBE_BUDGET_S = 6.0  # no further timed steps once the probe has run this long
PROBE_MAX_BATCH = 128  # the probe's batch: the run's, at most this
PROBE_SCOUT_BATCH = 16  # the batch of the first, scouting step of each precision
PROBE_FAR_SLOWER = 4.0  # bf16's scout step this many times fp32's: fp32, without timing more
CACHE_FORMAT = 1

# x86 / arm64 features (torch.cpu.get_capabilities names, /proc/cpuinfo flags) that mean bf16
# arithmetic in hardware rather than emulated through fp32
_NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")
_CPUINFO_BF16 = ("avx512_bf16", "amx_bf16", "bf16", "svebf16")


def _proc_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpu_bf16_features() -> Tuple[str, ...]:
    """The native-bf16 features of this CPU (empty: none), from ``torch.cpu.get_capabilities``
    (recent torch) or else the ``flags`` / ``Features`` lines of /proc/cpuinfo."""
    caps_fn: Optional[Callable[[], Any]] = getattr(torch.cpu, "get_capabilities", None)
    if caps_fn is not None:
        try:
            caps = caps_fn()
            return tuple(name for name in _NATIVE_BF16 if caps.get(name) is True)
        except Exception:  # a cpuinfo failure: fall back to the kernel's view
            pass
    flags: set = set()
    for line in _proc_cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return tuple(name for name in _CPUINFO_BF16 if name in flags)


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (bf16 autocast can beat fp32 there)."""
    return bool(cpu_bf16_features())


def cuda_has_native_bf16(device: torch.device) -> bool:
    """True where this GPU (``device``, not the current one) has bf16 in hardware: compute
    capability 8.0+ (or ROCm); ``torch.cuda.is_bf16_supported()`` also counts emulation."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    for line in _proc_cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("model name", "hardware", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


# ---------------------------------------------------------------------------------------------
# the probe


def _logits(out: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, an object with ``logits`` or a tuple's first."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise LongtailError(f"The precision probe cannot read logits from a {type(out).__name__}.")


@dataclass(frozen=True)
class ProbeResult:
    fp32_s: float  # median seconds of one training step in fp32
    bf16_s: float  # ... in bf16 autocast
    timed_steps: int  # full-batch timed steps of each precision (0: the scout decided)
    seconds: float  # the whole probe, warm-up included

    @property
    def speedup(self) -> float:
        return self.fp32_s / max(self.bf16_s, 1e-12)


def measure_step_seconds(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    channels_last: bool = False,
    steps: int = PROBE_STEPS,
    budget_s: float = PROBE_BUDGET_S,
) -> ProbeResult:
    """Time training steps (forward, cross-entropy, backward, SGD step) of a deep copy of
    ``model`` on random CPU data of ``[min(batch_size, PROBE_MAX_BATCH), *input_shape]``, in fp32
    and in bf16 autocast: two scout steps of each on a small batch (bf16 far slower there: stop,
    ``timed_steps`` 0), one untimed warm-up step of each, then up to ``steps`` timed steps of
    each, alternated so that drift in the machine's speed hits both, stopping early once
    ``budget_s`` is spent. Neither ``model`` nor the global RNG state is changed."""
    start = time.perf_counter()
    rng = torch.get_rng_state()
    try:
        # Any: torch's stubs of Module.to lack memory_format, which it takes
        probe: Any = copy.deepcopy(model).cpu().train()
        gen = torch.Generator().manual_seed(0)
        batch = max(1, min(int(batch_size), PROBE_MAX_BATCH))
        x = torch.randn((batch, *input_shape), generator=gen)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
            probe = probe.to(memory_format=torch.channels_last)
        with torch.no_grad():
            classes = _logits(probe(x[:1])).shape[-1]
        y = torch.randint(0, classes, (batch,), generator=gen)
        params = [p for p in probe.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9) if params else None

        def step(bf16: bool, n: int = batch) -> float:
            begin = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(_logits(probe(x[:n])).float(), y[:n])
            if opt is not None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return time.perf_counter() - begin

        # the scout: where bf16 is emulated it is ~10x slower, and a full batch of it is costly;
        # its second round is compared (the first pays one-off set-up: lazy init, oneDNN kernels)
        small = min(batch, PROBE_SCOUT_BATCH)
        scout: Dict[bool, float] = {}
        for _ in range(2):
            scout = {bf16: step(bf16, small) for bf16 in (False, True)}
        if scout[True] > PROBE_FAR_SLOWER * scout[False]:
            return ProbeResult(scout[False], scout[True], 0, time.perf_counter() - start)
        step(False)  # warm-up at the full batch (oneDNN primitives are made per shape)
        step(True)
        times: Dict[bool, List[float]] = {False: [], True: []}
        for i in range(max(1, steps)):
            for bf16 in (False, True) if i % 2 == 0 else (True, False):
                times[bf16].append(step(bf16))
            if time.perf_counter() - start > budget_s:
                break
        return ProbeResult(
            statistics.median(times[False]),
            statistics.median(times[True]),
            len(times[False]),
            time.perf_counter() - start,
        )
    finally:
        torch.set_rng_state(rng)


# ---------------------------------------------------------------------------------------------
# the cache


def cache_dir() -> Path:
    """``($XDG_CACHE_HOME or ~/.cache)/longtail/amp-auto``: one JSON file per probed setting."""
    base = os.environ.get("XDG_CACHE_HOME", "") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "longtail" / "amp-auto"


def probe_key(
    arch: str, input_shape: Sequence[int], batch_size: int, channels_last: bool
) -> Dict[str, Any]:
    """What a verdict depends on: this machine (CPU, its bf16 features, torch, threads) and the
    run (architecture signature, input shape, batch size, memory format)."""
    return {
        "format": CACHE_FORMAT,
        "cpu": cpu_model_name(),
        "cpu_bf16": list(cpu_bf16_features()),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "arch": arch,
        "input_shape": [int(s) for s in input_shape],
        "batch_size": int(batch_size),
        "channels_last": bool(channels_last),
    }


def cache_path(key: Dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"{digest}.json"


def read_verdict(key: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The cached verdict for ``key`` (None: none, unreadable, or of another key)."""
    try:
        entry = json.loads(cache_path(key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    speedup = entry.get("speedup")
    if not isinstance(speedup, (int, float)) or not speedup > 0:
        return None
    return entry


def write_verdict(key: Dict[str, Any], entry: Dict[str, Any]) -> None:
    """Cache a verdict (atomically: concurrent runs read a whole file or none); a cache that
    cannot be written is skipped (the next run measures again)."""
    path = cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**entry, "key": key})
    except (OSError, LongtailError):
        pass


# ---------------------------------------------------------------------------------------------
# the decision


def env_choice() -> str:
    """``$LONGTAIL_AMP_AUTO`` (default ``measure``), checked."""
    value = os.environ.get(ENV, "").strip().lower() or "measure"
    if value not in ENV_CHOICES:
        raise ConfigError(
            f"{ENV}={os.environ[ENV]!r} is not one of {', '.join(ENV_CHOICES)}: it fixes what "
            f"train.amp=auto resolves to (none, bf16) or lets it measure (measure, the default)."
        )
    return value


def architecture_signature(model: nn.Module) -> str:
    """A cheap signature of a model's architecture (its module tree), for the cache key."""
    return hashlib.sha256(repr(model).encode()).hexdigest()[:16]


def resolve_amp(
    requested: str,
    device: torch.device,
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    channels_last: bool = False,
    arch: Optional[str] = None,
) -> Tuple[str, str]:
    """``train.amp`` as the run trains with it: (``none`` | ``bf16`` | ``fp16``, the reason).

    An explicit value is kept; ``auto`` is decided as the module docstring says. ``batch_size``
    is what one forward pass of this process sees (the micro-batch of a rank); ``arch`` a
    signature of the architecture for the cache (default: a hash of the module tree).
    """
    if requested != "auto":
        return requested, f"train.amp={requested}"
    choice = env_choice()
    if choice != "measure":
        return choice, f"train.amp=auto: {ENV}={choice}"
    if device.type == "cuda":
        if cuda_has_native_bf16(device):
            return "bf16", "train.amp=auto: this GPU has native bf16"
        return "none", "train.amp=auto: no native bf16 on this GPU"
    if device.type != "cpu":
        return "none", f"train.amp=auto: fp32 on {device.type}"
    if not cpu_has_native_bf16():
        return "none", "train.amp=auto: no native bf16 on this CPU"

    key = probe_key(arch or architecture_signature(model), input_shape, batch_size, channels_last)
    cached = read_verdict(key)
    if cached is not None:
        how = "measured earlier, cached"
        speedup = float(cached["speedup"])
    else:
        how = "measured"
        try:
            result = measure_step_seconds(model, input_shape, batch_size, channels_last)
        except Exception as err:  # an op without a bf16 kernel, out of memory: stay in fp32
            return "none", f"train.amp=auto: the bf16 probe failed ({type(err).__name__}: {err})"
        speedup = result.speedup
        write_verdict(
            key,
            {
                "amp": "bf16" if speedup >= MIN_SPEEDUP else "none",
                "speedup": speedup,
                "fp32_step_s": result.fp32_s,
                "bf16_step_s": result.bf16_s,
                "timed_steps": result.timed_steps,
                "probe_s": result.seconds,
                "min_speedup": MIN_SPEEDUP,
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
    if speedup >= MIN_SPEEDUP:
        return "bf16", f"train.amp=auto: {speedup:.2f}x fp32 on this CPU, {how}"
    return "none", (
        f"train.amp=auto: bf16 autocast only {speedup:.2f}x fp32 on this CPU, "
        f"needs {MIN_SPEEDUP}x; {how}"
    )


def describe(amp: str) -> str:
    """The precision a resolved ``train.amp`` trains in, in words."""
    return {"none": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + loss scaling"}.get(
        amp, amp
    )
