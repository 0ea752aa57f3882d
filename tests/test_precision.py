"""train.amp=auto: the env override, the native-bf16 check, the probe's decision and cache, the
probe leaving the RNG and the model alone, and an auto run recorded resolved and resumed exactly."""

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import TINY_RUN
from safetensors.torch import load_file

from longtail.core.config import load_config
from longtail.core.distributed import DistInfo
from longtail.core.errors import ConfigError
from longtail.data import build_data
from longtail.engine import trainer
from longtail.engine.trainer import build_run, fit
from longtail.optim import precision
from longtail.optim.precision import ENV, ProbeResult, resolve_amp

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "methods" / "ce.yaml"
CPU = torch.device("cpu")
SHAPE = (3, 8, 8)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.2),  # draws from the global RNG: the probe must restore it
        nn.Flatten(),
        nn.Linear(256, 5),
    )


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """auto measures (as outside the test suite), on a CPU with native bf16, into a fresh cache;
    returns the list of probes run, whose results the test sets in ``timings``."""
    monkeypatch.setenv(ENV, "measure")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ("avx512_bf16",))
    calls = []
    timings = {"fp32": 0.3, "bf16": 0.2}

    def fake(model, input_shape, batch_size, channels_last=False, **kw):
        calls.append((tuple(input_shape), batch_size, channels_last))
        return ProbeResult(timings["fp32"], timings["bf16"], 3, 0.01)

    monkeypatch.setattr(precision, "measure_step_seconds", fake)
    return calls, timings


def no_probe(*args, **kwargs):
    raise AssertionError("the probe ran")


def test_env_fixes_auto_without_measuring(monkeypatch):
    monkeypatch.setattr(precision, "measure_step_seconds", no_probe)
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ("amx_bf16",))
    monkeypatch.setenv(ENV, "none")
    assert resolve_amp("auto", CPU, small_model(), SHAPE, 16) == (
        "none",
        "train.amp=auto: LONGTAIL_AMP_AUTO=none",
    )
    monkeypatch.setenv(ENV, "bf16")
    assert resolve_amp("auto", CPU, small_model(), SHAPE, 16)[0] == "bf16"
    assert resolve_amp("fp16", CPU, small_model(), SHAPE, 16) == ("fp16", "train.amp=fp16")
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(ConfigError, match="LONGTAIL_AMP_AUTO='fast' is not one of none, bf16"):
        resolve_amp("auto", CPU, small_model(), SHAPE, 16)


def test_the_suite_resolves_auto_to_fp32():
    assert precision.env_choice() == "none"  # conftest's default for every test and subprocess


def test_probe_decides_and_its_verdict_is_cached(measuring, monkeypatch, tmp_path):
    calls, timings = measuring
    amp, reason = resolve_amp("auto", CPU, small_model(), SHAPE, 16, channels_last=True)
    assert (amp, reason) == ("bf16", "train.amp=auto: 1.50x fp32 on this CPU, measured")
    assert calls == [(SHAPE, 16, True)]
    files = list((tmp_path / "cache" / "longtail" / "amp-auto").glob("*.json"))
    assert len(files) == 1
    entry = json.loads(files[0].read_text())
    assert entry["amp"] == "bf16" and entry["speedup"] == pytest.approx(1.5)
    assert entry["key"]["batch_size"] == 16 and entry["key"]["input_shape"] == [3, 8, 8]
    assert entry["key"]["threads"] == torch.get_num_threads()

    timings["bf16"] = 0.4  # now slower, but the cached verdict is used: no second probe
    amp, reason = resolve_amp("auto", CPU, small_model(), SHAPE, 16, channels_last=True)
    assert (amp, reason) == (
        "bf16",
        "train.amp=auto: 1.50x fp32 on this CPU, measured earlier, cached",
    )
    assert len(calls) == 1

    # another batch size is another key: measured, slower -> fp32
    amp, reason = resolve_amp("auto", CPU, small_model(), SHAPE, 32, channels_last=True)
    assert amp == "none" and "only 0.75x fp32" in reason and "needs 1.1x" in reason
    assert len(calls) == 2 and len(list(files[0].parent.glob("*.json"))) == 2

    # just under the margin is not enough
    timings["bf16"] = 0.3 / 1.09
    assert resolve_amp("auto", CPU, small_model(), SHAPE, 64)[0] == "none"
    timings["bf16"] = 0.3 / 1.11
    assert resolve_amp("auto", CPU, small_model(), SHAPE, 128)[0] == "bf16"


