"""Segmentation metrics: mask IoU, Boundary IoU, prompt stability (ST) and COCO mask AP.

Masks are H x W numpy arrays, bool or numbers in {0, 1}, at the resolution the metric is taken at
(HQ-SAM: the original GT resolution, prediction = upsampled logits > 0, GT = label > 128).
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

__all__ = [
    "as_bool_mask",
    "boundary_dilation",
    "boundary_iou",
    "coco_mask_ap",
    "encode_mask",
    "mask_iou",
    "mask_to_boundary",
    "stability",
]


def as_bool_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """A 2-D bool view of a binary mask; non-binary values are rejected rather than thresholded."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D H x W array, got shape {mask.shape}")
    if mask.dtype == bool:
        return mask
    if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
        raise ValueError(f"{name} must be bool or numeric, got dtype {mask.dtype}")
    if not np.all((mask == 0) | (mask == 1)):
        raise ValueError(
            f"{name} must be binary (bool or values in {{0, 1}}), got dtype {mask.dtype} with values in "
            f"[{mask.min()}, {mask.max()}]; binarise it first (e.g. logits > 0, label > 128)"
        )
    return mask.astype(bool)


def _mask_pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = as_bool_mask(gt, "gt")
    pred = as_bool_mask(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred must have the same shape, got gt {gt.shape} and pred {pred.shape}")
    return gt, pred


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else math.nan


def mask_iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """|pred & gt| / |pred | gt|.

    Arguments:
      gt, pred (np.ndarray): H x W binary masks.

    Returns:
      (float): IoU in [0, 1]; NaN when both masks are empty (0 / 0, as HQ-SAM's ``mask_iou``).
    """
    return _iou(*_mask_pair(gt, pred))


def boundary_dilation(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """Boundary width d in pixels: int(round(dilation_ratio * image diagonal)), at least 1.

    Python's ``round`` is half-to-even, kept as in the reference implementation.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    if dilation_ratio <= 0:
        raise ValueError(f"dilation_ratio must be > 0, got {dilation_ratio}")
    return max(round(float(dilation_ratio) * math.sqrt(height**2 + width**2)), 1)


def mask_to_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """The inner boundary band of a mask, exactly as the official Boundary IoU code (and sam-hq).

    The mask is padded with a 1-pixel ring of zeros, so the image border counts as contour, eroded d
    times with a 3 x 3 all-ones kernel (d = ``boundary_dilation``) and cropped; the boundary is
    mask AND NOT eroded, i.e. the foreground pixels within chessboard distance d of the background.

    Arguments:
      mask (np.ndarray): H x W binary mask.
      dilation_ratio (float): boundary width as a fraction of the image diagonal.

    Returns:
      (np.ndarray): H x W bool boundary.
    """
    mask = as_bool_mask(mask, "mask")
    d = boundary_dilation(*mask.shape, dilation_ratio=dilation_ratio)
    padded = np.pad(mask, 1, constant_values=False)
    # scipy's iterated erosion only revisits changed pixels: measured faster than one distance
    # transform or a (2d + 1) minimum filter at 12 MP (0.15 s vs 0.42 s / 0.14 s), so it stays.
    eroded = ndimage.binary_erosion(padded, structure=np.ones((3, 3), bool), iterations=d, border_value=0)
    return mask & ~eroded[1:-1, 1:-1]


def boundary_iou(
    gt: np.ndarray, pred: np.ndarray, dilation_ratio: float = 0.02, *, gt_boundary: np.ndarray | None = None
) -> float:
    """Boundary IoU (Cheng et al. 2021): the IoU of the two ``mask_to_boundary`` bands.

    Arguments:
      gt, pred (np.ndarray): H x W binary masks.
      dilation_ratio (float): boundary width as a fraction of the image diagonal (0.02 in HQ-SAM).
      gt_boundary (np.ndarray): ``mask_to_boundary(gt, dilation_ratio)`` if already computed (an
        evaluation scores many predictions against one GT).

    Returns:
      (float): in [0, 1]; NaN when both masks are empty.
    """
    gt, pred = _mask_pair(gt, pred)
    if gt_boundary is None:
        gt_boundary = mask_to_boundary(gt, dilation_ratio)
    elif gt_boundary.shape != gt.shape:
        raise ValueError(f"gt_boundary must have the GT's shape {gt.shape}, got {gt_boundary.shape}")
    return _iou(gt_boundary, mask_to_boundary(pred, dilation_ratio))


def stability(masks: Sequence[np.ndarray]) -> float:
    """Prompt stability ST of one object: mean pairwise IoU of its predictions under K random prompts.

        ST = 2 / (K (K - 1)) * sum_{k < l} IoU(M_k, M_l)

    where M_1..M_K (K >= 2) are the binary predictions for K independently drawn prompts of the same
    type (e.g. K = 5 noisy boxes, seeds 0-4). Stable-SAM's exact formula is not retrievable; this is
    the method spec's recommended definition (open choice 19). It needs no GT: a model whose
    predictions do not move with the prompt scores 1, so a model that is both accurate and consistent
    gets ST close to its mIoU, an inconsistent one ST < mIoU. A pair of empty predictions counts as
    IoU 1 (not NaN): the two predictions are identical, which is exactly what ST measures. Average the
    per-object values over a dataset (and multiply by 100) for the reported number.

    Arguments:
      masks (Sequence[np.ndarray]): K >= 2 binary H x W predictions of one object.

    Returns:
      (float): ST in [0, 1].
    """
    if len(masks) < 2:
        raise ValueError(f"stability needs K >= 2 predictions of the same object, got {len(masks)}")
    masks = [as_bool_mask(m, f"masks[{i}]") for i, m in enumerate(masks)]
    shapes = {m.shape for m in masks}
    if len(shapes) != 1:
        raise ValueError(f"stability: all masks must have the same shape, got {sorted(shapes)}")
    ious = [_iou(a, b) for a, b in itertools.combinations(masks, 2)]
    return float(np.mean([1.0 if math.isnan(v) else v for v in ious]))


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a binary mask, JSON-ready.

    Arguments:
      mask (np.ndarray): H x W binary mask.

    Returns:
      (dict): {"size": [H, W], "counts": str}.
    """
    mask = as_bool_mask(mask, "mask")
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_mask_ap(gt: dict[str, Any], detections: Sequence[dict[str, Any]]) -> dict[str, float]:
    """COCO mask AP with pycocotools (``COCOeval(iouType="segm")``, standard parameters).

    Annotations without "iscrowd", "area" or "id" get 0, the area of their segmentation and a running
    id; neither argument is modified. Detections must reference images of ``gt``.

    Arguments:
      gt (dict): COCO-format ground truth with "images" (id, height, width), "annotations" (id,
        image_id, category_id, segmentation as RLE or polygons) and "categories".
      detections (Sequence[dict]): each with "image_id", "category_id", "segmentation" (RLE, e.g.
        ``encode_mask``) and "score".

    Returns:
      (dict[str, float]): "map" = AP@[.5:.95] and "map50" = AP@.5 (both 0.0 without detections).
    """
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise ValueError(f"gt must be a COCO-format dict with {key!r}, got keys {sorted(gt)}")
    if not gt["annotations"]:
        raise ValueError("gt has no annotations: COCO AP is undefined")
    if not detections:
        # pycocotools' loadRes cannot take an empty list; with GT objects and no detection AP is 0.
        return {"map": 0.0, "map50": 0.0}
    image_ids = {img["id"] for img in gt["images"]}
    for i, det in enumerate(detections):
        missing = {"image_id", "category_id", "segmentation", "score"} - set(det)
        if missing:
            raise ValueError(f"detections[{i}] lacks {sorted(missing)}")
        if det["image_id"] not in image_ids:
            raise ValueError(
                f"detections[{i}] has image_id {det['image_id']!r}, which is not in gt['images']"
            )

    dataset = copy.deepcopy(gt)
    sizes = {img["id"]: (img["height"], img["width"]) for img in dataset["images"]}
    for ann_id, ann in enumerate(dataset["annotations"], start=1):
        ann.setdefault("iscrowd", 0)
        ann.setdefault("id", ann_id)
        if "area" not in ann:
            ann["area"] = float(mask_utils.area(_to_rle(ann["segmentation"], *sizes[ann["image_id"]])))
    # pycocotools prints progress; keep the caller's stdout clean.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(list(detections)))
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"map": float(evaluator.stats[0]), "map50": float(evaluator.stats[1])}


def _to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """COCO segmentation (polygons, uncompressed or compressed RLE) to compressed RLE."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation
