"""Per-sample image transforms for a streaming input pipeline (decode, transform, collate).

RandomResizedCrop (Szegedy et al., CVPR 2015; torchvision's sampling rule), flip, colour jitter,
AutoAugment (Cubuk et al., CVPR 2019: ImageNet and CIFAR-10 policies), RandAugment (Cubuk et al.,
CVPR-W 2020), Cutout (DeVries & Taylor 2017), random erasing (Zhong et al., AAAI 2020), resize +
centre crop, to-tensor + normalise, and named pipelines (:data:`PIPELINES`). A transform is
``t(x, rng)``: every random choice is drawn from ``rng``, the ``numpy.random.Generator`` that
:func:`sample_rng` builds from (seed, epoch, index), so a sample is augmented the same way whatever
the worker count, and a resumed run is bit-exact.

Libraries: Pillow does every image op (crop, resize, flip, ``Image.transform`` / ``rotate``,
``ImageOps``, ``ImageEnhance``: the calls torchvision makes for PIL inputs); numpy the random
draws, the hue shift and the arithmetic of the tensor steps (to-tensor, normalise, Cutout, random
erasing, the bilinear tensor resize) on CPU tensors; torch the output tensors. No torchvision,
albumentations or kornia (docs/transforms.md says why).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from longtail.core.errors import ConfigError
from longtail.core.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the CIFAR constants of the RSAM-PT (GNM-PT) reference code (its std is the widely copied one)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

_STREAM_TAG = 0x7A5  # keeps these draws apart from the batched loader's (seed, epoch, stream)

Fill = Union[None, float, Sequence[float]]
Size = Union[int, Sequence[int]]
Box = Tuple[int, int, int, int]  # top, left, height, width


def sample_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of one sample's augmentation: a function of (seed, epoch, index, stream)
    only (numpy SeedSequence -> PCG64), so it is the same in any worker and after a resume.
    ``stream`` tells apart several views of one sample (e.g. two crops)."""
    values = (seed, epoch, index, stream)
    if any(int(v) != v or v < 0 for v in values):
        raise ValueError(f"sample_rng takes non-negative integers, got {values}.")
    seq = np.random.SeedSequence([int(v) for v in values] + [_STREAM_TAG])
    return np.random.Generator(np.random.PCG64(seq))


# Pillow >= 9.1 names its constants in enums (9.0 only as module attributes)
_RESAMPLING: Any = getattr(Image, "Resampling", Image)
_TRANSPOSE: Any = getattr(Image, "Transpose", Image)
_TRANSFORM: Any = getattr(Image, "Transform", Image)
_RESAMPLE = {
    "nearest": _RESAMPLING.NEAREST,
    "bilinear": _RESAMPLING.BILINEAR,
    "bicubic": _RESAMPLING.BICUBIC,
}


def _resample(name: str) -> Any:
    if name not in _RESAMPLE:
        raise ConfigError(f"Unknown interpolation {name!r}; use one of {', '.join(_RESAMPLE)}.")
    return _RESAMPLE[name]


def _pair(size: Size, what: str) -> Tuple[int, int]:
    """int or (h, w) -> (h, w), both positive."""
    hw = [int(size)] * 2 if isinstance(size, (int, np.integer)) else [int(s) for s in size]
    if len(hw) != 2 or min(hw) < 1:
        raise ConfigError(f"{what} must be a positive int or (height, width), got {size!r}.")
    return hw[0], hw[1]


def _size_or_side(size: Size, what: str) -> Size:
    """A positive int (the shorter side) or (h, w)."""
    if isinstance(size, (int, np.integer)):
        if size < 1:
            raise ConfigError(f"{what} must be positive, got {size}.")
        return int(size)
    return _pair(size, what)


def _range(value: Sequence[float], what: str, low: float = 0.0) -> Tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not low <= lo <= hi:
        raise ConfigError(f"{what} must be (lo, hi) with {low} <= lo <= hi, got {tuple(value)}.")
    return lo, hi


def _fill_for(img: Image.Image, fill: Fill) -> Union[int, Tuple[int, ...]]:
    """A PIL fill colour for ``img``: a number for every band, or one value per band."""
    bands = len(img.getbands())
    if fill is None:
        fill = 0
    values = [int(fill)] if isinstance(fill, (int, float)) else [int(v) for v in fill]
    if len(values) == 1:
        values = values * bands
    if len(values) != bands:
        raise ValueError(f"fill has {len(values)} values for an image with {bands} bands.")
    return values[0] if bands == 1 else tuple(values)


