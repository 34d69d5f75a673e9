"""COCO N-Box protocol: noisy boxes around reference detections, detections for COCOeval."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from stable_sam.boxes import NoisyBoxError, box_from_mask, noisy_box

from ..data import CocoSample, prepare_eval_image, resize_mask_longest_side, resize_mask_stretch
from ..metrics import encode_mask
from ..modeling.stable_sam import StableSam
from ..prompts import Prompt
from .protocol import PreparedImage, decode_prompts

__all__ = [
    "COCO_NOISE_SCALES",
    "CocoImage",
    "CocoResult",
    "coco_gt_subset",
    "coco_noisy_box_detections",
    "coco_noisy_boxes",
    "prepare_coco_image",
]


# COCO "N-Box (0.5-0.6)": box noise scales tried in turn until a box lands in the IoU window
# (method spec 5.4: scale 0.4, escalated to 0.6 / 0.8 when 100 draws fail).
COCO_NOISE_SCALES = (0.4, 0.6, 0.8)


@dataclass
class CocoImage:
    """One COCO image in the model frame, with its instances.

    Attributes:
      image: the image as a :class:`PreparedImage` (its ``mask`` is the union of the instances,
        used for the original size; ``frame_mask`` likewise in the model frame).
      image_id: COCO image id.
      frame_masks: N x h x w bool instance masks in the model frame.
      masks: N x H x W bool instance masks at the original resolution.
      category_ids, annotation_ids: N int64.
    """

    image: PreparedImage
    image_id: int
    frame_masks: np.ndarray
    masks: np.ndarray
    category_ids: np.ndarray
    annotation_ids: np.ndarray


def prepare_coco_image(sample: CocoSample, *, index: int, resize: str, image_size: int) -> CocoImage:
    """Bring a :class:`stable_sam.data.CocoSample` to the model frame (as :func:`prepare_image`)."""
    union = sample.masks.any(axis=0) if len(sample.masks) else np.zeros(sample.image.shape[:2], bool)
    image, frame_union, input_size = prepare_eval_image(
        sample.image, union, mode=resize, target_length=image_size
    )
    if resize == "stretch":
        frame_masks = [resize_mask_stretch(m, image_size) for m in sample.masks]
    else:
        frame_masks = [resize_mask_longest_side(m, image_size) for m in sample.masks]
    prepared = PreparedImage(
        name=sample.file_name,
        index=index,
        input_image=image,
        frame_mask=frame_union,
        mask=union,
        input_size=tuple(input_size),
        resize=resize,
    )
    return CocoImage(
        image=prepared,
        image_id=int(sample.image_id),
        frame_masks=np.stack(frame_masks) if frame_masks else np.zeros((0, *input_size), bool),
        masks=sample.masks,
        category_ids=np.asarray(sample.category_ids, np.int64),
        annotation_ids=np.asarray(sample.annotation_ids, np.int64),
    )


def _reference_box(coco: CocoImage, j: int) -> np.ndarray | None:
    """The GT box of instance j in the model frame: from its resized mask, else its scaled box."""
    if coco.frame_masks[j].any():
        return box_from_mask(coco.frame_masks[j])
    if not coco.masks[j].any():
        return None
    # A thin object that the resize erased: scale its original-resolution box into the frame.
    box = box_from_mask(coco.masks[j]).astype(np.float64)
    (height, width), (h_in, w_in) = coco.masks[j].shape, coco.image.input_size
    scale = np.array([w_in / width, h_in / height] * 2)
    upper = np.array([w_in - 1, h_in - 1] * 2, np.float64)
    return np.clip(box * scale, 0.0, upper).astype(np.float32)


@dataclass
class CocoResult:
    """Detections of one setting, plus how the prompts came about.

    Attributes:
      detections: COCO result dicts (image_id, category_id, segmentation RLE, score).
      prompted: instances that got a noisy box.
      skipped: instances without one (empty mask, or no box in the IoU window at any scale).
      escalated: instances whose box needed a noise scale above the first.
    """

    detections: list[dict[str, Any]] = field(default_factory=list)
    prompted: int = 0
    skipped: int = 0
    escalated: int = 0


def coco_noisy_boxes(
    coco: CocoImage,
    *,
    seed: int,
    min_iou: float = 0.5,
    max_iou: float = 0.6,
    noise_scales: Sequence[float] = COCO_NOISE_SCALES,
) -> tuple[list[Prompt], list[int], int]:
    """One noisy box per instance with min_iou <= IoU(box, GT box) <= max_iou.

    Instance j draws from ``np.random.default_rng([seed, image_id, annotation_id])``; the noise
    scales are tried in turn (100 draws each). Returns (prompts, instance indices, escalated).
    """
    prompts, kept, escalated = [], [], 0
    for j in range(len(coco.frame_masks)):
        reference = _reference_box(coco, j)
        if reference is None:
            continue
        generator = np.random.default_rng([seed, coco.image_id, int(coco.annotation_ids[j])])
        for attempt, scale in enumerate(noise_scales):
            try:
                box = noisy_box(
                    reference,
                    image_size=coco.image.input_size,
                    generator=generator,
                    noise_scale=scale,
                    min_iou=min_iou,
                    max_iou=max_iou,
                )
            except NoisyBoxError:
                continue
            prompts.append(Prompt("noisy_box", box=box))
            kept.append(j)
            escalated += attempt > 0
            break
    return prompts, kept, escalated


@torch.no_grad()
def coco_noisy_box_detections(
    model: StableSam,
    images: Sequence[CocoImage],
    embeddings: Sequence[torch.Tensor],
    *,
    settings: dict[str, Any],
    seed: int,
    min_iou: float = 0.5,
    max_iou: float = 0.6,
    noise_scales: Sequence[float] = COCO_NOISE_SCALES,
    progress: bool = True,
) -> dict[str, CocoResult]:
    """COCO detections under the "N-Box (0.5-0.6)" protocol, per model setting.

    Every instance is prompted with a noisy version of its GT box whose IoU with it lies in
    [min_iou, max_iou] (:func:`coco_noisy_boxes`; the same boxes for every setting), SAM's
    single-mask output is kept, the score is SAM's predicted IoU and the category is the GT one.
    Feed the result to :func:`stable_sam.metrics.coco_mask_ap` with :func:`coco_gt_subset`.
    """
    results = {name: CocoResult() for name in settings}
    for coco, embedding in tqdm(
        list(zip(images, embeddings)), desc="coco", disable=not progress, mininterval=10
    ):
        prompts, kept, escalated = coco_noisy_boxes(
            coco, seed=seed, min_iou=min_iou, max_iou=max_iou, noise_scales=noise_scales
        )
        for name, context in settings.items():
            result = results[name]
            result.prompted += len(kept)
            result.skipped += len(coco.frame_masks) - len(kept)
            result.escalated += escalated
            if not prompts:
                continue
            with context():
                decoded = decode_prompts(model, embedding, prompts, image=coco.image, multimask_output=False)
            for mask, score, j in zip(decoded.masks, decoded.predicted_iou, kept):
                result.detections.append(
                    {
                        "image_id": coco.image_id,
                        "category_id": int(coco.category_ids[j]),
                        "segmentation": encode_mask(mask),
                        "score": float(score),
                    }
                )
    return results


def coco_gt_subset(dataset: dict[str, Any], image_ids: Iterable[int]) -> dict[str, Any]:
    """A COCO-format dict restricted to ``image_ids`` (all their annotations, crowd ones included)."""
    keep = set(image_ids)
    return {
        "images": [img for img in dataset["images"] if img["id"] in keep],
        "annotations": [a for a in dataset["annotations"] if a["image_id"] in keep],
        "categories": list(dataset["categories"]),
    }
