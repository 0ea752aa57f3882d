"""Batched crop/flip against a per-image reference; LR schedules against the LDAM-DRW recipe."""

import math

import torch
import torch.nn.functional as F

from longtail.data.augment import AugmentParams, normalize, random_crop_flip, sample_params
from longtail.optim.schedules import CosineSchedule, StepSchedule


def test_batched_crop_flip_equals_per_image_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    params = sample_params(16, 4, True, g)
    out = random_crop_flip(x, params, 4)
    for i in range(16):
        padded = F.pad(x[i], (4, 4, 4, 4))
        dy, dx = params.offsets[i].tolist()
        ref = padded[:, dy : dy + 32, dx : dx + 32]
        if params.flips[i]:
            ref = ref.flip(2)
        assert torch.equal(out[i], ref)
    assert 0 < int(params.flips.sum()) < 16
    assert int(params.offsets.min()) >= 0 and int(params.offsets.max()) <= 8


def test_no_padding_no_flip_is_identity():
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    p = AugmentParams(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, dtype=torch.bool))
    assert torch.equal(random_crop_flip(x, p, 0), x)


def test_normalize_matches_formula():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    y = normalize(x, (0.5,), (0.25,))
    torch.testing.assert_close(y, torch.tensor([[[[-2.0, 2.0]]]]))


def test_step_schedule_is_the_ldam_recipe():
    s = StepSchedule(200, warmup_epochs=5, milestones=[160, 180], gamma=0.01)
    lr = [0.1 * s.factor(e, 0, 100) for e in range(200)]
    assert [round(v, 6) for v in lr[:5]] == [0.02, 0.04, 0.06, 0.08, 0.1]
    assert lr[159] == 0.1 and math.isclose(lr[160], 1e-3) and math.isclose(lr[179], 1e-3)
    assert math.isclose(lr[180], 1e-5) and math.isclose(lr[199], 1e-5)


def test_cosine_schedule_endpoints():
    s = CosineSchedule(10, warmup_epochs=0)
    assert s.factor(0, 0, 10) == 1.0
    assert math.isclose(s.factor(5, 0, 10), 0.5)
    assert s.factor(9, 9, 10) < 0.01