# ----------------------------------------------------------------------------- geometry


class RandomResizedCrop:
    """A random box of ``scale`` x the image area and aspect ratio (w / h) in ``ratio`` (log-
    uniform), resized to ``size``. torchvision's rule: 10 tries, else a centre crop of the whole
    image clamped to the ratio range."""

    def __init__(
        self,
        size: Size = 224,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        interpolation: str = "bilinear",
    ):
        self.size = _pair(size, "RandomResizedCrop size")
        self.scale = _range(scale, "RandomResizedCrop scale")
        self.ratio = _range(ratio, "RandomResizedCrop ratio", low=1e-12)
        self.resample = _resample(interpolation)

    def get_params(self, width: int, height: int, rng: np.random.Generator) -> Box:
        """(top, left, height, width) of the crop box."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        top, left, h, w = self.get_params(img.width, img.height, rng)
        crop = img.crop((left, top, left + w, top + h))
        return crop.resize((self.size[1], self.size[0]), self.resample)


class RandomCrop:
    """Zero-pad by ``padding`` on every side (fill ``fill``), then crop ``size`` at a uniform
    offset (torchvision RandomCrop(size, padding))."""

    def __init__(self, size: Size, padding: int = 0, fill: Fill = 0):
        self.size = _pair(size, "RandomCrop size")
        if padding < 0:
            raise ConfigError(f"RandomCrop padding must be >= 0, got {padding}.")
        self.padding, self.fill = int(padding), fill

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if self.padding:
            img = ImageOps.expand(img, border=self.padding, fill=_fill_for(img, self.fill))
        th, tw = self.size
        if img.height < th or img.width < tw:
            raise ValueError(f"RandomCrop {self.size} is larger than the padded image {img.size}.")
        top = int(rng.integers(0, img.height - th + 1))
        left = int(rng.integers(0, img.width - tw + 1))
        return img.crop((left, top, left + tw, top + th))


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        return img.transpose(_TRANSPOSE.FLIP_LEFT_RIGHT) if rng.random() < self.p else img


def resized_size(height: int, width: int, size: Size) -> Tuple[int, int]:
    """(h, w) after torchvision's Resize: an int sets the shorter side (the longer one is
    int(size * long / short)), a pair is the output (h, w)."""
    if not isinstance(size, (int, np.integer)):
        return _pair(size, "Resize size")
    short, long = min(height, width), max(height, width)
    new_short, new_long = int(size), int(int(size) * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


class Resize:
    """Resize a PIL image (an int: its shorter side; a pair: to (h, w))."""

    def __init__(self, size: Size, interpolation: str = "bilinear"):
        self.size = _size_or_side(size, "Resize size")
        self.resample = _resample(interpolation)

    def __call__(self, img: Image.Image, rng: Optional[np.random.Generator] = None) -> Image.Image:
        h, w = resized_size(img.height, img.width, self.size)
        if (h, w) == (img.height, img.width):
            return img
        return img.resize((w, h), self.resample)


def center_crop_box(height: int, width: int, crop_h: int, crop_w: int) -> Tuple[int, int]:
    """(top, left) of torchvision's centre crop: round((H - h) / 2) (Python's round, half to
    even); an image smaller than the crop is zero-padded first, (h - H) // 2 on the top/left."""
    top = -((crop_h - height) // 2) if crop_h > height else int(round((height - crop_h) / 2.0))
    left = -((crop_w - width) // 2) if crop_w > width else int(round((width - crop_w) / 2.0))
    return top, left


class CenterCrop:
    """The centre ``size`` box (zero padding where the image is smaller)."""

    def __init__(self, size: Size):
        self.size = _pair(size, "CenterCrop size")

    def __call__(self, img: Image.Image, rng: Optional[np.random.Generator] = None) -> Image.Image:
        h, w = self.size
        top, left = center_crop_box(img.height, img.width, h, w)
        return img.crop((left, top, left + w, top + h))  # outside the image: zeros


# ----------------------------------------------------------------------------- colour


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """Rotate the hue by ``hue_factor`` in [-0.5, 0.5] of a turn (the H of Pillow's HSV, uint8,
    shifted by int(hue_factor * 255) mod 256); single-band images are returned as they are."""
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor must be in [-0.5, 0.5], got {hue_factor}.")
    if len(img.getbands()) == 1:
        return img
    h, s, v = img.convert("HSV").split()
    shift = np.uint8(int(hue_factor * 255) % 256)
    hue = (np.asarray(h, dtype=np.uint8) + shift).astype(np.uint8)  # wraps around
    return Image.merge("HSV", (Image.fromarray(hue, "L"), s, v)).convert(img.mode)


def _jitter_range(value: Union[float, Sequence[float]], what: str) -> Optional[Tuple[float, float]]:
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"ColorJitter {what} must be >= 0, got {value}.")
        value = (max(0.0, 1.0 - value), 1.0 + value)
    lo, hi = _range(value, f"ColorJitter {what}")
    return None if lo == hi == 1.0 else (lo, hi)


class ColorJitter:
    """Brightness, contrast, saturation (factors uniform in [max(0, 1 - x), 1 + x] or a given
    (lo, hi)) and hue (uniform in [-h, h], h <= 0.5), applied in a random order; a zero
    strength leaves that adjustment out (all zero: the identity)."""

    def __init__(
        self,
        brightness: Union[float, Sequence[float]] = 0.0,
        contrast: Union[float, Sequence[float]] = 0.0,
        saturation: Union[float, Sequence[float]] = 0.0,
        hue: Union[float, Sequence[float]] = 0.0,
    ):
        self.brightness = _jitter_range(brightness, "brightness")
        self.contrast = _jitter_range(contrast, "contrast")
        self.saturation = _jitter_range(saturation, "saturation")
        lo, hi = (-hue, hue) if isinstance(hue, (int, float)) else hue
        if not -0.5 <= lo <= hi <= 0.5:
            raise ConfigError(f"ColorJitter hue must be in [-0.5, 0.5], got {hue!r}.")
        self.hue = None if lo == hi == 0.0 else (float(lo), float(hi))

    def get_params(self, rng: np.random.Generator) -> Tuple[List[int], List[Optional[float]]]:
        """(the order of the four adjustments, their factors; None where left out)."""
        order = [int(i) for i in rng.permutation(4)]
        ranges = (self.brightness, self.contrast, self.saturation, self.hue)
        factors = [None if r is None else float(rng.uniform(r[0], r[1])) for r in ranges]
        return order, factors

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        order, factors = self.get_params(rng)
        for i in order:
            f = factors[i]
            if f is not None:
                img = _JITTER_OPS[i](img, f)
        return img


_JITTER_OPS: Tuple[Callable[[Image.Image, float], Image.Image], ...] = (
    lambda img, f: ImageEnhance.Brightness(img).enhance(f),
    lambda img, f: ImageEnhance.Contrast(img).enhance(f),
    lambda img, f: ImageEnhance.Color(img).enhance(f),
    adjust_hue,
)


# ----------------------------------------------------------------------------- AutoAugment


def _affine(img: Image.Image, matrix: Tuple[float, ...], resample: Any, fill: Fill) -> Image.Image:
    # matrix: output pixel (x, y) samples the input at (a x + b y + c, d x + e y + f)
    return img.transform(
        img.size, _TRANSFORM.AFFINE, matrix, resample, fillcolor=_fill_for(img, fill)
    )


_Op = Callable[[Image.Image, float, Any, Fill], Image.Image]

# the ops of AutoAugment / RandAugment on PIL images, as torchvision applies them: shears about
# the top-left corner (1, m, 0, 0, 1, 0), translations by int(m) pixels (positive: right / down),
# rotations counter-clockwise about the centre, enhancements by the factor 1 + m
_OPS: Dict[str, _Op] = {
    "Identity": lambda img, m, r, f: img,
    "ShearX": lambda img, m, r, f: _affine(img, (1.0, m, 0.0, 0.0, 1.0, 0.0), r, f),
    "ShearY": lambda img, m, r, f: _affine(img, (1.0, 0.0, 0.0, m, 1.0, 0.0), r, f),
    "TranslateX": lambda img, m, r, f: _affine(img, (1.0, 0.0, -int(m), 0.0, 1.0, 0.0), r, f),
    "TranslateY": lambda img, m, r, f: _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, -int(m)), r, f),
    "Rotate": lambda img, m, r, f: img.rotate(m, r, fillcolor=_fill_for(img, f)),
    "Brightness": lambda img, m, r, f: ImageEnhance.Brightness(img).enhance(1.0 + m),
    "Color": lambda img, m, r, f: ImageEnhance.Color(img).enhance(1.0 + m),
    "Contrast": lambda img, m, r, f: ImageEnhance.Contrast(img).enhance(1.0 + m),
    "Sharpness": lambda img, m, r, f: ImageEnhance.Sharpness(img).enhance(1.0 + m),
    "Posterize": lambda img, m, r, f: ImageOps.posterize(img, int(m)),
    # pixels >= threshold are inverted; for integer pixels "< m" is "< ceil(m)"
    "Solarize": lambda img, m, r, f: ImageOps.solarize(img, math.ceil(m)),
    "AutoContrast": lambda img, m, r, f: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, r, f: ImageOps.equalize(img),
    "Invert": lambda img, m, r, f: ImageOps.invert(img),
}

