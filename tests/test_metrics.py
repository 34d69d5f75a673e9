"""Metrics: the Boundary IoU worked examples, the dilation table, stability and COCO mask AP."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stable_sam.metrics import (
    boundary_dilation,
    boundary_iou,
    coco_mask_ap,
    encode_mask,
    mask_iou,
    mask_to_boundary,
    stability,
)


def box_mask(shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Bool mask with rows[0]..rows[1] x cols[0]..cols[1] (inclusive) set."""
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return mask


# --- IoU and Boundary IoU -----------------------------------------------------------------------------


def test_mask_iou_basic_and_empty():
    gt = box_mask((4, 4), (0, 1), (0, 1))
    assert mask_iou(gt, gt) == 1.0
    assert mask_iou(gt, box_mask((4, 4), (0, 1), (1, 2))) == pytest.approx(2 / 6)
    assert mask_iou(gt, np.zeros((4, 4), bool)) == 0.0
    assert math.isnan(mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), np.uint8)))


def test_mask_iou_validates():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        mask_iou(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="binary"):
        mask_iou(np.zeros((4, 4), bool), np.full((4, 4), 0.5))


@pytest.mark.parametrize(
    "height, width, d",
    [
        (10, 10, 1),
        (17, 17, 1),
        (18, 18, 1),
        (100, 100, 3),
        (480, 640, 16),
        (1024, 1024, 29),
        (1080, 1920, 44),
    ],
)
def test_boundary_dilation_table(height, width, d):
    assert boundary_dilation(height, width) == d


def test_mask_to_boundary_is_the_inner_ring():
    mask = box_mask((10, 10), (2, 7), (2, 7))
    ring = mask & ~box_mask((10, 10), (3, 6), (3, 6))
    np.testing.assert_array_equal(mask_to_boundary(mask), ring)
    assert mask_to_boundary(mask).dtype == bool


def test_mask_to_boundary_image_border_is_contour():
    # A full image is all boundary within d of the border: d = 3 for 100 x 100.
    boundary = mask_to_boundary(np.ones((100, 100), np.uint8))
    expected = np.ones((100, 100), bool)
    expected[3:97, 3:97] = False
    np.testing.assert_array_equal(boundary, expected)


def test_example_a_shift_by_one():
    gt = box_mask((10, 10), (2, 7), (2, 7))
    pred = box_mask((10, 10), (2, 7), (3, 8))
    assert mask_to_boundary(gt).sum() == 20
    assert boundary_iou(gt, pred) == pytest.approx(1 / 3)
    assert mask_iou(gt, pred) == pytest.approx(30 / 42)


def test_example_b_object_on_the_image_border():
    gt = box_mask((10, 10), (0, 9), (0, 4))
    pred = box_mask((10, 10), (0, 9), (0, 5))
    assert mask_to_boundary(gt).sum() == 26 and mask_to_boundary(pred).sum() == 28
    assert boundary_iou(gt, pred) == pytest.approx(0.5)
    assert mask_iou(gt, pred) == pytest.approx(50 / 60)


def test_example_c_wider_band():
    gt = box_mask((100, 100), (20, 79), (20, 79))
    pred = box_mask((100, 100), (22, 81), (22, 81))
    assert mask_to_boundary(gt).sum() == 60**2 - 54**2
    assert boundary_iou(gt, pred) == pytest.approx(236 / 1132)
    assert boundary_iou(gt, pred) == pytest.approx(0.20848, abs=1e-5)
    assert mask_iou(gt, pred) == pytest.approx(3364 / 3836)


def test_example_d_thin_lines_identity_and_empty():
    gt = box_mask((20, 20), (10, 10), (2, 17))
    pred = box_mask((20, 20), (11, 11), (2, 17))
    assert boundary_iou(gt, pred) == 0.0 and mask_iou(gt, pred) == 0.0
    assert boundary_iou(gt, gt) == 1.0
    empty = np.zeros((20, 20), bool)
    assert math.isnan(boundary_iou(empty, empty))
    assert boundary_iou(gt, empty) == 0.0


# --- stability ----------------------------------------------------------------------------------------


def test_stability_identical_predictions():
    m = box_mask((8, 8), (1, 4), (1, 4))
    assert stability([m, m, m]) == 1.0


def test_stability_is_mean_pairwise_iou():
    a = box_mask((4, 4), (0, 0), (0, 1))  # 2 px
    b = box_mask((4, 4), (0, 0), (0, 3))  # 4 px, contains a
    c = box_mask((4, 4), (3, 3), (0, 3))  # disjoint from both
    # IoU(a, b) = 0.5, IoU(a, c) = 0, IoU(b, c) = 0
    assert stability([a, b, c]) == pytest.approx(0.5 / 3)
    assert stability([a, b]) == pytest.approx(0.5)


