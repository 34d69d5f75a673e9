"""Losses: HQ-SAM's test vector, normalisation, point sampling, reproducibility and gradient flow."""

from __future__ import annotations

import math

import pytest
import torch

from stable_sam.losses import dice_loss, mask_loss, point_sample, sigmoid_bce_loss, uncertain_point_coords

N_HQSAM = 112 * 112
BCE_AT_ZERO = math.log(2)  # 0.69315
DICE_AT_ZERO = 1 - 12545 / 18817  # 0.33332


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- point_sample -------------------------------------------------------------------------------------


def test_point_sample_pixel_centres_and_xy_order():
    inputs = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    coords = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5]]])
    out = point_sample(inputs, coords)
    assert out.shape == (1, 1, 4)
    torch.testing.assert_close(out[0, 0], torch.tensor([1.0, 2.0, 3.0, 2.5]))


def test_point_sample_is_resolution_independent():
    small = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    big = torch.nn.functional.interpolate(small, scale_factor=4, mode="nearest")
    coords = torch.tensor([[[0.25, 0.25], [0.75, 0.75]]])
    torch.testing.assert_close(point_sample(small, coords), point_sample(big, coords))


def test_point_sample_rejects_bad_shapes():
    with pytest.raises(ValueError, match="B x C x H x W"):
        point_sample(torch.zeros(1, 4, 4), torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="B x P x 2"):
        point_sample(torch.zeros(2, 1, 4, 4), torch.zeros(1, 3, 2))


# --- uncertain_point_coords ---------------------------------------------------------------------------


def test_uncertain_point_coords_shape_range_and_no_grad():
    logits = torch.randn(3, 1, 16, 16, generator=gen(1), requires_grad=True)
    coords = uncertain_point_coords(logits, num_points=50, generator=gen())
    assert coords.shape == (3, 50, 2)
    assert coords.min() >= 0 and coords.max() <= 1
    assert not coords.requires_grad