OP_NAMES = tuple(_OPS)
RANDAUGMENT_OPS = OP_NAMES[:-1]  # torchvision's RandAugment: no Invert
_SIGNED = frozenset(
    {
        "ShearX",
        "ShearY",
        "TranslateX",
        "TranslateY",
        "Rotate",
        "Brightness",
        "Color",
        "Contrast",
        "Sharpness",
    }
)
_LINEAR_MAX = {
    "ShearX": 0.3,
    "ShearY": 0.3,
    "Rotate": 30.0,
    "Brightness": 0.9,
    "Color": 0.9,
    "Contrast": 0.9,
    "Sharpness": 0.9,
}


def apply_op(
    img: Image.Image,
    name: str,
    magnitude: float,
    interpolation: str = "nearest",
    fill: Fill = None,
) -> Image.Image:
    """Apply one AutoAugment / RandAugment op (a name of :data:`OP_NAMES`) at ``magnitude``
    (degrees, pixels, bits, a threshold, or the factor offset, as :func:`magnitude_bins`)."""
    if name not in _OPS:
        raise ValueError(f"Unknown op {name!r}; the ops are {', '.join(OP_NAMES)}.")
    return _OPS[name](img, float(magnitude), _resample(interpolation), fill)


def magnitude_bins(name: str, num_bins: int, width: int, height: int) -> Optional[List[float]]:
    """The ``num_bins`` magnitudes of op ``name`` for an image of ``width`` x ``height``
    (torchvision's augmentation space): shear 0..0.3, translate 0..150/331 of the side, rotate
    0..30 degrees, enhancements 0..0.9, posterize 8 - round(4 i / (n - 1)) bits, solarize
    255..0; None for ops without a magnitude."""
    if num_bins < 2:
        raise ConfigError(f"num_magnitude_bins must be >= 2, got {num_bins}.")
    steps = [i / (num_bins - 1) for i in range(num_bins)]
    top = {**_LINEAR_MAX, "TranslateX": 150.0 / 331.0 * width, "TranslateY": 150.0 / 331.0 * height}
    if name in top:
        return [top[name] * s for s in steps]
    if name == "Posterize":
        return [float(8 - round(4 * i / (num_bins - 1))) for i in range(num_bins)]
    if name == "Solarize":
        return [255.0 * (1.0 - s) for s in steps]
    return None


