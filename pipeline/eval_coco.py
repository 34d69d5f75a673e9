"""COCO-format sets in the evaluate stage: merging per-chunk detections, mask AP per model, and
the detector-box protocol (``eval.coco_detections``: a COCO results file per set, HQ-SAM's COCO
table) read and checked before any work, and described in the results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stable_sam.checkpoint import file_sha256
from stable_sam.evaluation import CocoDetections, CocoResult, read_coco_detections
from stable_sam.metrics import coco_mask_ap

from .params import EvalConfig

__all__ = ["ap_entry", "detections_entry", "merge_coco", "read_detections"]


def merge_coco(into: dict[str, CocoResult], part: dict[str, CocoResult]) -> None:
    for name, result in part.items():
        target = into.setdefault(name, CocoResult())
        target.detections.extend(result.detections)
        target.prompted += result.prompted
        target.skipped += result.skipped
        target.escalated += result.escalated


def read_detections(cfg: EvalConfig, cocos: Sequence[tuple[str, Any, str]]) -> dict[str, CocoDetections]:
    """The detections file of each COCO set named in ``eval.coco_detections``, checked before any work."""
    names = {name for name, _, _ in cocos}
    unknown = sorted(set(cfg.coco_detections) - names)
    if unknown:
        raise ValueError(
            f"eval.coco_detections names {unknown}: not a COCO-format set of data.val (COCO sets: "
            f"{sorted(names) or 'none'})"
        )
    return {
        name: read_coco_detections(
            cfg.coco_detections[name],
            image_ids=coco.coco.getImgIds(),
            category_ids=coco.coco.getCatIds(),
            evaluated=coco.image_ids,
            min_score=cfg.coco_detection_min_score,
        )
        for name, coco, _ in cocos
        if name in cfg.coco_detections
    }


def ap_entry(gt: dict[str, Any], results: dict[str, CocoResult]) -> dict[str, Any]:
    entry = {}
    for setting, result in results.items():
        ap = coco_mask_ap(gt, result.detections)
        entry[setting] = {"map": 100 * ap["map"], "map50": 100 * ap["map50"]}
    return entry


def detections_entry(
    gt: dict[str, Any], boxed: dict[str, CocoResult], detections: CocoDetections, cfg: EvalConfig
) -> dict[str, Any]:
    """Mask AP per model with the detector's boxes, and what was read of the file."""
    return {
        **ap_entry(gt, boxed),
        "file": str(detections.path),
        "sha256": file_sha256(detections.path),
        "score": cfg.coco_detection_score,
        "min_score": cfg.coco_detection_min_score,
        "in_file": detections.total,
        "below_min_score": detections.below_min_score,
        "outside": detections.outside,  # on images not evaluated (no instance, coco_max_images)
        "prompted": detections.kept,
    }
