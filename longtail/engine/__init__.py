"""The engine: builds a run from its config and drives it (trainer, evaluation, multi-stage pipelines, reports)."""
