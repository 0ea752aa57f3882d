"""Models: backbones, necks and heads, assembled by :func:`build_model`."""

from longtail.core.registry import import_submodules
from longtail.models.build import build_model
from longtail.models.classifier import Classifier, ModelOutput
from longtail.models.registry import BACKBONES, HEADS, NECKS

import_submodules(__name__, __path__)  # every module registers its parts: a new one is a file

__all__ = ["BACKBONES", "HEADS", "NECKS", "Classifier", "ModelOutput", "build_model"]