def is_signed(name: str) -> bool:
    """Whether op ``name`` is applied with a random sign."""
    return name in _SIGNED


class PolicyOp(NamedTuple):
    name: str
    prob: float
    bin: Optional[int]  # magnitude bin of 10; None: the op has no magnitude


def _policy(rows: Sequence[Tuple[Any, ...]]) -> Tuple[Tuple[PolicyOp, PolicyOp], ...]:
    return tuple((PolicyOp(*row[:3]), PolicyOp(*row[3:])) for row in rows)


# Cubuk et al. 2019, Appendix: sub-policy = (op 1, probability, magnitude bin, op 2, ...)
AUTOAUGMENT_POLICIES: Dict[str, Tuple[Tuple[PolicyOp, PolicyOp], ...]] = {
    "imagenet": _policy(
        [
            ("Posterize", 0.4, 8, "Rotate", 0.6, 9),
            ("Solarize", 0.6, 5, "AutoContrast", 0.6, None),
            ("Equalize", 0.8, None, "Equalize", 0.6, None),
            ("Posterize", 0.6, 7, "Posterize", 0.6, 6),
            ("Equalize", 0.4, None, "Solarize", 0.2, 4),
            ("Equalize", 0.4, None, "Rotate", 0.8, 8),
            ("Solarize", 0.6, 3, "Equalize", 0.6, None),
            ("Posterize", 0.8, 5, "Equalize", 1.0, None),
            ("Rotate", 0.2, 3, "Solarize", 0.6, 8),
            ("Equalize", 0.6, None, "Posterize", 0.4, 6),
            ("Rotate", 0.8, 8, "Color", 0.4, 0),
            ("Rotate", 0.4, 9, "Equalize", 0.6, None),
            ("Equalize", 0.0, None, "Equalize", 0.8, None),
            ("Invert", 0.6, None, "Equalize", 1.0, None),
            ("Color", 0.6, 4, "Contrast", 1.0, 8),
            ("Rotate", 0.8, 8, "Color", 1.0, 2),
            ("Color", 0.8, 8, "Solarize", 0.8, 7),
            ("Sharpness", 0.4, 7, "Invert", 0.6, None),
            ("ShearX", 0.6, 5, "Equalize", 1.0, None),
            ("Color", 0.4, 0, "Equalize", 0.6, None),
            ("Equalize", 0.4, None, "Solarize", 0.2, 4),
            ("Solarize", 0.6, 5, "AutoContrast", 0.6, None),
            ("Invert", 0.6, None, "Equalize", 1.0, None),
            ("Color", 0.6, 4, "Contrast", 1.0, 8),
            ("Equalize", 0.8, None, "Equalize", 0.6, None),
        ]
    ),
    "cifar10": _policy(
        [
            ("Invert", 0.1, None, "Contrast", 0.2, 6),
            ("Rotate", 0.7, 2, "TranslateX", 0.3, 9),
            ("Sharpness", 0.8, 1, "Sharpness", 0.9, 3),
            ("ShearY", 0.5, 8, "TranslateY", 0.7, 9),
            ("AutoContrast", 0.5, None, "Equalize", 0.9, None),
            ("ShearY", 0.2, 7, "Posterize", 0.3, 7),
            ("Color", 0.4, 3, "Brightness", 0.6, 7),
            ("Sharpness", 0.3, 9, "Brightness", 0.7, 9),
            ("Equalize", 0.6, None, "Equalize", 0.5, None),
            ("Contrast", 0.6, 7, "Sharpness", 0.6, 5),
            ("Color", 0.7, 7, "TranslateX", 0.5, 8),
            ("Equalize", 0.3, None, "AutoContrast", 0.4, None),
            ("TranslateY", 0.4, 3, "Sharpness", 0.2, 6),
            ("Brightness", 0.9, 6, "Color", 0.2, 8),
            ("Solarize", 0.5, 2, "Invert", 0.0, None),
            ("Equalize", 0.2, None, "AutoContrast", 0.6, None),
            ("Equalize", 0.2, None, "Equalize", 0.6, None),
            ("Color", 0.9, 9, "Equalize", 0.6, None),
            ("AutoContrast", 0.8, None, "Solarize", 0.2, 8),
            ("Brightness", 0.1, 3, "Color", 0.7, 0),
            ("Solarize", 0.4, 5, "AutoContrast", 0.9, None),
            ("TranslateY", 0.9, 9, "TranslateY", 0.7, 9),
            ("AutoContrast", 0.9, None, "Solarize", 0.8, 3),
            ("Equalize", 0.8, None, "Invert", 0.1, None),
            ("TranslateY", 0.7, 9, "AutoContrast", 0.9, None),
        ]
    ),
}


