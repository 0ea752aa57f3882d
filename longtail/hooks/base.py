"""Training hooks (mmengine's ``Hook`` is the model): code that joins every run at fixed points,
whatever the method, configured by name under ``hooks:`` with its own options.

Lifecycle, called by the engine in this order (``run`` is the engine's Run: ``cfg``, ``method``,
``optim`` (the step wrapper), ``data``, ``device``, ``dist``, ``folder``):

``before_run(run)``               once, after the run is built and before a checkpoint is restored
``before_epoch(run, epoch)``      after the method's ``on_epoch_start`` (0-based epoch)
``after_backward(run, batch, loss)``  each step, after its first backward, before the update
``after_epoch(run, epoch) -> dict``   entries for this epoch's history line
``metrics(run) -> dict``          entries for metrics.json
``save_artifacts(run, folder)``   rank 0, files in the finished run folder (before metrics.json)
``state_dict()`` / ``load_state_dict(state)``  saved in every checkpoint (exact resume)
"""

from __future__ import annotations

from typing import Any, Dict

from longtail.core.registry import Registry

HOOKS = Registry("hook")


class Hook:
    def before_run(self, run: Any) -> None:
        pass

    def before_epoch(self, run: Any, epoch: int) -> None:
        pass

    def after_backward(self, run: Any, batch: Any, loss: Any) -> None:
        pass

    def after_epoch(self, run: Any, epoch: int) -> Dict[str, Any]:
        return {}

    def metrics(self, run: Any) -> Dict[str, Any]:
        return {}

    def save_artifacts(self, run: Any, folder: Any) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def build_hooks(spec: Dict[str, Dict[str, Any]], facts: Any) -> Dict[str, Hook]:
    """``{name: options}`` from the config -> built hooks, in the config's order."""
    out: Dict[str, Hook] = {}
    for name, options in spec.items():
        out[name] = HOOKS.build(name, facts, key_prefix=f"hooks.{name}.", **dict(options or {}))
    return out
