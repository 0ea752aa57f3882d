"""Per-sample transforms (longtail.data.transforms): sampling rules, exact pixel effects, seeding."""

from __future__ import annotations

import io
import math
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from longtail.core.errors import ConfigError
from longtail.data import transforms as T


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth RGB image with noise (a stand-in for a photograph)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    a = np.stack([(x * 0.5) % 256, (y * 0.7) % 256, ((x + y) * 0.3) % 256], -1)
    a = np.clip(a + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def _px(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int64)


class _FixedRng:
    """Duck-typed generator that returns chosen draws, to drive a transform's branches."""

    def __init__(self, integers=(), random=()):
        self._integers, self._random = list(integers), list(random)

    def integers(self, *args, size=None, **kwargs):
        if size is None:
            return self._integers.pop(0)
        return np.array([self._integers.pop(0) for _ in range(size)])

    def random(self, size=None):
        if size is None:
            return self._random.pop(0)
        return np.array([self._random.pop(0) for _ in range(size)])


# ----------------------------------------------------------------------------- seeding


def test_sample_rng_depends_only_on_seed_epoch_index_stream():
    draw = T.sample_rng(3, 7, 11).random(4)
    assert np.array_equal(draw, T.sample_rng(3, 7, 11).random(4))
    others = [(3, 7, 12), (3, 8, 11), (4, 7, 11)]
    for args in others:
        assert not np.array_equal(draw, T.sample_rng(*args).random(4))
    assert not np.array_equal(draw, T.sample_rng(3, 7, 11, stream=1).random(4))
    with pytest.raises(ValueError, match="non-negative"):
        T.sample_rng(0, -1, 0)


def test_same_sample_gives_the_same_tensor_another_index_another():
    pipe = T.build_pipeline(
        "imagenet_train", color_jitter=0.4, auto_augment="imagenet", random_erasing=0.5
    )
    img = _photo(500, 375)
    a = pipe(img, T.sample_rng(0, 2, 5))
    b = pipe(img, T.sample_rng(0, 2, 5))
    assert a.dtype == torch.float32 and a.shape == (3, 224, 224)
    assert torch.equal(a, b)
    assert not torch.equal(a, pipe(img, T.sample_rng(0, 2, 6)))
    assert not torch.equal(a, pipe(img, T.sample_rng(0, 3, 5)))


class _Images(torch.utils.data.Dataset):
    def __init__(self, pipe, epoch):
        self.pipe, self.epoch = pipe, epoch

    def __len__(self):
        return 6

    def __getitem__(self, index):
        img = _photo(64 + 5 * index, 48, seed=index)
        return self.pipe(img, T.sample_rng(0, self.epoch, index))


def test_the_augmentation_is_the_same_with_any_number_of_workers():
    pipe = T.build_pipeline("imagenet_train", size=32, auto_augment="cifar10", color_jitter=0.3)
    data = _Images(pipe, epoch=1)
    serial = torch.cat(list(torch.utils.data.DataLoader(data, batch_size=2, num_workers=0)))
    workers = torch.utils.data.DataLoader(
        data, batch_size=2, num_workers=2, multiprocessing_context="fork"
    )
    assert torch.equal(serial, torch.cat(list(workers)))
    assert not torch.equal(serial[0], serial[1])


# ----------------------------------------------------------------------------- geometry


def test_random_resized_crop_boxes_respect_scale_ratio_and_area_distribution():
    rrc = T.RandomResizedCrop(224)
    side = 400
    boxes = [rrc.get_params(side, side, T.sample_rng(0, 0, i)) for i in range(4000)]
    top, left, h, w = (np.array(v, dtype=np.float64) for v in zip(*boxes))
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= side).all() and (left + w <= side).all()
    frac, log_ratio = w * h / side**2, np.log(w / h)
    # w, h >= 98 px here, so rounding them moves area and ratio by < 1.2 %
    assert frac.min() >= 0.08 * (1 - 0.012) and frac.max() <= 1.0
    assert log_ratio.min() >= math.log(3 / 4) - 0.012 and log_ratio.max() <= math.log(4 / 3) + 0.012
    # a square image accepts area fraction s with aspect r iff s <= min(r, 1/r): for s <= 3/4
    # always, above with probability -ln(s) / ln(4/3); the accepted s has density prop. to that
    ln43 = math.log(4 / 3)
    mass = (0.75 - 0.08) + (0.25 + 0.75 * math.log(0.75)) / ln43
    first = (0.75**2 - 0.08**2) / 2
    tail = (0.25 - (0.140625 - 0.28125 * math.log(0.75))) / ln43  # int_.75^1 -s ln s ds / ln43
    assert abs(frac.mean() - (first + tail) / mass) < 0.02  # expected 0.478; SE 0.004
    assert abs((frac < 0.5).mean() - (0.5 - 0.08) / mass) < 0.03  # expected 0.532
    assert abs(log_ratio.mean()) < 0.01  # symmetric in log ratio
    assert np.unique(top).size > 100 and np.unique(left).size > 100


