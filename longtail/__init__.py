"""longtail: a PyTorch toolkit for long-tailed visual recognition.

The Python API (docs/api.md). Its names load on first use, so ``import longtail`` (and the
``longtail`` command) stays light until one of them is needed.

Runs, as the command line's ``longtail train`` / ``longtail eval``:
    train(config, overrides=None, out=None, data_root=None) -> the run's metrics (dict)
    evaluate(run_dir, data_root=None) -> the metrics recomputed from the saved weights

Components for one's own training loop, by their registered names:
    create_model(name, num_classes, pretrained=None, in_chans=3, **options)
        an nn.Module: forward(x) -> logits [B, C], forward_features(x) -> features [B, D]
    create_loss(name, class_counts=None, **options)
        loss(logits, targets) -> scalar; loss.set_epoch(epoch) each epoch
    create_sampler(name, labels, class_counts=None, seed=0, **options)
        a torch.utils.data.Sampler for DataLoader(sampler=...); set_epoch(epoch) each epoch
    list_models(), list_losses(), list_samplers(), list_methods()
        the names they (and a config) accept

Classes: every loss (``LDAMLoss``, ``FocalLoss``, ...) and sampler (``ClassBalancedSampler``,
...) by its class name, their bases ``LongtailLoss`` and ``BaseSampler``, and ``LogitsModel``
(what ``create_model`` returns); ``help(longtail)`` lists them all below.
"""

from __future__ import annotations

import importlib
from typing import Any, List

__version__ = "0.1.0"

# the API's functions (longtail/api.py FUNCTIONS), known without importing it: an attribute of
# another name (a submodule, a dunder) never pays for torch
_FUNCTIONS = (
    "train",
    "evaluate",
    "create_model",
    "create_loss",
    "create_sampler",
    "list_models",
    "list_losses",
    "list_samplers",
    "list_methods",
)


def _api() -> Any:
    return importlib.import_module("longtail.api")  # PEP 562 lazy access: no import cycle


def __getattr__(name: str) -> Any:
    if name == "__all__":
        value: Any = list(_api().__all__)
    elif name in _FUNCTIONS:
        value = getattr(_api(), name)
    elif name[:1].isupper() and name in _api().CLASSES:
        value = _api().CLASSES[name]
    else:
        raise AttributeError(f"module 'longtail' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted({*globals(), *_api().__all__})