def test_a_corrupt_cache_entry_is_measured_again(measuring):
    calls, _ = measuring
    resolve_amp("auto", CPU, small_model(), SHAPE, 16)
    key = precision.probe_key(precision.architecture_signature(small_model()), SHAPE, 16, False)
    precision.cache_path(key).write_text("{not json")
    assert resolve_amp("auto", CPU, small_model(), SHAPE, 16)[0] == "bf16"
    assert len(calls) == 2


def test_no_native_bf16_means_fp32_without_measuring(measuring, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ())
    monkeypatch.setattr(precision, "measure_step_seconds", no_probe)
    assert resolve_amp("auto", CPU, small_model(), SHAPE, 16) == (
        "none",
        "train.amp=auto: no native bf16 on this CPU",
    )


def test_cuda_takes_bf16_where_the_gpu_has_it(measuring, monkeypatch):
    monkeypatch.setattr(precision, "measure_step_seconds", no_probe)
    seen = []

    def capability(device):
        seen.append(device)
        return {0: (9, 0), 1: (7, 5)}[device.index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    h100, t4 = torch.device("cuda:0"), torch.device("cuda:1")
    assert resolve_amp("auto", h100, small_model(), SHAPE, 16) == (
        "bf16",
        "train.amp=auto: this GPU has native bf16",
    )
    assert resolve_amp("auto", t4, small_model(), SHAPE, 16) == (
        "none",
        "train.amp=auto: no native bf16 on this GPU",
    )
    assert seen == [h100, t4]  # the run's own GPU is asked, not the current one


def test_native_bf16_features_are_read_from_torch_or_cpuinfo(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "amx_bf16": True})
    assert precision.cpu_bf16_features() == ("amx_bf16",)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True})
    assert precision.cpu_bf16_features() == ()
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    monkeypatch.setattr(precision, "_proc_cpuinfo", lambda: "flags\t: fpu avx2 avx512_bf16\n")
    assert precision.cpu_bf16_features() == ("avx512_bf16",)
    monkeypatch.setattr(precision, "_proc_cpuinfo", lambda: "flags\t: fpu avx2 avx512f\n")
    assert precision.cpu_has_native_bf16() is False


def test_the_probe_leaves_rng_and_model_alone():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    result = precision.measure_step_seconds(model, SHAPE, 8, channels_last=True, steps=2)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert result.fp32_s > 0 and result.bf16_s > 0 and result.timed_steps in (0, 1, 2)
    assert result.speedup == pytest.approx(result.fp32_s / result.bf16_s)


class Sleepy(nn.Module):
    """small_model, plus a sleep in one precision: the probe's real timing then has a known
    winner."""

    def __init__(self, slow_in_bf16: bool):
        super().__init__()
        self.net, self.slow_in_bf16 = small_model(), slow_in_bf16

    def extra_repr(self) -> str:  # another architecture signature for the cache
        return f"slow_in_bf16={self.slow_in_bf16}"

    def forward(self, x):
        if x.shape[0] > 1 and torch.is_autocast_enabled("cpu") == self.slow_in_bf16:
            time.sleep(0.1 * x.shape[0] / 8)  # >> a loaded CPU's step noise
        return self.net(x)


def test_the_probe_measures_the_faster_precision(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, "measure")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ("avx512_bf16",))
    slow_bf16 = precision.measure_step_seconds(Sleepy(True), SHAPE, 8)
    assert slow_bf16.timed_steps == 0  # the scout settled it: no full-batch step timed
    assert slow_bf16.speedup < 0.5
    fast_bf16 = precision.measure_step_seconds(Sleepy(False), SHAPE, 8, steps=3)
    assert fast_bf16.timed_steps == 3 and fast_bf16.speedup > 2.0
    assert fast_bf16.fp32_s >= 0.1  # the median of steps that each slept 0.1 s
    once = precision.measure_step_seconds(Sleepy(False), SHAPE, 8, steps=3, budget_s=0.0)
    assert once.timed_steps == 1  # over budget after the first timed pair
    assert resolve_amp("auto", CPU, Sleepy(False), SHAPE, 8)[0] == "bf16"
    assert resolve_amp("auto", CPU, Sleepy(True), SHAPE, 8)[0] == "none"
    assert len(list(tmp_path.glob("longtail/amp-auto/*.json"))) == 2


def tiny_cfg(epochs=2, extra=()):
    return load_config(CONFIG, [*TINY_RUN, f"train.epochs={epochs}", *extra])