def test_stability_empty_pairs_count_as_identical():
    empty = np.zeros((4, 4), bool)
    full = np.ones((4, 4), np.uint8)
    assert stability([empty, empty]) == 1.0
    assert stability([empty, empty, full]) == pytest.approx(1 / 3)


def test_stability_validates():
    m = np.zeros((4, 4), bool)
    with pytest.raises(ValueError, match="K >= 2"):
        stability([m])
    with pytest.raises(ValueError, match="same shape"):
        stability([m, np.zeros((4, 5), bool)])


# --- COCO mask AP -------------------------------------------------------------------------------------


def _coco_gt(masks: list[np.ndarray], polygons: bool = False) -> dict:
    images = [{"id": i + 1, "height": m.shape[0], "width": m.shape[1]} for i, m in enumerate(masks)]
    annotations = []
    for i, m in enumerate(masks):
        if polygons:
            ys, xs = np.nonzero(m)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1  # pixel edges
            segmentation = [[float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]]
        else:
            segmentation = encode_mask(m)
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "segmentation": segmentation})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}


def _detections(masks: list[np.ndarray]) -> list[dict]:
    return [
        {"image_id": i + 1, "category_id": 1, "segmentation": encode_mask(m), "score": 0.9}
        for i, m in enumerate(masks)
    ]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_encode_mask_round_trips():
    from pycocotools import mask as mask_utils

    m = box_mask((5, 7), (1, 3), (2, 6))
    rle = encode_mask(m)
    assert rle["size"] == [5, 7] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(mask_utils.decode({**rle, "counts": rle["counts"].encode()}), m)


def test_coco_mask_ap_perfect_prediction():
    masks = [box_mask((64, 64), (10, 40), (10, 40)), box_mask((64, 64), (0, 20), (30, 63))]
    gt = _coco_gt(masks)
    out = coco_mask_ap(gt, _detections(masks))
    assert out == {"map": pytest.approx(1.0), "map50": pytest.approx(1.0)}
    assert "iscrowd" not in gt["annotations"][0]  # the caller's dict is not modified


def test_coco_mask_ap_shifted_prediction():
    gt_mask = box_mask((64, 64), (10, 49), (10, 49))  # 40 x 40
    pred = box_mask((64, 64), (10, 49), (18, 57))  # shifted by 8: IoU = 32 / 48 = 0.667
    assert 0.5 < mask_iou(gt_mask, pred) < 0.75
    out = coco_mask_ap(_coco_gt([gt_mask]), _detections([pred]))
    assert out["map50"] == pytest.approx(1.0)
    # Matched at the IoU thresholds 0.50, 0.55, 0.60, 0.65 of the ten in [.5:.95].
    assert out["map"] == pytest.approx(0.4)


def test_coco_mask_ap_polygon_gt():
    masks = [box_mask((64, 64), (10, 40), (10, 40))]
    out = coco_mask_ap(_coco_gt(masks, polygons=True), _detections(masks))
    assert out["map"] == pytest.approx(1.0) and out["map50"] == pytest.approx(1.0)


def test_coco_mask_ap_empty_detections_and_validation(capsys):
    masks = [box_mask((16, 16), (2, 9), (2, 9))]
    gt = _coco_gt(masks)
    assert coco_mask_ap(gt, []) == {"map": 0.0, "map50": 0.0}
    with pytest.raises(ValueError, match="image_id 7"):
        coco_mask_ap(gt, [{**_detections(masks)[0], "image_id": 7}])
    with pytest.raises(ValueError, match="annotations"):
        coco_mask_ap({**gt, "annotations": []}, _detections(masks))
    coco_mask_ap(gt, _detections(masks))
    assert capsys.readouterr().out == ""  # pycocotools' progress printing is captured


def ndimage_blobs(rng, shape, density):
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.random(shape), sigma=3)
    return noise > np.quantile(noise, 1 - density)


def test_a_precomputed_gt_boundary_gives_the_same_boundary_iou():
    from stable_sam.metrics import boundary_iou, mask_to_boundary

    rng = np.random.default_rng(0)
    gt, pred = ndimage_blobs(rng, (90, 70), 0.4), ndimage_blobs(rng, (90, 70), 0.5)
    assert boundary_iou(gt, pred, gt_boundary=mask_to_boundary(gt)) == boundary_iou(gt, pred)
    with pytest.raises(ValueError, match="gt_boundary must have the GT's shape"):
        boundary_iou(gt, pred, gt_boundary=np.zeros((3, 3), bool))