class AutoAugment:
    """One uniformly drawn sub-policy of ``policy`` ("imagenet" or "cifar10"); each of its two
    ops is applied with its probability (draw <= p), at its magnitude bin of 10, with a random
    sign where the op is signed. ``fill``: the colour of areas a geometric op uncovers."""

    def __init__(self, policy: str = "imagenet", interpolation: str = "nearest", fill: Fill = None):
        if policy not in AUTOAUGMENT_POLICIES:
            raise ConfigError(
                f"Unknown AutoAugment policy {policy!r}; use one of {', '.join(AUTOAUGMENT_POLICIES)}."
            )
        self.policy = policy
        self.subpolicies = AUTOAUGMENT_POLICIES[policy]
        self.interpolation = interpolation
        _resample(interpolation)
        self.fill = fill

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        sub = self.subpolicies[int(rng.integers(len(self.subpolicies)))]
        probs, signs = rng.random(2), rng.integers(0, 2, size=2)
        for k, op in enumerate(sub):
            if probs[k] <= op.prob:
                bins = magnitude_bins(op.name, 10, img.width, img.height)
                m = bins[op.bin] if bins is not None and op.bin is not None else 0.0
                if is_signed(op.name) and signs[k] == 0:
                    m = -m
                img = apply_op(img, op.name, m, self.interpolation, self.fill)
        return img


