"""Prompts: exact worked examples, degenerate masks (empty, one pixel, on the border), reproducibility."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from stable_sam.boxes import EmptyMaskError, NoisyBoxError, _jitter_box, box_from_mask, box_iou, noisy_box
from stable_sam.prompts import (
    COARSE_MASK_LOGIT,
    NotEnoughPixelsError,
    Prompt,
    coarse_mask,
    oracle_point,
    random_points,
    sample_prompt,
    sample_training_prompt,
)

ALL_TYPES = {"gt_box": 1.0, "noisy_box": 1.0, "points": 1.0, "coarse_mask": 1.0}


def square(size: int, lo: int, hi: int) -> np.ndarray:
    """size x size bool mask with rows and cols lo..hi (inclusive) set."""
    mask = np.zeros((size, size), dtype=bool)
    mask[lo : hi + 1, lo : hi + 1] = True
    return mask


def one_pixel(shape: tuple[int, int], y: int, x: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[y, x] = True
    return mask


# --- Prompt -------------------------------------------------------------------------------------------


def test_prompt_normalises_dtypes():
    p = Prompt("point_2", point_coords=[[1, 2], [3, 4]], point_labels=[1, 0])
    assert p.point_coords.dtype == np.float32 and p.point_coords.shape == (2, 2)
    assert p.point_labels.dtype == np.int64
    assert Prompt("gt_box", box=[0, 0, 3, 3]).box.dtype == np.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"point_coords": np.zeros((2, 2))}, "together"),
        ({"point_coords": np.zeros((2, 2)), "point_labels": np.ones(3)}, "shape"),
        ({"point_coords": np.zeros((2, 3)), "point_labels": np.ones(2)}, "N x 2"),
        ({"point_coords": np.zeros((1, 2)), "point_labels": np.array([2])}, "0 or 1"),
        ({"box": np.zeros(3)}, r"shape \(4,\)"),
        ({"box": np.array([5.0, 0, 1, 1])}, "x0 <= x1"),
        ({"mask_input": np.zeros((1, 4, 4))}, "h x w"),
        ({}, "no points"),
    ],
)
def test_prompt_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Prompt("x", **kwargs)


def test_prompt_is_frozen():
    p = Prompt("gt_box", box=[0, 0, 1, 1])
    with pytest.raises(AttributeError):
        p.kind = "other"


# --- boxes --------------------------------------------------------------------------------------------


def test_box_from_mask_is_tight_and_inclusive():
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[2:5, 3:9] = 1
    np.testing.assert_array_equal(box_from_mask(mask), [3, 2, 8, 4])
    assert box_from_mask(mask).dtype == np.float32


def test_box_from_mask_one_pixel_and_border():
    np.testing.assert_array_equal(box_from_mask(one_pixel((5, 7), 4, 6)), [6, 4, 6, 4])
    np.testing.assert_array_equal(box_from_mask(np.ones((5, 7), bool)), [0, 0, 6, 4])


def test_box_from_mask_empty_raises():
    with pytest.raises(EmptyMaskError, match="empty"):
        box_from_mask(np.zeros((4, 4), bool))
    assert issubclass(EmptyMaskError, ValueError)


@pytest.mark.parametrize(
    "mask, match",
    [
        (np.zeros((2, 4, 4)), "2-D"),
        (np.full((4, 4), 255, np.uint8), "binary"),
        (np.full((4, 4), "a"), "dtype"),
    ],
)
def test_masks_are_validated(mask, match):
    with pytest.raises(ValueError, match=match):
        box_from_mask(mask)


def test_box_iou_values():
    a = np.array([0, 0, 10, 10])
    assert box_iou(a, a) == 1.0
    assert box_iou(a, np.array([5, 0, 15, 10])) == pytest.approx(50 / 150)
    assert box_iou(a, np.array([20, 20, 30, 30])) == 0.0


def test_box_iou_degenerate_boxes():
    point = np.array([5, 5, 5, 5])
    assert box_iou(point, point) == 1.0
    assert box_iou(point, np.array([6, 5, 6, 5])) == 0.0
    # Both zero-width on x at the same x: compared as vertical segments.
    assert box_iou(np.array([0, 0, 0, 4]), np.array([0, 0, 0, 2])) == pytest.approx(0.5)
    # A flipped box is empty.
    assert box_iou(np.array([0, 0, 10, 10]), np.array([10, 0, 0, 10])) == 0.0


# --- noisy boxes --------------------------------------------------------------------------------------


def test_jitter_box_worked_example():
    out = _jitter_box(np.array([100, 100, 300, 200]), np.array([1.0, -1.0, 0.5, -0.5]), 0.4)
    np.testing.assert_allclose(out, [120, 90, 360, 170])


def test_noisy_box_respects_iou_and_image():
    box = np.array([100, 100, 300, 200], dtype=np.float32)
    gen = np.random.default_rng(0)
    boxes = [noisy_box(box, image_size=(480, 640), generator=gen) for _ in range(200)]
    ious = np.array([box_iou(b, box) for b in boxes])
    assert ious.min() >= 0.5 and ious.max() < 1.0
    assert all(b.dtype == np.float32 and b[0] <= b[2] and b[1] <= b[3] for b in boxes)
    # Centre moves by at most 0.4 * w / 2, size changes by at most 0.4 * w.
    widths = np.array([b[2] - b[0] for b in boxes])
    assert widths.min() >= 200 * 0.6 - 1e-3 and widths.max() <= 200 * 1.4 + 1e-3


def test_noisy_box_is_reproducible():
    box = np.array([10, 20, 50, 60])
    a = noisy_box(box, image_size=(100, 100), generator=np.random.default_rng(7))
    b = noisy_box(box, image_size=(100, 100), generator=np.random.default_rng(7))
    c = noisy_box(box, image_size=(100, 100), generator=np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_noisy_box_zero_scale_is_identity():
    box = np.array([10, 20, 50, 60], dtype=np.float32)
    out = noisy_box(box, image_size=(100, 100), generator=np.random.default_rng(0), noise_scale=0.0)
    np.testing.assert_array_equal(out, box)


def test_noisy_box_clamps_at_the_border():
    box = box_from_mask(np.ones((10, 20), bool))  # the whole image: (0, 0, 19, 9)
    gen = np.random.default_rng(1)
    for _ in range(50):
        out = noisy_box(box, image_size=(10, 20), generator=gen)
        assert out.min() >= 0 and out[2] <= 19 and out[3] <= 9
        assert box_iou(out, box) >= 0.5


@pytest.mark.parametrize("y, x", [(5, 5), (0, 0), (9, 19)])
def test_noisy_box_one_pixel_object(y, x):
    box = box_from_mask(one_pixel((10, 20), y, x))
    gen = np.random.default_rng(2)
    outs = [noisy_box(box, image_size=(10, 20), generator=gen) for _ in range(20)]
    for out in outs:
        assert out[0] <= out[2] and out[1] <= out[3]
        assert out.min() >= 0 and out[2] <= 19 and out[3] <= 9
        # The box still covers the pixel, and the noise is not a no-op.
        assert out[0] <= x + 0.5 and out[2] >= x - 0.5
    assert len({(o[0], o[2]) for o in outs}) > 1 and len({(o[1], o[3]) for o in outs}) > 1


def test_noisy_box_iou_window():
    box = np.array([100, 100, 300, 200])
    gen = np.random.default_rng(3)
    for _ in range(20):
        out = noisy_box(box, image_size=(480, 640), generator=gen, min_iou=0.5, max_iou=0.6)
        assert 0.5 <= box_iou(out, box) <= 0.6


def test_noisy_box_gives_up_with_a_clear_error():
    with pytest.raises(NoisyBoxError, match=r"100\.0, 100\.0, 300\.0, 200\.0"):
        noisy_box(
            np.array([100, 100, 300, 200]),
            image_size=(480, 640),
            generator=np.random.default_rng(0),
            min_iou=1.0,
            max_tries=5,
        )


def test_noisy_box_rejects_bad_arguments():
    gen = np.random.default_rng(0)
    with pytest.raises(ValueError, match="x0 <= x1"):
        noisy_box(np.array([5, 0, 1, 1]), image_size=(10, 10), generator=gen)
    with pytest.raises(ValueError, match="image_size"):
        noisy_box(np.array([0, 0, 1, 1]), image_size=(10,), generator=gen)
    with pytest.raises(ValueError, match="min_iou"):
        noisy_box(np.array([0, 0, 1, 1]), image_size=(10, 10), generator=gen, min_iou=0.7, max_iou=0.6)


# --- random points ------------------------------------------------------------------------------------


def test_random_points_lie_in_the_mask_as_xy():
    mask = np.zeros((6, 10), dtype=bool)
    mask[1, 2:9] = True  # one row: x varies, y == 1
    pts = random_points(mask, 5, generator=np.random.default_rng(0))
    assert pts.shape == (5, 2) and pts.dtype == np.float32
    np.testing.assert_array_equal(pts[:, 1], 1)
    assert mask[pts[:, 1].astype(int), pts[:, 0].astype(int)].all()
    assert len({tuple(p) for p in pts}) == 5  # without replacement


def test_random_points_are_uniform_and_reproducible():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[3, 3] = True
    gen = np.random.default_rng(0)
    counts = Counter(tuple(random_points(mask, 1, generator=gen)[0]) for _ in range(400))
    assert set(counts) == {(0.0, 0.0), (3.0, 3.0)} and min(counts.values()) > 150
    a = random_points(square(20, 3, 15), 10, generator=np.random.default_rng(4))
    b = random_points(square(20, 3, 15), 10, generator=np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)


def test_random_points_takes_all_pixels_when_k_equals_count():
    mask = square(6, 2, 3)  # 4 pixels
    pts = random_points(mask, 4, generator=np.random.default_rng(0))
    assert {tuple(p) for p in pts} == {(2.0, 2.0), (3.0, 2.0), (2.0, 3.0), (3.0, 3.0)}


def test_random_points_too_few_pixels():
    mask = one_pixel((5, 5), 0, 4)
    with pytest.raises(NotEnoughPixelsError, match="1 foreground pixels"):
        random_points(mask, 3, generator=np.random.default_rng(0))
    pts = random_points(mask, 3, generator=np.random.default_rng(0), replace=True)
    np.testing.assert_array_equal(pts, [[4, 0]] * 3)


def test_random_points_empty_and_bad_k():
    with pytest.raises(EmptyMaskError):
        random_points(np.zeros((3, 3), bool), 1, generator=np.random.default_rng(0))
    with pytest.raises(ValueError, match="k must be"):
        random_points(square(5, 1, 3), 0, generator=np.random.default_rng(0))


# --- oracle point -------------------------------------------------------------------------------------


def test_oracle_first_click_worked_example():
    point, label = oracle_point(square(9, 2, 6))
    np.testing.assert_array_equal(point, [4, 4])
    assert label == 1 and point.dtype == np.float32


def test_oracle_point_image_border_is_a_boundary():
    gt = np.zeros((9, 9), bool)
    gt[:, :4] = True  # touches the top, bottom and left border
    # Distance to the padded border: min(y + 1, 9 - y, x + 1, 4 - x), first max 2 at (x=1, y=1).
    # Without the pad the left border would not count and the click would go to x = 0.
    point, label = oracle_point(gt)
    np.testing.assert_array_equal(point, [1, 1])
    assert label == 1


def test_oracle_point_one_pixel():
    point, label = oracle_point(one_pixel((5, 5), 0, 4))
    np.testing.assert_array_equal(point, [4, 0])
    assert label == 1


def test_oracle_point_negative_click_on_false_positive():
    gt = square(12, 5, 6)
    pred = square(12, 1, 10)  # covers gt plus a wide false-positive ring
    point, label = oracle_point(gt, pred)
    assert label == 0
    x, y = point.astype(int)
    assert pred[y, x] and not gt[y, x]


def test_oracle_point_tie_is_negative():
    gt = np.zeros((5, 11), bool)
    pred = np.zeros((5, 11), bool)
    gt[1:4, 1:4] = True
    pred[1:4, 7:10] = True  # same shape, disjoint: max(D_fn) == max(D_fp)
    point, label = oracle_point(gt, pred)
    assert label == 0
    np.testing.assert_array_equal(point, [8, 2])


def test_oracle_point_skips_clicked_pixels():
    not_clicked = np.ones((9, 9), bool)
    not_clicked[4, 4] = False
    point, label = oracle_point(square(9, 2, 6), not_clicked=not_clicked)
    assert label == 1 and tuple(point) != (4.0, 4.0)
    np.testing.assert_array_equal(point, [3, 3])  # first pixel in row-major order at distance 2


def test_oracle_point_without_error_raises():
    gt = square(9, 2, 6)
    with pytest.raises(ValueError, match="no error"):
        oracle_point(gt, gt)
    with pytest.raises(ValueError, match="shape"):
        oracle_point(gt, np.zeros((8, 9), bool))


# --- coarse mask --------------------------------------------------------------------------------------


def test_coarse_mask_only_flips_the_edge_band():
    mask = square(64, 16, 47)
    out = coarse_mask(mask, generator=np.random.default_rng(0), size=(64, 64))
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert set(np.unique(out)) <= {0.0, 255.0}
    diff = (out > 0) != mask
    assert diff.any()  # the noise does something ...
    far = np.ones((64, 64), bool)
    far[8:56, 8:56] = False
    far[24:40, 24:40] = True
    assert not diff[far].any()  # ... but only near the edges


def test_coarse_mask_resizes_and_is_reproducible():
    mask = square(256, 64, 191)
    a = coarse_mask(mask, generator=np.random.default_rng(5), size=(32, 64))
    b = coarse_mask(mask, generator=np.random.default_rng(5), size=(32, 64))
    assert a.shape == (32, 64)
    np.testing.assert_array_equal(a, b)
    assert a[16, 32] == 255.0 and a[0, 0] == 0.0


def test_coarse_mask_logit_values_and_degenerate_masks():
    out = coarse_mask(square(32, 8, 23), generator=np.random.default_rng(0), size=(32, 32), values="logits")
    assert set(np.unique(out)) == {-COARSE_MASK_LOGIT, COARSE_MASK_LOGIT}
    for mask in (one_pixel((32, 32), 0, 0), np.ones((32, 32), bool)):
        out = coarse_mask(mask, generator=np.random.default_rng(0), size=(16, 16))
        assert out.shape == (16, 16) and set(np.unique(out)) <= {0.0, 255.0}
    np.testing.assert_array_equal(
        coarse_mask(np.ones((32, 32), bool), generator=np.random.default_rng(0), size=(16, 16)), 255.0
    )


def test_coarse_mask_rejects_bad_arguments():
    gen = np.random.default_rng(0)
    with pytest.raises(ValueError, match="divisible by 8"):
        coarse_mask(square(32, 8, 23), generator=gen, size=(30, 32))
    with pytest.raises(ValueError, match="values"):
        coarse_mask(square(32, 8, 23), generator=gen, size=(32, 32), values="probs")


# --- sample_prompt / sample_training_prompt ---------------------------------------------------------------


def test_draw_prompt_kinds():
    mask = square(32, 4, 20)
    gen = np.random.default_rng(0)
    kw = {"generator": gen, "mask_input_size": (16, 16)}
    np.testing.assert_array_equal(sample_prompt("gt_box", mask, **kw).box, [4, 4, 20, 20])
    assert box_iou(sample_prompt("noisy_box", mask, **kw).box, np.array([4, 4, 20, 20])) >= 0.5
    p = sample_prompt("point_10", mask, **kw)
    assert p.kind == "point_10" and p.point_coords.shape == (10, 2)
    np.testing.assert_array_equal(p.point_labels, np.ones(10))
    p = sample_prompt("coarse_mask", mask, **kw)
    assert p.mask_input.shape == (16, 16) and p.box is None and p.point_coords is None
    p = sample_prompt("oracle_point", mask, **kw)
    np.testing.assert_array_equal(p.point_coords, [[12, 12]])
    np.testing.assert_array_equal(p.point_labels, [1])


def test_draw_prompt_points_on_a_tiny_object_use_replacement():
    p = sample_prompt(
        "point_10", one_pixel((8, 8), 7, 0), generator=np.random.default_rng(0), mask_input_size=(8, 8)
    )
    np.testing.assert_array_equal(p.point_coords, [[0, 7]] * 10)


@pytest.mark.parametrize("kind", ["point_0", "point_", "points", "box", "point_1.5"])
def test_draw_prompt_unknown_kind(kind):
    with pytest.raises(ValueError, match="unknown prompt kind"):
        sample_prompt(kind, square(8, 2, 5), generator=np.random.default_rng(0), mask_input_size=(8, 8))


def test_draw_prompt_empty_mask():
    with pytest.raises(EmptyMaskError):
        sample_prompt(
            "gt_box", np.zeros((8, 8), bool), generator=np.random.default_rng(0), mask_input_size=(8, 8)
        )


def _training_kinds(mask, weights, n, seed=0, point_counts=(1, 3, 5, 10)):
    gen = np.random.default_rng(seed)
    return [
        sample_training_prompt(
            mask, generator=gen, weights=weights, point_counts=point_counts, mask_input_size=(16, 16)
        ).kind
        for _ in range(n)
    ]


def test_draw_training_prompt_mixture_is_uniform_by_default():
    kinds = _training_kinds(square(32, 4, 20), ALL_TYPES, 400)
    types = Counter("points" if k.startswith("point_") else k for k in kinds)
    assert set(types) == set(ALL_TYPES) and min(types.values()) > 70
    ks = Counter(k for k in kinds if k.startswith("point_"))
    assert set(ks) == {"point_1", "point_3", "point_5", "point_10"}


def test_draw_training_prompt_weights_and_reproducibility():
    mask = square(32, 4, 20)
    assert set(_training_kinds(mask, {"gt_box": 1.0, "coarse_mask": 0.0}, 20)) == {"gt_box"}
    assert set(_training_kinds(mask, {"points": 2.0}, 20, point_counts=[3])) == {"point_3"}
    assert _training_kinds(mask, ALL_TYPES, 30, seed=9) == _training_kinds(mask, ALL_TYPES, 30, seed=9)


def test_draw_training_prompt_falls_back_to_box_for_tiny_masks():
    mask = one_pixel((16, 16), 0, 15)
    assert set(_training_kinds(mask, {"points": 1.0}, 10, point_counts=[3, 10])) == {"gt_box"}
    assert set(_training_kinds(mask, {"points": 1.0}, 10, point_counts=[1])) == {"point_1"}


@pytest.mark.parametrize(
    "weights, match",
    [
        ({"box": 1.0}, "unknown prompt weight keys"),
        ({"gt_box": 0.0, "points": 0.0}, "all zero"),
        ({"gt_box": -1.0}, ">= 0"),
    ],
)
def test_draw_training_prompt_rejects_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        _training_kinds(square(8, 2, 5), weights, 1)


def test_draw_training_prompt_empty_mask():
    with pytest.raises(EmptyMaskError):
        _training_kinds(np.zeros((8, 8), bool), ALL_TYPES, 1)