def test_random_resized_crop_falls_back_to_a_centre_crop_and_resizes_its_box():
    rrc = T.RandomResizedCrop(224, scale=(0.9, 1.0))
    rng = T.sample_rng(0, 0, 0)
    # a 10:1 image cannot hold 90 % of its area at ratio <= 4/3: the clamped centre crop
    assert rrc.get_params(1000, 100, rng) == (0, 433, 100, 133)  # w = round(100 * 4/3)
    assert rrc.get_params(100, 1000, rng) == (433, 0, 133, 100)  # h = round(100 / (3/4))
    img = _photo(500, 375)
    top, left, h, w = T.RandomResizedCrop(224).get_params(500, 375, T.sample_rng(1, 0, 0))
    out = T.RandomResizedCrop(224)(img, T.sample_rng(1, 0, 0))
    expected = img.crop((left, top, left + w, top + h)).resize((224, 224), Image.BILINEAR)
    assert out.size == (224, 224) and np.array_equal(_px(out), _px(expected))


def test_flip_is_exact_mirroring():
    img = _photo(37, 23)
    flipped = T.RandomHorizontalFlip(p=1.0)(img, T.sample_rng(0, 0, 0))
    assert np.array_equal(_px(flipped), _px(img)[:, ::-1])
    assert T.RandomHorizontalFlip(p=0.0)(img, T.sample_rng(0, 0, 0)) is img
    flip = T.RandomHorizontalFlip()
    rate = np.mean([flip(img, T.sample_rng(0, 0, i)) is not img for i in range(2000)])
    assert abs(rate - 0.5) < 0.04


def test_random_crop_with_padding_shows_the_zero_border_of_its_offset():
    img = Image.new("RGB", (32, 32), (255, 255, 255))
    crop = T.RandomCrop(32, padding=4)
    seen = set()
    for i in range(300):
        out = _px(crop(img, T.sample_rng(0, 0, i)))
        rng = T.sample_rng(0, 0, i)
        dy, dx = int(rng.integers(0, 9)) - 4, int(rng.integers(0, 9)) - 4
        zeros = (out == 0).all(axis=2).sum()
        assert zeros == 32 * (abs(dy) + abs(dx)) - abs(dy) * abs(dx)
        assert (out == 0).all(axis=2).sum() + (out == 255).all(axis=2).sum() == 1024
        seen.add((dy, dx))
    assert len(seen) > 70  # of 81 offsets


@pytest.mark.parametrize("width, height", [(400, 300), (300, 400)])
def test_resize_and_centre_crop_of_a_300x400_image(width, height):
    img = _photo(width, height)
    out = T.build_pipeline("imagenet_eval")(img, T.sample_rng(0, 0, 0))
    assert out.shape == (3, 224, 224)
    # shorter side 300 -> 256, longer int(256 * 400 / 300) = 341; the 224 box starts at
    # round(32 / 2) = 16 and round(117 / 2) = round(58.5) = 58 (half to even)
    assert T.resized_size(height, width, 256) == ((256, 341) if width > height else (341, 256))
    resized = img.resize((341, 256) if width > height else (256, 341), Image.BILINEAR)
    box = (58, 16, 282, 240) if width > height else (16, 58, 240, 282)
    assert T.center_crop_box(resized.height, resized.width, 224, 224) == (box[1], box[0])
    expected = T.Normalize()(T.ToTensor()(resized.crop(box)))
    assert torch.equal(out, expected)


