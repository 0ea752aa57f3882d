"""benchmarks/gpu_check.sh --quick: the prepared GPU call runs end to end on the CPU with tiny
settings (CUDA tests skipped, throughput smoke run, the whole gpu-cifar10 suite at 1 epoch) and
writes its JSON + Markdown with machine, commit, command and every step."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.realdata
def test_gpu_check_quick_runs_every_step_on_cpu(real_data_root, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "gpu_check.sh"),
            "--quick",
            "--out",
            str(out),
            "--data",
            str(real_data_root),
            "--budget",
            "540",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = (out / "steps.log").read_text() if (out / "steps.log").exists() else ""
    md = (out / "gpu_check.md").read_text() if (out / "gpu_check.md").exists() else ""
    steps_table = md.split("## CUDA tests")[0]
    assert proc.returncode == 0, steps_table + proc.stderr[-3000:] + log[-3000:]
    record = json.loads((out / "gpu_check.json").read_text())
    assert record["quick"] is True and record["git"]["commit"]
    assert record["machine"]["torch"] and "gpu_check.sh" in record["command"]
    steps = {s["name"]: s for s in record["steps"]}
    assert list(steps) == ["cuda-tests", "throughput", "amp-parity", "suite"]
    assert all(s["rc"] == 0 and not s["timed_out"] for s in steps.values())
    # no CUDA here: every CUDA test is collected and skipped, none fails
    tests = record["tests"]
    assert tests["tests"] >= 5 and tests["failures"] == tests["errors"] == 0
    # the suite's eight runs finished, cRT after its CE run, beside the published numbers
    rows = {r["run"]: r for r in record["suite"]}
    assert len(rows) == 8 and all(r["status"] == "done" for r in rows.values())
    assert rows["c10-ce"]["published"] == pytest.approx(70.36)
    assert rows["c10-ldam_drw"]["published"] == pytest.approx(77.03)
    assert rows["c10-la"]["published"] == pytest.approx(77.67)
    assert rows["c10-ce"]["diff"] == pytest.approx(
        rows["c10-ce"]["test_top1"] - rows["c10-ce"]["published"]
    )
    assert (out / "throughput.json").is_file() and (out / "gpu-cifar10.json").is_file()
    parity = record["amp_parity"]
    assert parity["c10-fp32"]["n"] == parity["c10-bf16"]["n"] == 3
    assert parity["bf16_time_vs_fp32"] > 0 and len(parity["checks"]) == 4
    md = (out / "gpu_check.md").read_text()
    assert "## CUDA tests" in md and "| c10-la | done | 1 |" in md
    # what comes back from a device call: at most 10 files (the suites add their HTML reports),
    # none deeper than 2 folders
    files = [p for p in out.iterdir() if p.is_file()]
    assert len(files) <= 10, sorted(p.name for p in files)
