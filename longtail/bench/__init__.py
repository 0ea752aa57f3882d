"""Benchmark suites: ``longtail bench SUITE`` runs the configs a suite lists (shortened when it
says so), skips finished runs, resumes interrupted ones and writes
``benchmarks/results/<suite>.{md,json}``; ``docs/results.md`` sets the numbers beside the
published ones.

Modules: :mod:`~longtail.bench.suite` (suite files, planning), :mod:`~longtail.core.scale`
(epoch scaling), :mod:`~longtail.bench.runner` (execution), :mod:`~longtail.bench.report`
(results files, docs page), :mod:`~longtail.bench.references` (published numbers),
:mod:`~longtail.bench.machine` (machine, commit).
"""

from longtail.bench.suite import PlannedRun, RunSpec, Suite, load_suite, plan_suite
from longtail.core.scale import epoch_overrides, scale_epochs, scaled_settings

__all__ = [
    "epoch_overrides",
    "scale_epochs",
    "scaled_settings",
    "PlannedRun",
    "RunSpec",
    "Suite",
    "load_suite",
    "plan_suite",
]