def test_centre_crop_of_a_smaller_image_pads_with_zeros():
    img = Image.new("RGB", (201, 230), (9, 9, 9))
    assert T.center_crop_box(230, 201, 224, 224) == (3, -11)  # pad (224 - 201) // 2 = 11 left
    out = _px(T.CenterCrop(224)(img))
    assert out.shape == (224, 224, 3)
    assert (out[:, :11] == 0).all() and (out[:, 11:212] == 9).all() and (out[:, 212:] == 0).all()


# ----------------------------------------------------------------------------- tensors


def test_to_tensor_and_normalise_against_hand_computed_values():
    img = Image.new("RGB", (2, 1), (255, 0, 128))
    x = T.ToTensor()(img)
    assert x.shape == (3, 1, 2) and x.dtype == torch.float32
    assert x[:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 128 / 255], abs=1e-7)
    y = T.Normalize()(x)  # the ImageNet constants
    # (1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.50196078 - 0.406) / 0.225
    assert y[:, 0, 1].tolist() == pytest.approx([2.2489083, -2.0357143, 0.4264924], abs=1e-6)
    assert T.IMAGENET_MEAN == (0.485, 0.456, 0.406) and T.IMAGENET_STD == (0.229, 0.224, 0.225)
    grey = T.ToTensor()(Image.new("L", (3, 2), 51))
    assert grey.shape == (1, 2, 3) and torch.allclose(grey, torch.full((1, 2, 3), 0.2))


def test_cutout_zeroes_exactly_a_clipped_16_square():
    assert T.cutout_box(3, 5, 32, 32, 16) == (0, 11, 0, 13)  # a corner: 11 x 13 = 143 pixels
    assert T.cutout_box(30, 31, 32, 32, 16) == (22, 32, 23, 32)  # 10 x 9 = 90
    assert T.cutout_box(16, 16, 32, 32, 16) == (8, 24, 8, 24)  # inside: 16 x 16 = 256
    cut = T.Cutout(16)
    counts = set()
    for i in range(200):
        x = torch.rand(3, 32, 32) + 0.5
        out = cut(x, T.sample_rng(0, 0, i))
        [(y1, y2, x1, x2)] = cut.get_params(32, 32, T.sample_rng(0, 0, i))
        zero = out == 0
        assert zero.sum() == 3 * (y2 - y1) * (x2 - x1)
        assert zero[:, y1:y2, x1:x2].all() and torch.equal(zero[0], zero[2])
        assert torch.equal(out[~zero], x[~zero])
        counts.add(int(zero[0].sum()))
    assert 256 in counts and min(counts) >= 64  # a centre at a corner keeps >= 8 x 8


def test_cutout_at_a_fixed_corner_centre():
    x = torch.ones(3, 32, 32)
    out = T.Cutout(16)(x, _FixedRng(integers=[3, 5]))  # centre row 3, column 5
    assert int((out == 0).sum()) == 3 * 143
    assert (out[:, :11, :13] == 0).all() and (out[:, 11:, :] == 1).all()


def test_random_erasing_erases_one_box_within_its_bounds():
    erase = T.RandomErasing(p=1.0)
    x = torch.rand(3, 224, 224) + 0.5
    fracs = []
    for i in range(200):
        out = erase(x, T.sample_rng(0, 0, i))
        rng = T.sample_rng(0, 0, i)
        rng.random()  # the p draw
        top, left, h, w = erase.get_params(224, 224, rng)
        assert int((out == 0).sum()) == 3 * h * w
        assert (out[:, top : top + h, left : left + w] == 0).all()
        fracs.append(h * w / 224**2)
    assert 0.02 * 0.9 <= min(fracs) and max(fracs) <= 0.33 * 1.1
    assert torch.equal(T.RandomErasing(p=0.0)(x, T.sample_rng(0, 0, 0)), x)
    noisy = T.RandomErasing(p=1.0, value="random")(x, T.sample_rng(0, 0, 1))
    assert (noisy < 0).any()  # standard normal noise