class RandAugment:
    """``num_ops`` ops drawn uniformly (with replacement) from :data:`RANDAUGMENT_OPS`, each at
    magnitude bin ``magnitude`` of ``num_magnitude_bins``, with a random sign where signed."""

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: int = 9,
        num_magnitude_bins: int = 31,
        interpolation: str = "nearest",
        fill: Fill = None,
    ):
        if num_ops < 0 or not 0 <= magnitude < num_magnitude_bins:
            raise ConfigError(
                f"RandAugment needs num_ops >= 0 and 0 <= magnitude < num_magnitude_bins "
                f"({num_magnitude_bins}), got num_ops={num_ops}, magnitude={magnitude}."
            )
        self.num_ops, self.magnitude, self.num_bins = num_ops, magnitude, num_magnitude_bins
        self.interpolation = interpolation
        _resample(interpolation)
        self.fill = fill

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        for _ in range(self.num_ops):
            name = RANDAUGMENT_OPS[int(rng.integers(len(RANDAUGMENT_OPS)))]
            bins = magnitude_bins(name, self.num_bins, img.width, img.height)
            m = bins[self.magnitude] if bins is not None else 0.0
            if is_signed(name) and rng.integers(0, 2):
                m = -m
            img = apply_op(img, name, m, self.interpolation, self.fill)
        return img


# ----------------------------------------------------------------------------- tensors


# The elementwise tensor steps compute in numpy on the tensor's memory (the same float32
# operations, so the same bits as torch's): they then cost the same whatever torch's thread
# setting (a multi-threaded torch op on a small image is slow on a busy machine).


def _host(x: torch.Tensor) -> Optional[np.ndarray]:
    """A numpy view of a CPU tensor (None for other devices)."""
    return x.detach().numpy() if x.device.type == "cpu" else None


class ToTensor:
    """PIL image -> float32 [C, H, W] in [0, 1] (pixel / 255)."""

    def __call__(self, img: Image.Image, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        a = np.asarray(img, dtype=np.uint8).reshape(img.height, img.width, -1)
        x = np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32)
        x /= np.float32(255.0)
        return torch.from_numpy(x)


class Normalize:
    """(x - mean) / std per channel, on a float [C, H, W] tensor."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if len(mean) != len(std) or min(std) <= 0:
            raise ConfigError(f"Normalize needs one positive std per mean, got {mean}, {std}.")
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)

    def __call__(self, x: torch.Tensor, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        a = _host(x)
        if a is None:
            mean = torch.from_numpy(self.mean).to(x.device)
            return (x - mean) / torch.from_numpy(self.std).to(x.device)
        out = a - self.mean.astype(a.dtype)
        out /= self.std.astype(a.dtype)
        return torch.from_numpy(out)


def _bilinear_taps(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of bilinear resampling without antialias, half-pixel
    centres (torch's align_corners=False): src = (i + 0.5) * scale - 0.5, at least 0, with
    scale = float32(n_in / n_out) and one rounding to float32 (torch's kernel: the same bits)."""
    scale = float(np.float32(n_in / n_out))
    src = np.maximum(((np.arange(n_out) + 0.5) * scale - 0.5).astype(np.float32), 0)
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, (1 - w1).astype(np.float32), w1


class ResizeTensor:
    """Resize a float [C, H, W] tensor, bilinear without antialiasing (an int: the shorter
    side), as torchvision's tensor Resize(antialias=False) (torch's interpolate off the CPU)."""

    def __init__(self, size: Size):
        self.size = _size_or_side(size, "ResizeTensor size")

    def __call__(self, x: torch.Tensor, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        h, w = resized_size(x.shape[-2], x.shape[-1], self.size)
        if (h, w) == tuple(x.shape[-2:]):
            return x
        a = _host(x)
        if a is None:
            y = torch.nn.functional.interpolate(
                x[None], size=(h, w), mode="bilinear", align_corners=False, antialias=False
            )
            return y[0]
        c0, c1, cw0, cw1 = _bilinear_taps(a.shape[-1], w)
        r0, r1, rw0, rw1 = _bilinear_taps(a.shape[-2], h)
        cols = a[..., c0] * cw0 + a[..., c1] * cw1  # along the width first, then the height
        out = cols[..., r0, :] * rw0[:, None] + cols[..., r1, :] * rw1[:, None]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=a.dtype))