def test_uncertain_point_coords_same_seed_same_points():
    logits = torch.randn(2, 1, 16, 16, generator=gen(1))
    a = uncertain_point_coords(logits, num_points=100, generator=gen(3))
    b = uncertain_point_coords(logits, num_points=100, generator=gen(3))
    c = uncertain_point_coords(logits, num_points=100, generator=gen(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_uncertain_point_coords_prefer_uncertain_points():
    # logit = 100 (x - 0.5): the uncertain points are those near x = 0.5.
    x = (torch.arange(64) + 0.5) / 64
    logits = (100 * (x - 0.5)).expand(1, 1, 64, 64)
    coords = uncertain_point_coords(logits, num_points=400, generator=gen())
    dist = (coords[0, :, 0] - 0.5).abs()
    # 300 most uncertain of 1200 uniform candidates: |x - 0.5| <~ 0.125; the 100 random ones spread out.
    assert dist[:300].max() < 0.2
    assert dist[300:].mean() > 0.15
    only_random = uncertain_point_coords(logits, num_points=400, importance_sample_ratio=0.0, generator=gen())
    assert (only_random[0, :, 0] - 0.5).abs().mean() > 0.2


def test_uncertain_point_coords_validates():
    with pytest.raises(ValueError, match="B x 1 x H x W"):
        uncertain_point_coords(torch.zeros(1, 2, 4, 4), num_points=4)
    with pytest.raises(ValueError, match="oversample_ratio"):
        uncertain_point_coords(torch.zeros(1, 1, 4, 4), num_points=4, oversample_ratio=0.5)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        uncertain_point_coords(torch.zeros(1, 1, 4, 4), num_points=4, importance_sample_ratio=1.5)


# --- point losses -------------------------------------------------------------------------------------


def test_point_losses_hqsam_test_vector():
    logits = torch.zeros(1, N_HQSAM)
    targets = torch.ones(1, N_HQSAM)
    assert sigmoid_bce_loss(logits, targets, 1).item() == pytest.approx(BCE_AT_ZERO, abs=1e-6)
    assert dice_loss(logits, targets, 1).item() == pytest.approx(DICE_AT_ZERO, abs=1e-6)
    assert BCE_AT_ZERO + DICE_AT_ZERO == pytest.approx(1.02647, abs=1e-5)


def test_point_losses_normalisation():
    logits = torch.randn(2, 30, generator=gen())
    targets = torch.rand(2, 30, generator=gen(1))
    per_mask = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)
    torch.testing.assert_close(sigmoid_bce_loss(logits, targets, 2), per_mask.sum() / 2)
    torch.testing.assert_close(sigmoid_bce_loss(logits, targets, 1), per_mask.sum())
    torch.testing.assert_close(dice_loss(logits, targets, 1), 2 * dice_loss(logits, targets, 2))


def test_dice_loss_empty_target_and_prediction_is_zero():
    assert dice_loss(torch.full((1, 10), -100.0), torch.zeros(1, 10), 1).item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_point_losses_validate():
    with pytest.raises(ValueError, match="B x P"):
        dice_loss(torch.zeros(1, 4), torch.zeros(1, 5), 1)
    with pytest.raises(ValueError, match="num_masks"):
        sigmoid_bce_loss(torch.zeros(1, 4), torch.zeros(1, 4), 0)


# --- mask_loss ----------------------------------------------------------------------------------------


def test_mask_loss_hqsam_test_vector():
    # 256 x 256 logits against a 1024 x 1024 target, as in HQ-SAM. BCE at logit 0 is ln 2 whatever the
    # target; dice is exact up to the zero padding of grid_sample in the half-pixel band at the border.
    out = mask_loss(torch.zeros(2, 1, 256, 256), torch.ones(2, 1, 1024, 1024), generator=gen())
    assert set(out) == {"bce", "dice", "total"}
    assert out["bce"].item() == pytest.approx(BCE_AT_ZERO, abs=1e-5)
    assert out["dice"].item() == pytest.approx(DICE_AT_ZERO, abs=1e-3)
    assert out["total"].item() == pytest.approx(1.02647, abs=1e-3)
    torch.testing.assert_close(out["total"], out["bce"] + out["dice"])


def test_mask_loss_num_masks():
    logits, targets = torch.zeros(2, 1, 32, 32), torch.ones(2, 1, 32, 32)
    default = mask_loss(logits, targets, num_points=100, generator=gen())
    halved = mask_loss(logits, targets, num_points=100, generator=gen(), num_masks=4)
    torch.testing.assert_close(halved["total"], default["total"] / 2)


def _square_target(res: int) -> torch.Tensor:
    target = torch.zeros(1, 1, res, res)
    target[..., res // 4 : 3 * res // 4, res // 4 : 3 * res // 4] = 1.0
    return target


def test_mask_loss_perfect_prediction_is_near_zero():
    target_low = _square_target(256)
    target = torch.nn.functional.interpolate(target_low, scale_factor=4, mode="nearest")
    perfect = mask_loss(20.0 * (2 * target_low - 1), target, generator=gen())
    inverted = mask_loss(-20.0 * (2 * target_low - 1), target, generator=gen())
    # Not exactly zero: bilinear sampling mixes +-20 across the 1-pixel edge band.
    assert perfect["total"].item() < 0.01
    assert inverted["total"].item() > 10.0


def test_mask_loss_gradient_flows_to_logits_only():
    logits = torch.randn(2, 1, 16, 16, generator=gen(), requires_grad=True)
    targets = _square_target(64).expand(2, 1, 64, 64).clone().requires_grad_(True)
    mask_loss(logits, targets, num_points=200, generator=gen())["total"].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert targets.grad is None


def test_mask_loss_same_seed_same_value():
    logits = torch.randn(2, 1, 16, 16, generator=gen(5))
    targets = _square_target(64).expand(2, 1, 64, 64)
    a = mask_loss(logits, targets, num_points=200, generator=gen(1))
    b = mask_loss(logits, targets, num_points=200, generator=gen(1))
    torch.testing.assert_close(a["total"], b["total"], rtol=0, atol=0)


def test_mask_loss_accepts_bool_targets():
    logits = torch.zeros(1, 1, 8, 8)
    out_bool = mask_loss(logits, torch.ones(1, 1, 8, 8, dtype=torch.bool), num_points=50, generator=gen())
    out_float = mask_loss(logits, torch.ones(1, 1, 8, 8), num_points=50, generator=gen())
    torch.testing.assert_close(out_bool["total"], out_float["total"])


@pytest.mark.parametrize(
    "logits, targets, match",
    [
        (torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 8), "logits must be B x 1"),
        (torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8), "targets must be B x 1"),
        (torch.zeros(2, 1, 8, 8), torch.zeros(2, 8, 8), "targets must be B x 1"),
        (torch.zeros(2, 1, 8, 8), torch.full((2, 1, 8, 8), 255.0), r"\[0, 1\]"),
        (torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8, dtype=torch.uint8), "dtype"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.long), torch.zeros(2, 1, 8, 8), "floating point"),
    ],
)
def test_mask_loss_validates(logits, targets, match):
    with pytest.raises(ValueError, match=match):
        mask_loss(logits, targets, num_points=10)