def test_a_real_probe_in_build_run_changes_nothing_it_builds(
    tiny_cifar_root, tmp_path, monkeypatch
):
    """The probe really runs (a deep copy of the run's model): the built model and the RNG
    state after build_run are those of a run that does not probe."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ("avx512_bf16",))
    monkeypatch.setattr(precision, "PROBE_STEPS", 1)
    plain = build_run(tiny_cfg(extra=["train.amp=none"]), tmp_path / "a", tiny_cifar_root)
    rng_plain = torch.get_rng_state()
    monkeypatch.setenv(ENV, "measure")
    probed = build_run(tiny_cfg(), tmp_path / "b", tiny_cifar_root)
    assert torch.equal(torch.get_rng_state(), rng_plain)
    assert probed.cfg.train.amp in ("none", "bf16") and "measured" in probed.amp_reason
    assert len(list((tmp_path / "cache" / "longtail" / "amp-auto").glob("*.json"))) == 1
    a, b = plain.method.model.state_dict(), probed.method.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_warning_only_for_explicit_bf16_without_native_bf16(
    tiny_cifar_root, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ())
    monkeypatch.setenv(ENV, "measure")
    run = build_run(tiny_cfg(), tmp_path / "a", tiny_cifar_root)
    assert run.cfg.train.amp == "none" and "no native bf16" in run.amp_reason
    assert "warning" not in capsys.readouterr().err
    run = build_run(tiny_cfg(extra=["train.amp=bf16"]), tmp_path / "b", tiny_cifar_root)
    assert run.cfg.train.amp == "bf16"
    assert "warning: bf16 autocast on this CPU may be far slower" in capsys.readouterr().err
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ("avx512_bf16",))
    build_run(tiny_cfg(extra=["train.amp=bf16"]), tmp_path / "c", tiny_cifar_root)
    assert "warning" not in capsys.readouterr().err


def test_auto_run_records_bf16_and_resumes_bit_exactly(
    tiny_cifar_root, tmp_path, measuring, monkeypatch, capsys
):
    calls, _ = measuring
    cfg = tiny_cfg(2)
    assert cfg.train.amp == "auto"
    straight = fit(cfg, tmp_path / "straight", tiny_cifar_root)
    assert straight is not None
    assert "precision: bf16 autocast (train.amp=auto: 1.50x fp32 on this CPU, measured)" in (
        capsys.readouterr().out
    )
    saved = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert saved["amp"] == "bf16" and saved["amp_reason"].startswith("train.amp=auto: 1.50x")
    assert load_config(tmp_path / "straight" / "config.yaml").train.amp == "bf16"
    assert "amp: bf16" in (tmp_path / "straight" / "config.yaml").read_text()

    assert fit(cfg, tmp_path / "killed", tiny_cifar_root, stop_after_epoch=1) is None
    assert len(calls) == 1  # the second run reads the cached verdict
    monkeypatch.setattr(precision, "measure_step_seconds", no_probe)
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ())  # would say fp32 now
    fit(cfg, tmp_path / "killed", tiny_cifar_root, resume=True)  # amp=auto: as recorded
    assert "precision: bf16 autocast (train.amp=bf16, as the run recorded it in config.yaml)" in (
        capsys.readouterr().out
    )
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["amp"] == "bf16"
    assert not (tmp_path / "killed" / "resumes.jsonl").exists()  # nothing changed
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    h1 = (tmp_path / "straight" / "history.jsonl").read_text().splitlines()
    h2 = (tmp_path / "killed" / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in h1] == [json.loads(x)["loss"] for x in h2]

    # and it trained in bf16: an fp32 run of the same config ends elsewhere
    fp32 = fit(tiny_cfg(2, ["train.amp=none"]), tmp_path / "fp32", tiny_cifar_root)
    assert fp32 is not None and fp32["amp"] == "none" and fp32["amp_reason"] == "train.amp=none"
    c = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_ddp_ranks_agree_on_fp32_when_one_chooses_it(monkeypatch, tiny_cifar_root, tmp_path):
    """resolve_precision takes bf16 only where every rank voted for it (the all-reduce min)."""
    votes = []

    def fake_min(tensor, info):
        votes.append(float(tensor.item()))
        tensor.fill_(0.0)  # another rank voted fp32
        return tensor

    monkeypatch.setattr(trainer, "all_reduce_min", fake_min)
    monkeypatch.setenv(ENV, "bf16")
    cfg = tiny_cfg()
    data = build_data("cifar10-lt", tiny_cifar_root, imbalance_factor=10, val_per_class=3)
    info = DistInfo(rank=0, world_size=2)
    resolved, reason = trainer.resolve_precision(cfg, small_model(), data, CPU, info)
    assert votes == [1.0] and resolved.train.amp == "none" and "another rank" in reason
    assert cfg.train.amp == "auto"  # the caller's config is not changed
