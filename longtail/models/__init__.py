"""Models: backbones, necks and heads, assembled by :func:`build_model`."""

from longtail.models import heads, necks, resnet_cifar  # noqa: F401  (register components)
from longtail.models import whitening  # noqa: F401  (registers the 'whitening' neck)
from longtail.models.classifier import Classifier, ModelOutput, build_model
from longtail.models.registry import BACKBONES, HEADS, NECKS

__all__ = ["BACKBONES", "HEADS", "NECKS", "Classifier", "ModelOutput", "build_model"]