def test_tensor_resize_matches_torch_bilinear_without_antialias():
    g = torch.Generator().manual_seed(0)
    for h, w, size in [(32, 32, 224), (300, 400, 224), (7, 5, (3, 2)), (375, 500, (256, 256))]:
        x = torch.rand(3, h, w, generator=g)
        ours = T.ResizeTensor(size)(x)
        ref = torch.nn.functional.interpolate(
            x[None], size=ours.shape[-2:], mode="bilinear", align_corners=False, antialias=False
        )[0]
        assert (ours - ref).abs().max() <= 2.5e-7  # the same taps; at most one float32 rounding
    assert T.ResizeTensor(224)(torch.rand(3, 32, 48)).shape == (3, 224, 336)


# ----------------------------------------------------------------------------- colour


def test_colour_jitter_with_zero_strength_is_the_identity():
    img = _photo(40, 30)
    for jitter in (T.ColorJitter(), T.ColorJitter(0, 0, 0, 0), T.ColorJitter((1, 1), (1, 1))):
        for i in range(5):
            assert jitter(img, T.sample_rng(0, 0, i)) is img
    order, factors = T.ColorJitter(0.5, 0, 0.2, 0.1).get_params(T.sample_rng(0, 0, 0))
    assert sorted(order) == [0, 1, 2, 3] and factors[1] is None
    assert 0.5 <= factors[0] <= 1.5 and 0.8 <= factors[2] <= 1.2 and -0.1 <= factors[3] <= 0.1
    brighter = T.ColorJitter(brightness=(1.5, 1.5))(img, T.sample_rng(0, 0, 0))
    # Pillow's blend with black truncates: floor(1.5 v), clipped
    assert np.array_equal(_px(brighter), np.minimum(255, np.floor(_px(img) * 1.5)))
    with pytest.raises(ConfigError, match="hue"):
        T.ColorJitter(hue=0.6)


def test_hue_shift_wraps_and_leaves_grey_images_alone():
    img = _photo(20, 10)
    grey = img.convert("L")
    assert T.adjust_hue(grey, 0.3) is grey
    h0 = np.asarray(img.convert("HSV"))[..., 0].astype(int)
    shifted = np.asarray(T.adjust_hue(img, -0.1).convert("HSV"))[..., 0].astype(int)
    # int(-25.5) = -25 mod 256: the HSV -> RGB -> HSV round trip moves H by at most a few
    diff = (shifted - h0 + 25) % 256
    diff = np.minimum(diff, 256 - diff)
    assert np.median(diff) <= 1


# ----------------------------------------------------------------------------- AutoAugment


def test_policy_tables_have_the_published_sub_policies():
    imagenet, cifar = T.AUTOAUGMENT_POLICIES["imagenet"], T.AUTOAUGMENT_POLICIES["cifar10"]
    assert len(imagenet) == 25 and len(cifar) == 25
    assert imagenet[0] == (T.PolicyOp("Posterize", 0.4, 8), T.PolicyOp("Rotate", 0.6, 9))
    assert imagenet[18] == (T.PolicyOp("ShearX", 0.6, 5), T.PolicyOp("Equalize", 1.0, None))
    assert cifar[0] == (T.PolicyOp("Invert", 0.1, None), T.PolicyOp("Contrast", 0.2, 6))
    assert cifar[21] == (T.PolicyOp("TranslateY", 0.9, 9), T.PolicyOp("TranslateY", 0.7, 9))
    for table in (imagenet, cifar):
        for sub in table:
            for op in sub:
                assert op.name in T.OP_NAMES and 0 <= op.prob <= 1
                has_bins = T.magnitude_bins(op.name, 10, 32, 32) is not None
                assert (op.bin is not None) == has_bins and (op.bin is None or 0 <= op.bin <= 9)


