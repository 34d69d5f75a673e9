"""COCO with detector boxes: HQ-SAM's COCO protocol (a detector's boxes prompt SAM, mask AP).

HQ-SAM's COCO table (hqsam_pipeline.md 8, Prompt-Segment-Anything's harness) prompts SAM with
every box of a COCO-trained detector (FocalNet-L DINO, its 300 boxes per image), in original
image coordinates through ``SamPredictor`` (longest side), keeps the single-mask output, and
scores each mask with the detector's score times SAM's predicted IoU, under the detector's
category; pycocotools' COCOeval (segm) measures the AP. Here the boxes come from a COCO results
file (:func:`read_coco_detections`), and :func:`coco_box_detections` turns them into masks for
every model setting, like :func:`stable_sam.evaluation.coco_noisy_box_detections` does with noisy
GT boxes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..metrics import encode_mask
from ..modeling.stable_sam import StableSam
from ..prompts import Prompt
from .coco import CocoImage, CocoResult
from .protocol import decode_prompts

__all__ = [
    "DETECTION_SCORES",
    "CocoDetections",
    "DetectionsError",
    "coco_box_detections",
    "read_coco_detections",
]

# How a mask is scored: the detector's score times SAM's predicted IoU (Prompt-Segment-Anything's
# use_sam_iou=True, HQ-SAM's COCO numbers), or the detector's score alone.
DETECTION_SCORES = ("detection_x_iou", "detection")
_KEYS = ("image_id", "category_id", "bbox", "score")
# Box prompts decoded per decoder call (a detector gives hundreds per image).
_PROMPT_BATCH = 64


class DetectionsError(ValueError):
    """A detections file that is not a COCO results list for the annotations it is used with."""


@dataclass
class CocoDetections:
    """A detections file, per image: boxes (N x 4 float64 xyxy = x, y, x + w, y + h in original
    pixels, as the detector gave them), scores (N) and category ids (N).

    Attributes:
      path: the file.
      boxes, scores, category_ids: image id -> array, for the images of ``image_ids``.
      total: detections in the file.
      below_min_score: left out by ``min_score``.
      outside: on images of the annotation file that are not evaluated (no instance, or past
        ``eval.coco_max_images``); these images are not embedded, so they are left out too.
    """

    path: Path
    boxes: dict[int, np.ndarray] = field(default_factory=dict)
    scores: dict[int, np.ndarray] = field(default_factory=dict)
    category_ids: dict[int, np.ndarray] = field(default_factory=dict)
    total: int = 0
    below_min_score: int = 0
    outside: int = 0

    @property
    def kept(self) -> int:
        return sum(len(s) for s in self.scores.values())


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _problem(det: Any, images: Collection[int], categories: Collection[int]) -> str | None:
    """Why one entry is not a detection of these annotations (None: it is)."""
    if not isinstance(det, dict):
        return f"is not an object with {', '.join(_KEYS)} (got {type(det).__name__} {det!r:.40})"
    missing = [k for k in _KEYS if k not in det]
    if missing:
        return f"lacks {', '.join(missing)} (a detection has {', '.join(_KEYS)})"
    box = det["bbox"]
    if not (isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box)):
        return f"bbox {box!r} is not 4 numbers [x, y, width, height]"
    if box[2] < 0 or box[3] < 0:
        return f"bbox {box!r} has a negative width or height"
    if not _number(det["score"]):
        return f"score {det['score']!r} is not a number"
    if det["image_id"] not in images:
        return f"image_id {det['image_id']!r} is not an image of the annotations"
    if det["category_id"] not in categories:
        return f"category_id {det['category_id']!r} is not a category of the annotations"
    return None


def read_coco_detections(
    path: str | Path,
    *,
    image_ids: Collection[int],
    category_ids: Collection[int],
    evaluated: Collection[int] | None = None,
    min_score: float = 0.0,
) -> CocoDetections:
    """Read a COCO results file (a JSON list of {image_id, category_id, bbox [x, y, w, h], score}).

    Args:
      path: the file (``eval.coco_detections`` of the set).
      image_ids, category_ids: the images and categories of the annotation file; a detection of
        another image or category is an error (the file is for other annotations).
      evaluated: the images that are evaluated (default: all of ``image_ids``); the detections of
        the others are counted in ``outside`` and left out.
      min_score: detections scored below it are left out (0: all of them, as HQ-SAM).

    Raises:
      DetectionsError: naming the file and, for an entry, its index and what is wrong with it.
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DetectionsError(f"detections file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DetectionsError(f"{path}: not JSON ({err})") from None
    if not isinstance(entries, list):
        raise DetectionsError(
            f"{path}: a COCO results file is a JSON list of detections, got a {type(entries).__name__}"
        )
    images, categories = set(image_ids), set(category_ids)
    evaluated = images if evaluated is None else set(evaluated)
    per_image: dict[int, list[dict[str, Any]]] = {}
    result = CocoDetections(path=path, total=len(entries))
    for i, det in enumerate(entries):
        problem = _problem(det, images, categories)
        if problem is not None:
            raise DetectionsError(f"{path}: detection {i} {problem}")
        if det["score"] < min_score:
            result.below_min_score += 1
        elif det["image_id"] not in evaluated:
            result.outside += 1
        else:
            per_image.setdefault(det["image_id"], []).append(det)
    for image_id, dets in per_image.items():
        x, y, w, h = np.array([d["bbox"] for d in dets], np.float64).T
        result.boxes[image_id] = np.stack([x, y, x + w, y + h], axis=1)
        result.scores[image_id] = np.array([d["score"] for d in dets], np.float64)
        result.category_ids[image_id] = np.array([d["category_id"] for d in dets], np.int64)
    return result


def _frame_boxes(boxes: np.ndarray, coco: CocoImage) -> np.ndarray:
    """Original-pixel xyxy boxes in the model frame, scaled like SamPredictor's ``apply_boxes``."""
    (height, width), (h_in, w_in) = coco.image.original_size, coco.image.input_size
    return (boxes * np.array([w_in / width, h_in / height] * 2)).astype(np.float32)


@torch.no_grad()
def coco_box_detections(
    model: StableSam,
    images: Sequence[CocoImage],
    embeddings: Sequence[torch.Tensor],
    detections: CocoDetections,
    *,
    settings: dict[str, Any],
    score: str = "detection_x_iou",
    progress: bool = True,
) -> dict[str, CocoResult]:
    """COCO detections from detector boxes, per model setting (HQ-SAM's COCO protocol).

    Every detection of an image prompts SAM with its box (in the model frame, as SamPredictor
    scales it; the same boxes for every setting), SAM's single-mask output is kept, scored by
    ``score`` (one of :data:`DETECTION_SCORES`) and given the detection's category. Feed the result
    to :func:`stable_sam.metrics.coco_mask_ap` with :func:`coco_gt_subset`.
    """
    if score not in DETECTION_SCORES:
        raise ValueError(f"score must be one of {DETECTION_SCORES}, got {score!r}")
    results = {name: CocoResult() for name in settings}
    for coco, embedding in tqdm(
        list(zip(images, embeddings)), desc="coco boxes", disable=not progress, mininterval=10
    ):
        boxes = detections.boxes.get(coco.image_id)
        if boxes is None:
            continue
        prompts = [Prompt("detection_box", box=box) for box in _frame_boxes(boxes, coco)]
        scores, categories = detections.scores[coco.image_id], detections.category_ids[coco.image_id]
        for name, context in settings.items():
            result = results[name]
            result.prompted += len(prompts)
            for start in range(0, len(prompts), _PROMPT_BATCH):
                with context():
                    decoded = decode_prompts(
                        model,
                        embedding,
                        prompts[start : start + _PROMPT_BATCH],
                        image=coco.image,
                        multimask_output=False,
                    )
                for j, (mask, iou) in enumerate(zip(decoded.masks, decoded.predicted_iou), start=start):
                    mask_score = scores[j] * iou if score == "detection_x_iou" else scores[j]
                    result.detections.append(
                        {
                            "image_id": coco.image_id,
                            "category_id": int(categories[j]),
                            "segmentation": encode_mask(mask),
                            "score": float(mask_score),
                        }
                    )
    return results