def cutout_box(y: int, x: int, height: int, width: int, length: int) -> Tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of the Cutout square centred at (y, x): [c - length // 2,
    c + length // 2) per axis, clipped to the image."""
    half = length // 2
    return (max(0, y - half), min(height, y + half), max(0, x - half), min(width, x + half))


class Cutout:
    """Zero ``n_holes`` squares of side ``length`` on a [C, H, W] tensor, each centred at a
    uniform pixel and clipped to the image (DeVries & Taylor 2017)."""

    def __init__(self, length: int = 16, n_holes: int = 1):
        if length < 0 or n_holes < 0:
            raise ConfigError(f"Cutout needs length, n_holes >= 0, got {length}, {n_holes}.")
        self.length, self.n_holes = length, n_holes

    def get_params(
        self, height: int, width: int, rng: np.random.Generator
    ) -> List[Tuple[int, int, int, int]]:
        """The (y1, y2, x1, x2) boxes to zero."""
        boxes = []
        for _ in range(self.n_holes):
            y, x = int(rng.integers(height)), int(rng.integers(width))
            boxes.append(cutout_box(y, x, height, width, self.length))
        return boxes

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        boxes = self.get_params(x.shape[-2], x.shape[-1], rng)
        a = _host(x)
        out = a.copy() if a is not None else x.clone()
        for y1, y2, x1, x2 in boxes:
            out[..., y1:y2, x1:x2] = 0
        return torch.from_numpy(out) if isinstance(out, np.ndarray) else out


class RandomErasing:
    """With probability ``p``, erase one box of ``scale`` x the area and aspect ratio (h / w)
    in ``ratio`` (log-uniform; 10 tries, else nothing) of a [C, H, W] tensor, to ``value`` (a
    number, one per channel, or "random": standard normal noise) (Zhong et al. 2020)."""

    def __init__(
        self,
        p: float = 0.5,
        scale: Sequence[float] = (0.02, 0.33),
        ratio: Sequence[float] = (0.3, 3.3),
        value: Union[float, Sequence[float], str] = 0.0,
    ):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"RandomErasing p must be in [0, 1], got {p}.")
        if isinstance(value, str) and value != "random":
            raise ConfigError(
                f"RandomErasing value must be a number, a list or 'random', got {value!r}."
            )
        self.p = p
        self.scale = _range(scale, "RandomErasing scale")
        self.ratio = _range(ratio, "RandomErasing ratio", low=1e-12)
        self.value = value

    def get_params(self, height: int, width: int, rng: np.random.Generator) -> Optional[Box]:
        """(top, left, h, w) of the box, or None when no try fits."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if h < height and w < width:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        return None

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if rng.random() >= self.p:
            return x
        box = self.get_params(x.shape[-2], x.shape[-1], rng)
        if box is None:
            return x
        top, left, h, w = box
        c = x.shape[-3]
        if isinstance(self.value, str):
            fill = rng.standard_normal((c, h, w), dtype=np.float32)
        else:
            values = (
                [float(self.value)] if isinstance(self.value, (int, float)) else list(self.value)
            )
            if len(values) not in (1, c):
                raise ValueError(f"RandomErasing value has {len(values)} entries for {c} channels.")
            fill = np.asarray(values, dtype=np.float32).reshape(-1, 1, 1)
        a = _host(x)
        if a is None:
            out = x.clone()
            out[..., top : top + h, left : left + w] = torch.from_numpy(fill).to(out)
            return out
        b = a.copy()
        b[..., top : top + h, left : left + w] = fill
        return torch.from_numpy(b)


# ----------------------------------------------------------------------------- pipelines


class Compose:
    """Apply ``transforms`` in order, each as ``t(x, rng)``; images that are not RGB are
    converted first (``to_rgb``), so every pipeline returns 3 channels."""

    def __init__(self, transforms: Sequence[Any], to_rgb: bool = True):
        self.transforms = list(transforms)
        self.to_rgb = to_rgb

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Any:
        x: Any = img.convert("RGB") if self.to_rgb and img.mode != "RGB" else img
        for t in self.transforms:
            x = t(x, rng)
        return x

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(type(t).__name__ for t in self.transforms) + ")"


PIPELINES = Registry("transform pipeline")


@PIPELINES.register("imagenet_train")
def imagenet_train(
    size: int = 224,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    interpolation: str = "bilinear",
    hflip: float = 0.5,
    color_jitter: Union[float, Sequence[float]] = 0.0,
    auto_augment: Optional[str] = None,
    rand_augment: Optional[Sequence[int]] = None,
    random_erasing: float = 0.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """RandomResizedCrop ``size`` + flip [+ colour jitter] [+ AutoAugment ``auto_augment`` (a
    policy) or RandAugment ``rand_augment`` (N, M)] + to-tensor + normalise [+ random erasing
    with probability ``random_erasing``]. ``color_jitter``: x (brightness = contrast =
    saturation = x) or (b, c, s[, h])."""
    if auto_augment is not None and rand_augment is not None:
        raise ConfigError("imagenet_train takes auto_augment or rand_augment, not both.")
    steps: List[Any] = [RandomResizedCrop(size, scale, ratio, interpolation)]
    if hflip > 0:
        steps.append(RandomHorizontalFlip(hflip))
    jitter = [color_jitter] * 3 if isinstance(color_jitter, (int, float)) else list(color_jitter)
    if len(jitter) not in (3, 4):
        raise ConfigError(f"color_jitter must be a number or (b, c, s[, h]), got {color_jitter!r}.")
    if any(v != 0 for v in jitter):
        steps.append(ColorJitter(*jitter))
    if auto_augment is not None:
        steps.append(AutoAugment(auto_augment))
    if rand_augment is not None:
        if len(rand_augment) != 2:
            raise ConfigError(f"rand_augment must be (num_ops, magnitude), got {rand_augment!r}.")
        steps.append(RandAugment(int(rand_augment[0]), int(rand_augment[1])))
    steps += [ToTensor(), Normalize(mean, std)]
    if random_erasing > 0:
        steps.append(RandomErasing(random_erasing))
    return Compose(steps)


@PIPELINES.register("imagenet_eval")
def imagenet_eval(
    size: int = 224,
    resize: int = 256,
    interpolation: str = "bilinear",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """Resize the shorter side to ``resize``, centre crop ``size``, to-tensor, normalise."""
    return Compose(
        [Resize(resize, interpolation), CenterCrop(size), ToTensor(), Normalize(mean, std)]
    )


@PIPELINES.register("rsam_pt_cifar")
def rsam_pt_cifar(
    size: int = 224,
    crop: int = 32,
    padding: int = 4,
    hflip: float = 0.5,
    auto_augment: Optional[str] = "cifar10",
    autoaugment_fill: Fill = 128,
    cutout: int = 16,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
) -> Compose:
    """The RSAM-PT (GNM-PT) CIFAR training pipeline: random crop ``crop`` with ``padding`` px
    of zeros, flip, AutoAugment (CIFAR-10 policy, grey fill as the reference), to-tensor,
    Cutout ``cutout`` (on [0, 1] pixels), bilinear resize to ``size`` (no antialias), normalise."""
    steps: List[Any] = [RandomCrop(crop, padding)]
    if hflip > 0:
        steps.append(RandomHorizontalFlip(hflip))
    if auto_augment is not None:
        steps.append(AutoAugment(auto_augment, fill=autoaugment_fill))
    steps.append(ToTensor())
    if cutout > 0:
        steps.append(Cutout(cutout))
    steps += [ResizeTensor(size), Normalize(mean, std)]
    return Compose(steps)


@PIPELINES.register("rsam_pt_cifar_eval")
def rsam_pt_cifar_eval(
    size: int = 224,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
) -> Compose:
    """The RSAM-PT evaluation pipeline: resize to (size * 8 // 7) squared, centre crop
    ``size``, to-tensor, normalise."""
    side = size * 8 // 7
    return Compose([Resize((side, side)), CenterCrop(size), ToTensor(), Normalize(mean, std)])


def build_pipeline(name: str, **options: Any) -> Compose:
    """The pipeline registered as ``name`` (:data:`PIPELINES`), with its options checked by name."""
    return PIPELINES.build(name, **options)