def test_magnitude_bins_are_torchvisions():
    assert T.magnitude_bins("Rotate", 10, 32, 32)[9] == 30.0
    assert T.magnitude_bins("ShearX", 10, 32, 32)[5] == pytest.approx(0.3 * 5 / 9)
    assert T.magnitude_bins("Posterize", 10, 32, 32) == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    solarize = T.magnitude_bins("Solarize", 10, 32, 32)
    assert solarize[0] == 255.0 and solarize[-1] == 0.0
    assert T.magnitude_bins("TranslateX", 10, 500, 375)[9] == pytest.approx(150 / 331 * 500)
    assert T.magnitude_bins("TranslateY", 10, 500, 375)[9] == pytest.approx(150 / 331 * 375)
    assert T.magnitude_bins("Posterize", 31, 32, 32)[9] == 7  # RandAugment M = 9
    assert T.magnitude_bins("Invert", 10, 32, 32) is None
    assert len(T.RANDAUGMENT_OPS) == 14 and "Invert" not in T.RANDAUGMENT_OPS


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_every_op_runs_and_keeps_the_size(mode):
    img = _photo(37, 29).convert(mode)
    for name in T.OP_NAMES:
        bins = T.magnitude_bins(name, 10, img.width, img.height) or [0.0]
        signs = (1, -1) if T.is_signed(name) else (1,)
        for m in {s * v for v in (bins[0], bins[len(bins) // 2], bins[-1]) for s in signs}:
            for fill in (None, 128):
                out = T.apply_op(img, name, m, fill=fill)
                assert out.size == img.size and out.mode == mode, (name, m)
    a = _px(img)
    assert np.array_equal(_px(T.apply_op(img, "Invert", 0)), 255 - a)
    assert np.array_equal(_px(T.apply_op(img, "Posterize", 4)), a & 0xF0)
    assert np.array_equal(_px(T.apply_op(img, "Solarize", 127.5)), np.where(a < 128, a, 255 - a))
    assert np.array_equal(_px(T.apply_op(img, "Brightness", 0.0)), a)
    moved = _px(T.apply_op(img, "TranslateX", 5.7, fill=7))  # int(5.7) = 5 px to the right
    assert np.array_equal(moved[:, 5:], a[:, :-5]) and (moved[:, :5] == 7).all()
    up = _px(T.apply_op(img, "TranslateY", -3.2))
    assert np.array_equal(up[:-3], a[3:]) and (up[-3:] == 0).all()


def test_geometric_ops_follow_torchvisions_conventions():
    img = _photo(40, 40)
    a = _px(img)
    # positive rotation is counter-clockwise about the centre
    assert np.array_equal(_px(T.apply_op(img, "Rotate", 90.0)), np.rot90(a))
    # shears are about the top-left corner: row 0 stays, the last row moves by ~0.3 * 39.5 px
    sheared = _px(T.apply_op(img, "ShearX", 0.3))
    assert np.array_equal(sheared[0], a[0])
    shift = int(0.5 + 0.3 * 39.5)
    assert np.array_equal(sheared[39, : 40 - shift], a[39, shift:])
    assert np.array_equal(_px(T.apply_op(img, "ShearY", -0.3))[:, 0], a[:, 0])


def test_autoaugment_applies_a_drawn_sub_policy_with_probability_at_most_p():
    img = _photo(32, 32)
    aa = T.AutoAugment("imagenet")
    # sub-policy 13 = (Invert 0.6, Equalize 1.0): draws 0.6 (applied, <= p) and 0.99 (applied)
    out = aa(img, _FixedRng(integers=[13, 1, 1], random=[0.6, 0.99]))
    assert np.array_equal(_px(out), _px(ImageOps.equalize(ImageOps.invert(img))))
    out = aa(img, _FixedRng(integers=[13, 1, 1], random=[0.61, 0.99]))  # Invert not applied
    assert np.array_equal(_px(out), _px(ImageOps.equalize(img)))
    # CIFAR-10 sub-policy 1 = (Rotate 0.7 bin 2 = 6.67 deg, TranslateX 0.3): Rotate only, sign
    # draw 0 = negative
    cifar = T.AutoAugment("cifar10")
    out = cifar(img, _FixedRng(integers=[1, 0, 1], random=[0.0, 1.0]))
    assert np.array_equal(_px(out), _px(img.rotate(-30 * 2 / 9, Image.NEAREST)))
    with pytest.raises(ConfigError, match="policy"):
        T.AutoAugment("svhn-x")


def test_randaugment_applies_n_ops_at_magnitude_m():
    img = _photo(32, 32)
    ra = T.RandAugment(num_ops=2, magnitude=9)
    # ops 12 (AutoContrast) then 10 (Posterize, M 9 of 31 = 7 bits)
    out = ra(img, _FixedRng(integers=[12, 10]))
    assert np.array_equal(_px(out), _px(ImageOps.posterize(ImageOps.autocontrast(img), 7)))
    for i in range(20):
        assert ra(img, T.sample_rng(0, 0, i)).size == (32, 32)
    assert T.RandAugment(num_ops=0)(img, T.sample_rng(0, 0, 0)) is img
    with pytest.raises(ConfigError, match="magnitude"):
        T.RandAugment(magnitude=31)


# ----------------------------------------------------------------------------- pipelines


def test_rsam_pt_cifar_yields_3x224x224_with_the_cutout_before_normalising():
    pipe = T.build_pipeline("rsam_pt_cifar")
    img = _photo(32, 32)
    mean, std = np.float32(T.CIFAR_MEAN[0]), np.float32(T.CIFAR_STD[0])
    black = (np.float32(0) - mean) / std  # a cut-out pixel after the resize and normalisation
    for i in range(10):
        out = pipe(img, T.sample_rng(0, 0, i))
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32
        # >= 8 x 8 source pixels are cut out: >= (8 * 7 - 7) ** 2 output pixels are exactly 0
        assert int((out[0] == float(black)).sum()) >= 40 * 40
    assert [type(t).__name__ for t in pipe.transforms] == [
        "RandomCrop",
        "RandomHorizontalFlip",
        "AutoAugment",
        "ToTensor",
        "Cutout",
        "ResizeTensor",
        "Normalize",
    ]
    grey = pipe(img.convert("L"), T.sample_rng(0, 0, 0))
    assert grey.shape == (3, 224, 224)
    assert T.build_pipeline("rsam_pt_cifar_eval")(img, None).shape == (3, 224, 224)


def test_pipeline_options_are_checked():
    with pytest.raises(ConfigError, match="'colour_jitter'"):
        T.build_pipeline("imagenet_train", colour_jitter=0.4)
    with pytest.raises(ConfigError, match="imagenet_tran"):
        T.build_pipeline("imagenet_tran")
    with pytest.raises(ConfigError, match="not both"):
        T.build_pipeline("imagenet_train", auto_augment="imagenet", rand_augment=(2, 9))
    with pytest.raises(ConfigError, match="scale"):
        T.build_pipeline("imagenet_train", scale=(1.0, 0.08))
    names = [
        type(t).__name__
        for t in T.build_pipeline(
            "imagenet_train", rand_augment=(2, 9), color_jitter=0.4, random_erasing=0.25
        ).transforms
    ]
    assert names == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "ColorJitter",
        "RandAugment",
        "ToTensor",
        "Normalize",
        "RandomErasing",
    ]
    assert set(T.PIPELINES.names()) >= {"imagenet_train", "imagenet_eval", "rsam_pt_cifar"}


def test_imagenet_train_time_per_image(capsys):
    """Measured on our 2-core CPU (busy with a benchmark): decode ~2 ms, transform 1.3 - 2.8 ms
    per image (RandomResizedCrop 224 + flip + to-tensor + normalise of a 500x375 JPEG)."""
    buf = io.BytesIO()
    _photo(500, 375).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    pipe = T.build_pipeline("imagenet_train")
    n = 40
    decoded = []
    t0 = time.perf_counter()
    for _ in range(n):
        img = Image.open(io.BytesIO(data))
        img.load()
        decoded.append(img)
    t1 = time.perf_counter()
    for i, img in enumerate(decoded):
        out = pipe(img, T.sample_rng(0, 0, i))
    t2 = time.perf_counter()
    assert out.shape == (3, 224, 224)
    with capsys.disabled():
        print(
            f"\n[imagenet_train, 500x375 JPEG] decode {(t1 - t0) / n * 1e3:.2f} ms, "
            f"transform {(t2 - t1) / n * 1e3:.2f} ms per image"
        )
